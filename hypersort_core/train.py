"""`hsort fit`: train the hyper-network and the latent table jointly.

Two Adam optimizers, as in the reference code: one for the hyper-network, one
(sparse, so only the cases in a batch move) for the latents.  Batches hold
several cases, each segmented by the UNet of its own latent.  Ctrl-C and the
time budget stop at a step boundary and leave a checkpoint to resume from.
Faults cost as little as they can: a NaN or Inf loss skips its step (and a run
of them stops training with a checkpoint of the last good state), and a case
whose cache becomes unreadable is reported and left out.
"""
from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm.auto import tqdm

from hypersort_core import __version__
from hypersort_core.atomic import atomic_write_text
from hypersort_core.checkpoint import (
    CHECKPOINT_NAME,
    NO_SPACE_ERRNOS,
    CheckpointError,
    TrainingState,
    checkpoint_paths,
    remove_checkpoints,
    remove_interrupted_writes,
    restore_checkpoint,
    resume_latest_checkpoint,
    save_checkpoint,
)
from hypersort_core.config import ConfigError, TrainConfig
from hypersort_core.data import (
    DataError,
    PreparedData,
    TrainingSet,
    prepare_cases,
    read_dataset,
    select_labels,
)
from hypersort_core.latents import plot_latent_map, write_latents_csv
from hypersort_core.log import plot_progress, write_log_csv
from hypersort_core.loss import hypersort_loss
from hypersort_core.model import HyperSORT, plain_unet

CONFIG_NAME = "config.json"
SUM_KEYS = ("loss", "cross_entropy", "dice", "latent_l1")
MAX_NONFINITE_IN_A_ROW = 5  # skipped NaN/Inf steps in a row that mean training has diverged
UNREADABLE = (OSError, ValueError, EOFError)  # what numpy raises for a missing, truncated or overwritten .npy


class TrainingDiverged(ConfigError):
    """The loss stayed NaN or Inf: the settings (most often a learning rate too high) need changing, not the code."""


@dataclass
class FitResult:
    run_dir: Path
    case_ids: list[str]
    epochs_done: int
    stopped: str | None  # None (finished), "time budget" or "interrupted"
    bad_cases: list[DataError]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but PyTorch sees no CUDA device")
    return torch.device(name)


def autocast_for(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA by default; TF32 when asked for; plain float32 on the CPU."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    return contextlib.nullcontext()


def estimated_step_seconds(config: TrainConfig) -> float:
    """Seconds per training step on this CPU: the UNet's FLOPs over a measured conv3d rate."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = plain_unet(config.model)
        x = torch.empty(config.batch_size, config.model.in_channels, *config.preprocess.roi)
        with FlopCounterMode(display=False) as counter:
            unet(x).sum().backward()
    probe = torch.randn(1, 16, 32, 32, 32)
    weight = torch.randn(16, 16, 3, 3, 3)
    start = time.perf_counter()
    torch.nn.functional.conv3d(probe, weight, padding=1)
    rate = 2 * 16 * 16 * 27 * 32**3 / (time.perf_counter() - start)
    return counter.get_total_flops() / rate


class _StopFlag:
    """Ctrl-C asks to stop after the current step; a second Ctrl-C stops at once."""

    def __init__(self) -> None:
        self.requested = False

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.getsignal(signal.SIGINT)

        def request(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True

        signal.signal(signal.SIGINT, request)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


def write_config(run_dir: Path, config: TrainConfig, data: Path, case_ids: list[str]) -> None:
    # Absolute, so that later commands find the dataset from any working directory.
    payload = {"version": __version__, "data": str(Path(data).resolve()), **config.to_dict(), "cases": case_ids}
    atomic_write_text(run_dir / CONFIG_NAME, json.dumps(payload, indent=2) + "\n")


def read_config(run_dir: Path) -> tuple[TrainConfig, Path]:
    """The settings and dataset path a run folder was made with."""
    payload = json.loads((run_dir / CONFIG_NAME).read_text())
    return TrainConfig.from_dict(payload), Path(payload["data"])


def prepare_data(data: Path, config: TrainConfig, run_dir: Path, progress: bool) -> tuple[PreparedData, TrainConfig]:
    """Read, check and preprocess the dataset; the output channels follow the chosen labels."""
    dataset = read_dataset(data, config.layout)
    selection = select_labels(dataset, config.label)
    config = replace(config, model=replace(config.model, out_channels=selection.num_classes))
    prepared = prepare_cases(dataset, selection, config.preprocess, run_dir / "cache", skip_bad=config.skip_bad, progress=progress)
    return prepared, config


def build_optimizers(model: HyperSORT, config: TrainConfig, device: torch.device) -> dict[str, torch.optim.Optimizer]:
    fused = device.type == "cuda"
    return {
        "hypernet": torch.optim.Adam(model.hypernet.parameters(), lr=config.lr, fused=fused),
        "latents": torch.optim.SparseAdam(model.latents.parameters(), lr=config.latent_lr, betas=config.latent_betas),
    }


def write_epoch_outputs(run_dir: Path, model: HyperSORT, state: TrainingState) -> None:
    """The per-epoch files of the run folder, each replaced atomically."""
    latents = model.latents.weight.detach().float().cpu().numpy()
    write_latents_csv(run_dir, model.case_ids, latents)
    plot_latent_map(run_dir, model.case_ids, latents, state.epoch)
    if state.log_rows:
        write_log_csv(run_dir, state.log_rows)
        plot_progress(run_dir, state.log_rows)


@contextlib.contextmanager
def _full_disk_is_a_clear_error(run_dir: Path) -> Iterator[None]:
    """A full disk while writing the run folder: one line naming the file, not a traceback.
    Every write is atomic, so the checkpoints already on disk stay as they were."""
    try:
        yield
    except OSError as error:
        if error.errno not in NO_SPACE_ERRNOS:
            raise
        raise CheckpointError(f"{error.filename or run_dir}: no space left on the device; the checkpoints already written are intact") from error


def fit(data: Path, run_dir: Path, config: TrainConfig, resume: bool = False, progress: bool = True, overwrite: bool = False) -> FitResult:
    """Train HyperSORT on a dataset folder; everything lands in run_dir (see README: the run folder)."""
    config.validate()
    run_dir = Path(run_dir)
    if not resume and not overwrite and any(path.exists() for path in checkpoint_paths(run_dir)):
        raise ConfigError(f"{run_dir} already holds a run: --resume continues it, --overwrite starts it again")
    run_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    payload = resume_latest_checkpoint(run_dir) if resume else None
    (remove_interrupted_writes if resume else remove_checkpoints)(run_dir)
    with _full_disk_is_a_clear_error(run_dir):
        prepared, config = prepare_data(Path(data), config, run_dir, progress)
        case_ids = [case.case_id for case in prepared.cases]
        write_config(run_dir, config, Path(data), case_ids)
    if device.type == "cpu" and config.preset == "paper" and payload is None:
        steps = math.ceil(len(case_ids) / config.batch_size)
        print(f"estimated time per epoch on this CPU: {steps * estimated_step_seconds(config) / 60:.1f} min ({steps} steps); --preset small is CPU-sized")

    torch.manual_seed(config.seed)
    model = HyperSORT(config.model, case_ids).to(device)
    optimizers = build_optimizers(model, config, device)
    state = restore_checkpoint(payload, model, optimizers) if payload else TrainingState()
    with _full_disk_is_a_clear_error(run_dir):
        stopped = _train(model, optimizers, state, TrainingSet(prepared), config, device, run_dir, progress)
    unreadable = [DataError(case_ids[index], "its cache became unreadable during training; left out from then on") for index in state.unreadable_cases]
    return FitResult(run_dir, case_ids, state.epoch, stopped, prepared.bad + unreadable)


def _train(model, optimizers, state, training_set, config, device, run_dir, progress) -> str | None:
    n_cases = len(training_set)
    autocast = autocast_for(config.precision, device)
    stop = _StopFlag()
    started = time.monotonic() - state.elapsed_seconds
    budget = None if config.max_minutes is None else config.max_minutes * 60

    def checkpoint() -> None:
        state.elapsed_seconds = time.monotonic() - started
        save_checkpoint(run_dir, model, optimizers, state)

    def save_progress() -> None:
        checkpoint()
        write_epoch_outputs(run_dir, model, state)

    with stop.installed():
        while state.epoch < config.epochs:
            if not state.epoch_order:
                _start_epoch(state, n_cases)
            order = state.epoch_order
            batches = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
            # The loader's own generator keeps the global RNG (saved in checkpoints) untouched by resuming.
            loader_rng = torch.Generator().manual_seed(config.seed * 100_003 + state.epoch)
            loader = DataLoader(
                _SkipsUnreadableCases(training_set),
                batch_sampler=batches[state.step_in_epoch :],
                num_workers=config.workers,
                generator=loader_rng,
                collate_fn=_collate_readable,
            )
            bar = tqdm(loader, total=len(batches), initial=state.step_in_epoch, desc=f"epoch {state.epoch + 1}/{config.epochs}", disable=not progress, leave=False)
            for batch in bar:
                _leave_out_unreadable(state, batch["unreadable"])
                if len(batch["index"]):
                    terms, stepped = _train_step(model, optimizers, batch, config, device, autocast)
                    _record_step(state, terms, stepped)
                    bar.set_postfix(loss=f"{float(terms.total):.4f}", latent=f"{_mean_latent_norm(model):.4f}")
                state.step_in_epoch += 1
                if state.skipped_in_a_row >= MAX_NONFINITE_IN_A_ROW:
                    bar.close()
                    state.skipped_in_a_row = 0  # a resumed run gets a fresh allowance
                    save_progress()  # skipped steps never changed the model: this is the last good state
                    raise _diverged(state, run_dir)
                over_budget = budget is not None and time.monotonic() - started > budget
                if stop.requested or over_budget:
                    bar.close()
                    save_progress()
                    return "interrupted" if stop.requested else "time budget"
            bar.close()
            _finish_epoch(model, state, len(batches), time.monotonic() - started, progress)
            write_epoch_outputs(run_dir, model, state)
            if state.epoch % config.checkpoint_every == 0 or state.epoch == config.epochs:
                checkpoint()
    return None


def _start_epoch(state: TrainingState, n_cases: int) -> None:
    """A fresh random case order, without the cases whose cache became unreadable."""
    state.epoch_order = [index for index in torch.randperm(n_cases).tolist() if index not in state.unreadable_cases]
    if not state.epoch_order:
        raise DataError("the cache of every case became unreadable during training; nothing is left to train on")
    state.step_in_epoch, state.skipped_in_epoch = 0, 0
    state.epoch_sums = dict.fromkeys((*SUM_KEYS, "steps"), 0.0)  # "steps": how many finite steps the sums hold


def _train_step(model, optimizers, batch, config, device, autocast):
    """One optimizer step, and whether it was taken: a NaN or Inf loss takes none and computes no gradients."""
    image = batch["image"].to(device, non_blocking=True)
    label = batch["label"].to(device, non_blocking=True)
    latent = model.latents(batch["index"].to(device))
    with autocast:
        logits = model(image, latent)
    terms = hypersort_loss(logits, label, latent, config.l1)
    for optimizer in optimizers.values():
        optimizer.zero_grad(set_to_none=True)
    finite = bool(torch.isfinite(terms.total))
    if finite:
        terms.total.backward()
        for optimizer in optimizers.values():
            optimizer.step()
    return replace(terms, **{k: v.detach() for k, v in vars(terms).items()}), finite


def _record_step(state: TrainingState, terms, stepped: bool) -> None:
    """Add a taken step to the epoch's sums; count and report a skipped one."""
    if stepped:
        for key, value in zip(SUM_KEYS, (terms.total, terms.cross_entropy, terms.dice, terms.latent_l1)):
            state.epoch_sums[key] += value.item()
        state.epoch_sums["steps"] += 1
        state.skipped_in_a_row = 0
        return
    state.skipped_in_epoch += 1
    state.skipped_in_a_row += 1
    _warn(f"epoch {state.epoch + 1}, step {state.step_in_epoch + 1}: the loss is {float(terms.total)}; step skipped ({state.skipped_in_a_row} in a row)")


def _diverged(state: TrainingState, run_dir: Path) -> TrainingDiverged:
    return TrainingDiverged(
        f"training stopped: the loss was NaN or Inf for {MAX_NONFINITE_IN_A_ROW} steps in a row (epoch {state.epoch + 1}); "
        f"the last good state is in {run_dir / CHECKPOINT_NAME}; a lower --lr usually helps"
    )


class _SkipsUnreadableCases(Dataset):
    """The training set, with a case whose cached arrays cannot be read returned as a marker instead of raising,
    so that one damaged file costs one case and not the run."""

    def __init__(self, training_set: TrainingSet) -> None:
        self.training_set = training_set

    def __len__(self) -> int:
        return len(self.training_set)

    def __getitem__(self, index: int) -> dict:
        try:
            return self.training_set[index]
        except UNREADABLE as error:
            return {"unreadable": index, "problem": _unreadable_problem(self.training_set.cases[index], error)}


def _unreadable_problem(case, error: Exception) -> str:
    """Name the case and the first of its cached files that no longer loads."""
    files = [path for path in (case.image_file, case.label_file, case.foreground_file) if path is not None]
    culprit = next((path for path in files if not _loads(path)), "its cache")
    reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    return f"case {case.case_id}: {culprit} is unreadable ({reason})"


def _loads(path: Path) -> bool:
    try:
        np.load(path, mmap_mode="r")
    except UNREADABLE:
        return False
    return True


def _collate_readable(items: list[dict]) -> dict:
    """Batch the readable items; list the unreadable ones apart, as (index, problem)."""
    readable = [item for item in items if "unreadable" not in item]
    batch = default_collate(readable) if readable else {"index": torch.empty(0, dtype=torch.long)}
    batch["unreadable"] = [(item["unreadable"], item["problem"]) for item in items if "unreadable" in item]
    return batch


def _leave_out_unreadable(state: TrainingState, unreadable: list[tuple[int, str]]) -> None:
    """Report each newly unreadable case once; later epochs leave it out."""
    for index, problem in unreadable:
        if index not in state.unreadable_cases:
            state.unreadable_cases.append(index)
            _warn(f"{problem}; the case is left out of training from now on")


def _warn(message: str) -> None:
    tqdm.write(f"hsort: warning: {message}", file=sys.stderr)


def _mean_latent_norm(model: HyperSORT) -> float:
    return float(model.latents.weight.detach().norm(dim=1).mean())


def _finish_epoch(model: HyperSORT, state: TrainingState, steps: int, seconds: float, progress: bool) -> None:
    """Close the epoch: one log row, and a fresh case order next time."""
    state.epoch += 1
    summed = state.epoch_sums["steps"]
    row = {"epoch": state.epoch, "steps": steps, **{key: state.epoch_sums[key] / summed if summed else math.nan for key in SUM_KEYS}}
    row.update(skipped_steps=state.skipped_in_epoch, latent_norm=_mean_latent_norm(model), seconds=round(seconds, 2))
    state.log_rows.append(row)
    state.epoch_order = []
    if progress:
        tqdm.write(f"epoch {state.epoch}: loss {row['loss']:.4f} (ce {row['cross_entropy']:.4f}, dice {row['dice']:.4f}) mean |λ| {row['latent_norm']:.4f}  {seconds:.0f}s")
