"""checkpoint.pt: everything needed to continue a run exactly where it stopped.

Model (hyper-network and latent table), both optimizers, the position inside
the epoch (its case order and step), the running loss sums, the per-epoch log
and the RNG state.  Written atomically; loaded with `weights_only=True`, so a
checkpoint can never execute code.  The two newest are kept (checkpoint.pt and
checkpoint.prev.pt), so a newest one damaged on disk still leaves a run to resume.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from hypersort_core.atomic import atomic_open
from hypersort_core.faults import NO_SPACE_ERRNOS, cause_of, os_error_of

CHECKPOINT_NAME = "checkpoint.pt"
PREVIOUS_CHECKPOINT_NAME = "checkpoint.prev.pt"
DAMAGED_CHECKPOINT_NAME = "checkpoint.damaged.pt"
FORMAT_VERSION = 1


class CheckpointError(Exception):
    """A checkpoint that is missing, damaged, belongs to another dataset, or cannot be written."""


@dataclass
class TrainingState:
    """Where training stands; all plain data so that it survives `weights_only` loading."""

    epoch: int = 0
    step_in_epoch: int = 0  # steps taken this epoch
    cases_done_in_epoch: int = 0  # how far into epoch_order: steps * batch size * processes, except after a short batch
    epoch_order: list[int] = field(default_factory=list)
    epoch_sums: dict[str, float] = field(default_factory=dict)
    log_rows: list[dict] = field(default_factory=list)
    elapsed_seconds: float = 0.0
    skipped_in_epoch: int = 0  # steps skipped this epoch for a NaN or Inf loss
    skipped_in_a_row: int = 0
    unreadable_cases: list[int] = field(default_factory=list)  # left out of training since their cache became unreadable
    processes: int = 1  # training processes (torchrun's world size): the effective batch is batch size * processes
    running_losses: dict[str, list[float]] = field(default_factory=dict)  # misfit.LOSSES per case, running means over the epochs
    scorings: list[int] = field(default_factory=list)  # per case: the scorings in those means


def rng_state() -> dict:
    """This process's random state: with several processes, each has its own (random crops differ)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this process's own GPU only
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def rng_states(payload: dict) -> list[dict]:
    """The random state of each process (rank order) that trained up to a checkpoint."""
    states = payload["rng"]
    return states if isinstance(states, list) else [states]


def save_checkpoint(
    run_dir: Path, model: torch.nn.Module, optimizers: dict[str, torch.optim.Optimizer], state: TrainingState, rng: list[dict] | None = None
) -> Path:
    """Write run_dir/checkpoint.pt atomically, the one it replaces becoming checkpoint.prev.pt.

    rng: every process's random state, rank order (default: this process's).  A failed write (a full
    disk above all) leaves both earlier checkpoints as they were.
    """
    payload = {
        "format": FORMAT_VERSION,
        "case_ids": list(model.case_ids),
        "model": model.state_dict(),
        "optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
        "state": asdict(state),
        "rng": rng if rng is not None else [rng_state()],
    }
    path = Path(run_dir) / CHECKPOINT_NAME
    try:
        with atomic_open(path, "wb", previous=Path(run_dir) / PREVIOUS_CHECKPOINT_NAME) as handle:
            torch.save(payload, handle)
    except (OSError, RuntimeError) as error:  # torch's zip writer wraps the OSError of a failed write in a RuntimeError
        found = os_error_of(error)
        if found is None:
            raise
        problem = "no space left on the device" if found.errno in NO_SPACE_ERRNOS else f"could not be written ({cause_of(found)})"
        raise CheckpointError(f"{path}: {problem}; the previous checkpoint is intact") from error
    return path


def checkpoint_paths(run_dir: Path) -> list[Path]:
    """The checkpoints of a run folder, newest first, whether or not they exist."""
    return [Path(run_dir) / CHECKPOINT_NAME, Path(run_dir) / PREVIOUS_CHECKPOINT_NAME]


def remove_interrupted_writes(run_dir: Path) -> None:
    """Delete the temporary files of writes into the run folder that a kill cut short (checkpoints above all,
    tens of MB each); they hold no complete file.  Only a fit starting in its own run folder calls this."""
    _unlink_all(Path(run_dir).glob(".*.tmp"))


def remove_checkpoints(run_dir: Path) -> None:
    """Forget a run's checkpoints, so that a new run in the same folder can never fall back to them."""
    remove_interrupted_writes(run_dir)
    _unlink_all([*checkpoint_paths(run_dir), Path(run_dir) / DAMAGED_CHECKPOINT_NAME])


def _unlink_all(paths) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def load_latest_checkpoint(run_dir: Path, map_location: str | torch.device = "cpu") -> tuple[dict, Path]:
    """The newest complete checkpoint of a run and its path; a damaged or missing newest one is reported and the previous one used."""
    newest, previous = checkpoint_paths(run_dir)
    try:
        return load_checkpoint(newest, map_location), newest
    except CheckpointError as error:
        if not previous.is_file():
            raise
        print(f"hsort: warning: {error}; using {previous}", file=sys.stderr)
        try:
            return load_checkpoint(previous, map_location), previous
        except CheckpointError as second:
            raise CheckpointError(f"{error}; and {second}") from second


def resume_latest_checkpoint(run_dir: Path) -> tuple[dict, Path]:
    """The checkpoint a resumed run continues from, and its path.  A damaged newest one is set aside (renamed),
    or the next write would push the good previous one out and put the damaged one in its place."""
    payload, path = load_latest_checkpoint(run_dir)
    newest = Path(run_dir) / CHECKPOINT_NAME
    if path != newest and newest.exists():
        newest.replace(Path(run_dir) / DAMAGED_CHECKPOINT_NAME)
        print(f"hsort: warning: set the damaged {newest} aside as {DAMAGED_CHECKPOINT_NAME}", file=sys.stderr)
    return payload, path


def load_weights_only(path: Path, map_location: str | torch.device = "cpu"):
    """torch.load(weights_only=True), which cannot run code, without torch's warning about a pickle protocol
    other than 2 (files saved by other code, such as the reference's): it tells our users nothing."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        return torch.load(path, map_location=map_location, weights_only=True)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint without executing code; a damaged file is a CheckpointError, not a traceback."""
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: no checkpoint to resume from")
    try:
        payload = load_weights_only(path, map_location)
    except Exception as error:  # torch raises many types for a truncated or foreign file
        raise CheckpointError(f"{path}: damaged or not a hypersort checkpoint ({type(error).__name__})") from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: not a hypersort checkpoint of format {FORMAT_VERSION}")
    return payload


def restore_checkpoint(payload: dict, model: torch.nn.Module, optimizers: dict[str, torch.optim.Optimizer]) -> TrainingState:
    """Load model and optimizers from a payload; return the training position (the RNG is each process's own: rng_states)."""
    if list(payload["case_ids"]) != list(model.case_ids):
        raise CheckpointError("the checkpoint was trained on a different case list than this dataset holds")
    model.load_state_dict(payload["model"])
    for name, optimizer in optimizers.items():
        optimizer.load_state_dict(payload["optimizers"][name])
    return TrainingState(**payload["state"])
