"""`hsort fit`: train the hyper-network and the latent table jointly.

Two Adam optimizers, as in the reference code: one for the hyper-network, one
(sparse, so only the cases in a batch move) for the latents.  Batches hold
several cases, each segmented by the UNet of its own latent.  Under torchrun,
several processes share each batch (distributed.py; train_step says how their
gradients add up).  Ctrl-C, SIGTERM and the time budget stop at a step boundary
and leave a checkpoint to resume from.
Faults cost as little as they can: a NaN or Inf loss skips its step (and a run
of them stops training with a checkpoint of the last good state), and a case
whose cache becomes unreadable is reported and left out.

Read top to bottom: `fit` prepares the data and the model, `train` runs the epochs,
`train_epoch` the steps of one, `train_step` one optimizer step; the helpers for
what can stop or disturb training, and for the run folder, come last.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from hypersort_core.checkpoint import (
    CHECKPOINT_NAME,
    NO_SPACE_ERRNOS,
    CheckpointError,
    TrainingState,
    checkpoint_paths,
    load_checkpoint,
    remove_checkpoints,
    remove_interrupted_writes,
    restore_checkpoint,
    restore_rng,
    resume_latest_checkpoint,
    rng_state,
    rng_states,
    save_checkpoint,
)
from hypersort_core.config import ConfigError, TrainConfig
from hypersort_core.data import (
    DataError,
    PreparedData,
    ReadableCases,
    TrainingSet,
    collate_readable,
    default_cache_dir,
    fill_cache,
    prepare_cases,
    read_dataset,
    select_labels,
)
from hypersort_core.device import autocast_for, resolve_device, use_precision
from hypersort_core.distributed import World, derived_seed, joined
from hypersort_core.faults import os_error_of
from hypersort_core.latents import plot_latent_map, write_latents_csv
from hypersort_core.log import plot_progress, write_log_csv
from hypersort_core.loss import hypersort_loss
from hypersort_core.misfit import LOSSES, SCORE_EVERY, case_losses, update_running_means
from hypersort_core.model import HyperSORT
from hypersort_core.run_folder import CONFIG_NAME, run_cache_dir, write_config

SUM_KEYS = ("loss", "cross_entropy", "dice", "latent_l1")
INTERRUPTED = "interrupted"  # why training stopped early: Ctrl-C or SIGTERM
TIME_BUDGET = "time budget"  # ... or --max-minutes
MAX_NONFINITE_IN_A_ROW = 5  # skipped NaN/Inf steps in a row that mean training has diverged
LOADER_SEED = 1  # keeps the DataLoader's seeds apart from the process's own


class TrainingDiverged(ConfigError):
    """The loss stayed NaN or Inf: the settings (most often a learning rate too high) need changing, not the code."""


@dataclass
class FitResult:
    run_dir: Path
    case_ids: list[str]
    epochs_done: int
    stopped: str | None  # None (finished), TIME_BUDGET or INTERRUPTED
    bad_cases: list[DataError]
    cache_dir: Path  # the prepared cases of these settings, reused by later runs
    signal: int | None = None  # with stopped == INTERRUPTED: the signal that asked for the stop (SIGINT, SIGTERM)


# ---------------------------------------------------------------------------------------------
# The run: from a dataset folder to a trained run folder


def fit(
    data: Path,
    run_dir: Path,
    config: TrainConfig,
    resume: bool = False,
    progress: bool = True,
    overwrite: bool = False,
    cache_dir: Path | None = None,
) -> FitResult:
    """Train HyperSORT on a dataset folder; everything lands in run_dir (see README: the run folder).

    Started by torchrun, every process calls this: they train as one (see distributed.py), and only
    rank 0 writes the run folder or prints.  cache_dir: where prepared cases are kept (default_cache_dir()).
    """
    config.validate()
    resolve_device(config.device)
    if cache_dir is None:
        cache_dir = run_cache_dir(run_dir) if resume and (Path(run_dir) / CONFIG_NAME).is_file() else default_cache_dir()
    with joined(config.device) as world:
        return _fit(world, Path(data), Path(run_dir), config, resume, progress and world.is_main, overwrite, Path(cache_dir))


def _fit(world: World, data: Path, run_dir: Path, config: TrainConfig, resume: bool, progress: bool, overwrite: bool, cache_dir: Path) -> FitResult:
    if not resume and not overwrite and any(path.exists() for path in checkpoint_paths(run_dir)):
        raise ConfigError(f"{run_dir} already holds a run: --resume continues it, --overwrite starts it again")
    device = world.device(config.device)
    use_precision(config.precision, device)
    payload = _resume_payload(run_dir, world) if resume else None
    world.on_main(lambda: _make_run_folder(run_dir, resume))
    with _full_disk_is_a_clear_error(run_dir):
        prepared, config = prepare_data(data, config, cache_dir, world, progress)
        case_ids = [case.case_id for case in prepared.cases]
        world.on_main(lambda: write_config(run_dir, config, data, case_ids, cache_dir))

    model = initial_model(config, case_ids, device)
    optimizers = build_optimizers(model, config, device)
    state = restore_checkpoint(payload, model, optimizers) if payload else TrainingState(processes=world.size)
    _seed_this_process(payload, state, config, world)
    if payload and state.processes != world.size:
        _continue_with_other_process_count(state, config, world)
    trainer = Trainer(model, optimizers, config, device, world, world.synchronized(model.hypernet, device))
    stop = _StopFlag()
    with _full_disk_is_a_clear_error(run_dir):
        stopped = train(trainer, state, TrainingSet(prepared, config.augmentation()), run_dir, progress, stop, prepared.prepare_again)
    unreadable = [DataError(case_ids[index], "its cache became unreadable during training; left out from then on") for index in state.unreadable_cases]
    return FitResult(run_dir, case_ids, state.epoch, stopped, prepared.bad + unreadable, prepared.cache_dir, stop.signum)


def prepare_data(data: Path, config: TrainConfig, cache_dir: Path, world: World = World(), progress: bool = True) -> tuple[PreparedData, TrainConfig]:
    """Read, check and preprocess the dataset; the output channels follow the chosen labels.

    With several processes, those of each machine prepare a share of the cases first (every machine
    then has all of them, on a shared file system or not), and then all read the whole cache.
    """
    dataset = read_dataset(data, config.layout, split=config.split)
    selection = select_labels(dataset, config.label)
    config = replace(config, model=replace(config.model, out_channels=selection.num_classes))
    if world.size > 1:
        share = dataset.cases[world.local_rank :: world.local_size]
        fill_cache(dataset, selection, config.preprocess, cache_dir, cases=share, workers=config.workers, progress=progress)
        world.barrier()
    prepared = prepare_cases(dataset, selection, config.preprocess, cache_dir, skip_bad=config.skip_bad, progress=progress, workers=config.workers)
    return prepared, config


def initial_model(config: TrainConfig, case_ids: list[str], device: torch.device) -> HyperSORT:
    """The untrained model of a run: the same on every process, since all seed alike."""
    torch.manual_seed(config.seed)
    return HyperSORT(config.model, case_ids).to(device)


def build_optimizers(model: HyperSORT, config: TrainConfig, device: torch.device) -> dict[str, torch.optim.Optimizer]:
    fused = device.type == "cuda"
    return {
        "hypernet": torch.optim.Adam(model.hypernet.parameters(), lr=config.lr, fused=fused),
        "latents": torch.optim.SparseAdam(model.latents.parameters(), lr=config.latent_lr, betas=config.latent_betas),
    }


def _make_run_folder(run_dir: Path, resume: bool) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (remove_interrupted_writes if resume else remove_checkpoints)(run_dir)


def _resume_payload(run_dir: Path, world: World) -> dict:
    """The checkpoint to continue from: rank 0 picks it (setting a damaged one aside), the others read the same file."""
    found = world.on_main(lambda: resume_latest_checkpoint(run_dir))
    chosen = world.broadcast(found[1] if found else None)
    return found[0] if found else load_checkpoint(chosen)


def _seed_this_process(payload: dict | None, state: TrainingState, config: TrainConfig, world: World) -> None:
    """Each process draws its own random crops: its saved random state, or a seed of its own."""
    saved = rng_states(payload) if payload else []
    if world.rank < len(saved):
        restore_rng(saved[world.rank])
    else:
        torch.manual_seed(world.seed(config.seed, state.epoch))


def _continue_with_other_process_count(state: TrainingState, config: TrainConfig, world: World) -> None:
    """A run may resume with more or fewer processes; its position is counted in cases, so only the batch changes."""
    if world.is_main:
        _warn(
            f"the run was trained by {state.processes} processes and continues with {world.size}: the effective batch changes "
            f"from {config.batch_size * state.processes} to {config.batch_size * world.size}"
        )
    state.processes = world.size


# ---------------------------------------------------------------------------------------------
# Epochs


@dataclass
class Trainer:
    """What every training step works with: the model, its two optimizers, the settings, where it runs.

    `hypernet` is the hyper-network as the processes share it (DistributedDataParallel under torchrun);
    by default the model's own."""

    model: HyperSORT
    optimizers: dict[str, torch.optim.Optimizer]
    config: TrainConfig
    device: torch.device
    world: World = field(default_factory=World)
    hypernet: torch.nn.Module | None = None

    def __post_init__(self) -> None:
        self.hypernet = self.hypernet or self.model.hypernet
        self.autocast = autocast_for(self.config.precision, self.device)


def train(
    trainer: Trainer,
    state: TrainingState,
    training_set: TrainingSet,
    run_dir: Path,
    progress: bool,
    stop: _StopFlag,
    prepare_again: Callable[[int], str | None] | None = None,
) -> str | None:
    """Train epoch after epoch until the last; returns why it stopped before (INTERRUPTED, TIME_BUDGET), or None.

    prepare_again(index): prepares a case whose cache entry is found damaged again (None when that worked, else the problem)."""
    clock = _Clock(state.elapsed_seconds, trainer.config.max_minutes)
    writer = _RunFolderWriter(run_dir, trainer, state, clock)
    unreadable = _UnreadableCases(prepare_again, report=trainer.world.is_main)
    with stop.installed():
        while state.epoch < trainer.config.epochs:
            stopped = train_epoch(trainer, state, training_set, writer, unreadable, stop, clock, progress)
            if stopped:
                return stopped
        if stop.requested:  # a signal during the last epoch's outputs: the checkpoint is written, nothing more runs
            return INTERRUPTED
    return None


def train_epoch(
    trainer: Trainer,
    state: TrainingState,
    training_set: TrainingSet,
    writer: _RunFolderWriter,
    unreadable: _UnreadableCases,
    stop: _StopFlag,
    clock: _Clock,
    progress: bool,
) -> str | None:
    """The rest of the current epoch (all of it unless resumed mid-epoch), then its log row, outputs and checkpoint."""
    config, world = trainer.config, trainer.world
    if not state.epoch_order:
        _start_epoch(state, len(training_set), config.seed)
    global_batches = _global_batches(state, config.batch_size * world.size)
    total = state.step_in_epoch + len(global_batches)
    bar = tqdm(
        _epoch_loader(trainer, state, training_set, global_batches),
        total=total,
        initial=state.step_in_epoch,
        desc=f"epoch {state.epoch + 1}/{config.epochs}",
        disable=not progress,
        leave=False,
    )
    with contextlib.closing(bar):
        for batch, global_batch in zip(bar, global_batches):
            step = train_step(trainer, batch, global_batch, (stop.requested, clock.over_budget()))
            unreadable.leave_out(state, step.unreadable)
            if step.cases:
                _record_step(state, step, report=world.is_main)
                bar.set_postfix(loss=f"{step.loss:.4f}", latent=f"{_mean_latent_norm(trainer.model):.4f}")
            state.step_in_epoch += 1
            state.cases_done_in_epoch += len(global_batch)
            if state.skipped_in_a_row >= MAX_NONFINITE_IN_A_ROW:
                state.skipped_in_a_row = 0  # a resumed run gets a fresh allowance
                writer.save_progress()  # skipped steps never changed the model: this is the last good state
                raise _diverged(state, writer.run_dir)
            if step.stop:
                writer.save_progress()
                return step.stop
    _finish_epoch(trainer.model, state, total, clock.elapsed(), progress)
    if state.epoch % SCORE_EVERY == 0 or state.epoch == config.epochs:
        _score_cases(trainer, state, training_set, progress)
    world.on_main(lambda: write_epoch_outputs(writer.run_dir, trainer.model, state))
    if state.epoch % config.checkpoint_every == 0 or state.epoch == config.epochs:
        writer.checkpoint()
    return None


def _score_cases(trainer: Trainer, state: TrainingState, training_set: TrainingSet, progress: bool) -> None:
    """Every case's label under the λ = 0 UNet and its own latent's, folded into the running means that
    rank the cases (misfit.py); each process scores a share.  A case whose cache cannot be read is left
    for training to report."""
    world, cases = trainer.world, training_set.cases
    if not state.scorings:
        state.running_losses = {name: [math.nan] * len(cases) for name in LOSSES}
        state.scorings = [0] * len(cases)
    share = [(index, cases[index]) for index in range(world.rank, len(cases), world.size) if index not in state.unreadable_cases]
    share = tqdm(share, desc=f"epoch {state.epoch}: scoring the labels", unit="case", leave=False, disable=not progress)
    losses = {}
    for part in world.gather(case_losses(trainer.model, share, trainer.config.preprocess, trainer.device, trainer.autocast)):
        losses.update(part)
    update_running_means(state.running_losses, state.scorings, losses)


def _start_epoch(state: TrainingState, n_cases: int, seed: int) -> None:
    """A fresh random case order (the same in every process), without the cases whose cache became unreadable."""
    generator = torch.Generator().manual_seed(derived_seed(seed, state.epoch))
    state.epoch_order = [index for index in torch.randperm(n_cases, generator=generator).tolist() if index not in state.unreadable_cases]
    if not state.epoch_order:
        raise DataError("the cache of every case became unreadable during training; nothing is left to train on")
    state.step_in_epoch, state.cases_done_in_epoch, state.skipped_in_epoch = 0, 0, 0
    state.epoch_sums = dict.fromkeys((*SUM_KEYS, "steps"), 0.0)  # "steps": how many finite steps the sums hold


def _global_batches(state: TrainingState, size: int) -> list[list[int]]:
    """The rest of the epoch's case order, in batches of all processes together."""
    rest = state.epoch_order[state.cases_done_in_epoch :]
    return [rest[i : i + size] for i in range(0, len(rest), size)]


def _epoch_loader(trainer: Trainer, state: TrainingState, training_set: TrainingSet, global_batches: list[list[int]]) -> DataLoader:
    """This process's share of every batch (the shares differ in size by at most one case), loaded in workers."""
    world = trainer.world
    shares = [np.array_split(batch, world.size)[world.rank].tolist() for batch in global_batches]
    return DataLoader(
        ReadableCases(training_set),
        batch_sampler=shares,
        num_workers=trainer.config.workers,
        # The loader's own generator keeps the global RNG (saved in checkpoints) untouched by resuming.
        generator=torch.Generator().manual_seed(world.seed(trainer.config.seed, state.epoch, LOADER_SEED)),
        collate_fn=collate_readable,
        pin_memory=trainer.device.type == "cuda",  # page-locked batches: the copies to the GPU overlap compute
    )


def _finish_epoch(model: HyperSORT, state: TrainingState, steps: int, seconds: float, progress: bool) -> None:
    """Close the epoch: one log row, and a fresh case order next time."""
    state.epoch += 1
    summed = state.epoch_sums["steps"]
    row = {"epoch": state.epoch, "steps": steps, **{key: state.epoch_sums[key] / summed if summed else math.nan for key in SUM_KEYS}}
    row.update(skipped_steps=state.skipped_in_epoch, latent_norm=_mean_latent_norm(model), seconds=round(seconds, 2))
    state.log_rows.append(row)
    state.epoch_order = []
    if progress:
        tqdm.write(
            f"epoch {state.epoch}: loss {row['loss']:.4f} (ce {row['cross_entropy']:.4f}, dice {row['dice']:.4f}) mean |λ| {row['latent_norm']:.4f}  {seconds:.0f}s"
        )


# ---------------------------------------------------------------------------------------------
# One step


@dataclass
class StepResult:
    """One training step as all processes took it together."""

    cases: int  # readable cases in the step, over all processes
    terms: dict[str, float]  # batch means of the loss terms (SUM_KEYS), over all processes
    stepped: bool  # False: the loss was NaN or Inf, no parameter changed
    unreadable: list[tuple[int, str]]  # cases found unreadable in this step, as (index, problem)
    stop: str | None  # INTERRUPTED or TIME_BUDGET when any process asked to stop after this step

    @property
    def loss(self) -> float:
        return self.terms["loss"]


def train_step(trainer: Trainer, batch: dict, global_batch: list[int] | None = None, stop_flags: tuple[bool, bool] = (False, False)) -> StepResult:
    """One optimizer step of all processes on their shares of a batch; a NaN or Inf loss anywhere takes none.

    Each process weighs its mean loss by its share of the batch (times the number of processes, which
    DistributedDataParallel divides by again), so the gradients are those of the whole batch's mean loss,
    exactly as one process with the whole batch would compute them.  global_batch: the case indices of
    the whole batch (default: this process's); stop_flags: (interrupted, over budget) in this process.
    """
    model, world, device = trainer.model, trainer.world, trainer.device
    image, label, latent = _inputs(model, batch, trainer.config, device)
    with trainer.autocast:
        logits = model.segment(image, trainer.hypernet(latent))
    terms = hypersort_loss(logits, label, latent, trainer.config.l1)
    local = len(batch["index"])
    unreadable_here = batch.get("unreadable", [])
    counts = [local, len(unreadable_here), *stop_flags]
    # One all-reduce (and one wait for the GPU) a step: the counts, and the loss sums, which are NaN or Inf
    # wherever any process's loss was (a blank case weighs 0 and adds 0).
    sums = torch.stack([terms.total, terms.cross_entropy, terms.dice, terms.latent_l1]).detach().double() * local
    summed = world.sum(torch.cat([torch.tensor(counts, dtype=torch.float64, device=device), sums])).tolist()
    cases, unreadable_anywhere, interrupted, over_budget = (int(value) for value in summed[:4])
    unreadable = [item for items in world.gather(unreadable_here) for item in items] if unreadable_anywhere else []
    for optimizer in trainer.optimizers.values():
        optimizer.zero_grad(set_to_none=True)
    stepped = cases > 0 and math.isfinite(summed[4])
    if stepped:
        (terms.total * (local * world.size / cases)).backward()
        lost = {index for index, _ in unreadable}
        rows = batch["index"].tolist() if global_batch is None else global_batch
        _share_latent_gradients(model, sorted(set(rows) - lost), world)
        for optimizer in trainer.optimizers.values():
            optimizer.step()
    means = {key: total / cases if cases else math.nan for key, total in zip(SUM_KEYS, summed[4:])}
    stop = INTERRUPTED if interrupted else TIME_BUDGET if over_budget else None
    return StepResult(cases, means, stepped, unreadable, stop)


def _inputs(model: HyperSORT, batch: dict, config: TrainConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images, labels and latents of this process's share; a process with no case this step (the end of an
    epoch, unreadable files) runs one blank case of weight 0, since every process must take part in the step."""
    if len(batch["index"]):
        latent = model.latents(batch["index"].to(device))
        return batch["image"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True), latent
    roi, dtype = config.preprocess.roi, model.latents.weight.dtype
    image = torch.zeros(1, model.config.in_channels, *roi, dtype=dtype, device=device)
    return image, torch.zeros(1, *roi, dtype=torch.long, device=device), torch.zeros(1, model.config.latent_dim, dtype=dtype, device=device)


def _share_latent_gradients(model: HyperSORT, rows: list[int], world: World) -> None:
    """Give every process the gradient of every latent in the batch, so that all take the same SparseAdam step.

    A case's latent gets its gradient only in the process whose share holds it; DistributedDataParallel
    would average it with the others' zeros and shrink it by the number of processes.  Instead each
    process adds its rows into one [rows, d] block, the blocks are summed, and the sum is divided by the
    number of processes once (the loss weighting in train_step multiplied it in).
    """
    weight = model.latents.weight
    position = torch.tensor(rows, device=weight.device)
    block = torch.zeros(len(rows), weight.shape[1], device=weight.device, dtype=weight.dtype)
    if weight.grad is not None:
        grad = weight.grad.coalesce()
        block.index_add_(0, torch.searchsorted(position, grad.indices()[0]), grad.values())
    world.sum(block).div_(world.size)
    weight.grad = torch.sparse_coo_tensor(position[None], block, weight.shape, is_coalesced=True, check_invariants=False)  # rows: sorted, unique


def _record_step(state: TrainingState, step: StepResult, report: bool) -> None:
    """Add a taken step to the epoch's sums; count and report a skipped one."""
    if step.stepped:
        for key in SUM_KEYS:
            state.epoch_sums[key] += step.terms[key]
        state.epoch_sums["steps"] += 1
        state.skipped_in_a_row = 0
        return
    state.skipped_in_epoch += 1
    state.skipped_in_a_row += 1
    if report:
        _warn(f"epoch {state.epoch + 1}, step {state.step_in_epoch + 1}: the loss is {step.loss}; step skipped ({state.skipped_in_a_row} in a row)")


# ---------------------------------------------------------------------------------------------
# What stops or disturbs training: signals, the time budget, NaN losses, unreadable cases


class _StopFlag:
    """Ctrl-C (SIGINT) or SIGTERM (torchrun, a batch scheduler) asks to stop after the current step and
    save a checkpoint.  Further signals while that happens are ignored (and said so): a second Ctrl-C
    must not throw away the checkpoint being written.  Once the context is left, signals act as before
    (the CLI exits with 128 + the first signal's number: 130 for SIGINT, 143 for SIGTERM)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None  # the first signal received

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {number: signal.getsignal(number) for number in self.SIGNALS}

        def request(signum, frame):
            name = signal.Signals(signum).name
            if self.requested:
                _say(f"hsort: {name} ignored: still finishing the step and saving the checkpoint; it is on disk before hsort exits")
                return
            self.requested, self.signum = True, signum
            _say(
                f"hsort: {name}: stopping after this step and saving a checkpoint (continue later with --resume); "
                "further Ctrl-C or SIGTERM are ignored until it is saved"
            )

        for number in self.SIGNALS:
            signal.signal(number, request)
        try:
            yield
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)


def _say(message: str) -> None:
    """A line on stderr from a signal handler (no tqdm lock: the handler may interrupt a tqdm write)."""
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(f"\n{message}\n")
        sys.stderr.flush()


class _Clock:
    """Training time, counting the earlier sessions of a resumed run, against the --max-minutes budget."""

    def __init__(self, elapsed_before: float, max_minutes: float | None) -> None:
        self.started = time.monotonic() - elapsed_before
        self.budget = None if max_minutes is None else max_minutes * 60

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def over_budget(self) -> bool:
        return self.budget is not None and self.elapsed() > self.budget


def _diverged(state: TrainingState, run_dir: Path) -> TrainingDiverged:
    return TrainingDiverged(
        f"training stopped: the loss was NaN or Inf for {MAX_NONFINITE_IN_A_ROW} steps in a row (epoch {state.epoch + 1}); "
        f"the last good state is in {run_dir / CHECKPOINT_NAME}; a lower --lr usually helps"
    )


class _UnreadableCases:
    """A case found unreadable is prepared again from its source files, once (every process does, so that all
    keep the same case list); if that fails, or it is found unreadable again, it is reported once and later
    epochs leave it out."""

    def __init__(self, prepare_again: Callable[[int], str | None] | None, report: bool) -> None:
        self.prepare_again = prepare_again
        self.report = report
        self.prepared_again: set[int] = set()

    def leave_out(self, state: TrainingState, unreadable: list[tuple[int, str]]) -> None:
        for index, problem in unreadable:
            if index in state.unreadable_cases:
                continue
            if self.prepare_again is not None and index not in self.prepared_again:
                self.prepared_again.add(index)
                failure = self.prepare_again(index)
                if failure is None:
                    if self.report:
                        _warn(f"{problem}; prepared it again from its source files")
                    continue
                problem = f"{problem}; preparing it again failed ({failure})"
            state.unreadable_cases.append(index)
            if self.report:
                _warn(f"{problem}; the case is left out of training from now on")


def _warn(message: str) -> None:
    tqdm.write(f"hsort: warning: {message}", file=sys.stderr)


def _mean_latent_norm(model: HyperSORT) -> float:
    return float(model.latents.weight.detach().norm(dim=1).mean())


# ---------------------------------------------------------------------------------------------
# The run folder while training runs


@dataclass
class _RunFolderWriter:
    """Checkpoints and per-epoch outputs: rank 0 writes, every process takes part."""

    run_dir: Path
    trainer: Trainer
    state: TrainingState
    clock: _Clock

    def checkpoint(self) -> None:
        """Every process's random state into rank 0's checkpoint; once this returns, the file is on disk."""
        world = self.trainer.world
        self.state.elapsed_seconds = self.clock.elapsed()
        rng = world.gather(rng_state())
        world.on_main(lambda: self._save_checkpoint(rng))

    def _save_checkpoint(self, rng: list) -> None:
        _check_run_folder(self.run_dir)
        save_checkpoint(self.run_dir, self.trainer.model, self.trainer.optimizers, self.state, rng)

    def save_progress(self) -> None:
        """A checkpoint and the per-epoch files, when training stops mid-epoch."""
        self.checkpoint()
        self.trainer.world.on_main(lambda: write_epoch_outputs(self.run_dir, self.trainer.model, self.state))


def write_epoch_outputs(run_dir: Path, model: HyperSORT, state: TrainingState) -> None:
    """The per-epoch files of the run folder, each replaced atomically."""
    _check_run_folder(run_dir)
    latents = model.latents.weight.detach().float().cpu().numpy()
    write_latents_csv(run_dir, model.case_ids, latents)
    plot_latent_map(run_dir, model.case_ids, latents, state.epoch)
    if state.log_rows:
        write_log_csv(run_dir, state.log_rows)
        plot_progress(run_dir, state.log_rows)


class RunFolderGone(CheckpointError):
    """The run folder was deleted, moved or emptied while training ran: nothing more is written (a half folder would follow)."""


def _check_run_folder(run_dir: Path) -> None:
    """Before writing into the run folder: it must still be there, with its config.json (atomic writes create
    missing parent folders, which would leave a half run folder that neither --resume nor a new fit accepts)."""
    if not run_dir.is_dir():
        raise RunFolderGone(f"{run_dir}: the run folder vanished during training (deleted or moved?); stopped without writing anything")
    if not (run_dir / CONFIG_NAME).is_file():
        raise RunFolderGone(f"{run_dir}: {CONFIG_NAME} vanished from the run folder during training; stopped without writing anything")


@contextlib.contextmanager
def _full_disk_is_a_clear_error(run_dir: Path) -> Iterator[None]:
    """A full disk while writing the run folder: one line naming the file, not a traceback.
    Every write is atomic, so the checkpoints already on disk stay as they were."""
    try:
        yield
    except (OSError, RuntimeError) as error:  # RuntimeError: torch's zip writer wraps the OSError of a failed write
        found = os_error_of(error)
        if found is None or found.errno not in NO_SPACE_ERRNOS:
            raise
        raise CheckpointError(f"{found.filename or run_dir}: no space left on the device; the checkpoints already written are intact") from error
