"""checkpoint.pt: everything needed to continue a run exactly where it stopped.

Model (hyper-network and latent table), both optimizers, the position inside
the epoch (its case order and step), the running loss sums, the per-epoch log
and the RNG state.  Written atomically; loaded with `weights_only=True`, so a
checkpoint can never execute code.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from hypersort_core.atomic import atomic_open

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1


class CheckpointError(Exception):
    """A checkpoint that is missing, damaged or belongs to another dataset."""


@dataclass
class TrainingState:
    """Where training stands; all plain data so that it survives `weights_only` loading."""

    epoch: int = 0
    step_in_epoch: int = 0
    epoch_order: list[int] = field(default_factory=list)
    epoch_sums: dict[str, float] = field(default_factory=dict)
    log_rows: list[dict] = field(default_factory=list)
    elapsed_seconds: float = 0.0


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, model: torch.nn.Module, optimizers: dict[str, torch.optim.Optimizer], state: TrainingState) -> Path:
    """Write run_dir/checkpoint.pt atomically (temporary file, fsync, rename)."""
    payload = {
        "format": FORMAT_VERSION,
        "case_ids": list(model.case_ids),
        "model": model.state_dict(),
        "optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
        "state": asdict(state),
        "rng": _rng_state(),
    }
    path = Path(run_dir) / CHECKPOINT_NAME
    with atomic_open(path, "wb") as handle:
        torch.save(payload, handle)
    return path


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint without executing code; a damaged file is a CheckpointError, not a traceback."""
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: no checkpoint to resume from")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises many types for a truncated or foreign file
        raise CheckpointError(f"{path}: damaged or not a hypersort checkpoint ({type(error).__name__})") from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: not a hypersort checkpoint of format {FORMAT_VERSION}")
    return payload


def restore_checkpoint(payload: dict, model: torch.nn.Module, optimizers: dict[str, torch.optim.Optimizer]) -> TrainingState:
    """Load model, optimizers and RNG from a payload; return the training position."""
    if list(payload["case_ids"]) != list(model.case_ids):
        raise CheckpointError("the checkpoint was trained on a different case list than this dataset holds")
    model.load_state_dict(payload["model"])
    for name, optimizer in optimizers.items():
        optimizer.load_state_dict(payload["optimizers"][name])
    _restore_rng(payload["rng"])
    return TrainingState(**payload["state"])
