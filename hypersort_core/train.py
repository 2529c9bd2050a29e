"""`hsort fit`: train the hyper-network and the latent table jointly.

Two Adam optimizers, as in the reference code: one for the hyper-network, one
(sparse, so only the cases in a batch move) for the latents.  Batches hold
several cases, each segmented by the UNet of its own latent.  Under torchrun,
several processes share each batch (distributed.py; _train_step says how their
gradients add up).  Ctrl-C, SIGTERM and the time budget stop at a step boundary
and leave a checkpoint to resume from.
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
    TrainingSet,
    default_cache_dir,
    fill_cache,
    prepare_cases,
    read_dataset,
    select_labels,
)
from hypersort_core.data.cache import check_array
from hypersort_core.distributed import World, derived_seed, joined
from hypersort_core.faults import os_error_of
from hypersort_core.latents import plot_latent_map, write_latents_csv
from hypersort_core.log import plot_progress, write_log_csv
from hypersort_core.loss import hypersort_loss
from hypersort_core.model import HyperSORT, plain_unet

CONFIG_NAME = "config.json"
SUM_KEYS = ("loss", "cross_entropy", "dice", "latent_l1")
MAX_NONFINITE_IN_A_ROW = 5  # skipped NaN/Inf steps in a row that mean training has diverged
LOADER_SEED = 1  # keeps the DataLoader's seeds apart from the process's own
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
    cache_dir: Path  # the prepared cases of these settings, reused by later runs
    signal: int | None = None  # with stopped == "interrupted": the signal that asked for the stop (SIGINT, SIGTERM)


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
            _say(f"hsort: {name}: stopping after this step and saving a checkpoint (continue later with --resume); "
                 "further Ctrl-C or SIGTERM are ignored until it is saved")

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


def write_config(run_dir: Path, config: TrainConfig, data: Path, case_ids: list[str], cache: Path | None = None) -> None:
    # Absolute, so that later commands find the dataset (and its prepared cases) from any working directory.
    cache = Path(cache or default_cache_dir()).resolve()
    payload = {"version": __version__, "data": str(Path(data).resolve()), "cache": str(cache), **config.to_dict(), "cases": case_ids}
    atomic_write_text(run_dir / CONFIG_NAME, json.dumps(payload, indent=2) + "\n")


def read_config(run_dir: Path) -> tuple[TrainConfig, Path]:
    """The settings and dataset path a run folder was made with."""
    payload = json.loads((run_dir / CONFIG_NAME).read_text())
    return TrainConfig.from_dict(payload), Path(payload["data"])


def run_cache_dir(run_dir: Path) -> Path:
    """The cache a run's cases were prepared in (the default cache for runs that did not record one)."""
    return Path(json.loads((Path(run_dir) / CONFIG_NAME).read_text()).get("cache") or default_cache_dir())


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
    payload = _resume_payload(run_dir, world) if resume else None
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (remove_interrupted_writes if resume else remove_checkpoints)(run_dir)
    with _full_disk_is_a_clear_error(run_dir):
        prepared, config = prepare_data(data, config, cache_dir, world, progress)
        case_ids = [case.case_id for case in prepared.cases]
        if world.is_main:
            write_config(run_dir, config, data, case_ids, cache_dir)
    if world.is_main and device.type == "cpu" and config.preset == "paper" and payload is None:
        steps = math.ceil(len(case_ids) / (config.batch_size * world.size))
        print(f"estimated time per epoch on this CPU: {steps * estimated_step_seconds(config) / 60:.1f} min ({steps} steps); --preset small is CPU-sized")

    model = initial_model(config, case_ids, device)
    optimizers = build_optimizers(model, config, device)
    state = restore_checkpoint(payload, model, optimizers) if payload else TrainingState(processes=world.size)
    _seed_this_process(payload, state, config, world)
    if payload and state.processes != world.size:
        _continue_with_other_process_count(state, config, world)
    stop = _StopFlag()
    with _full_disk_is_a_clear_error(run_dir):
        stopped = _train(model, optimizers, state, TrainingSet(prepared, config.augmentation()), config, device, run_dir, progress, world,
                         stop=stop, prepare_again=prepared.prepare_again)
    unreadable = [DataError(case_ids[index], "its cache became unreadable during training; left out from then on") for index in state.unreadable_cases]
    return FitResult(run_dir, case_ids, state.epoch, stopped, prepared.bad + unreadable, prepared.cache_dir, stop.signum)


def _resume_payload(run_dir: Path, world: World) -> dict:
    """The checkpoint to continue from: rank 0 picks it (setting a damaged one aside), the others read the same file."""
    found = resume_latest_checkpoint(run_dir) if world.is_main else None
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
        _warn(f"the run was trained by {state.processes} processes and continues with {world.size}: the effective batch changes "
              f"from {config.batch_size * state.processes} to {config.batch_size * world.size}")
    state.processes = world.size


def _train(model, optimizers, state, training_set, config, device, run_dir, progress, world: World, stop=None, prepare_again=None) -> str | None:
    """prepare_again(index): prepares a case whose cache entry is found damaged again (None when that worked, else the problem)."""
    autocast = autocast_for(config.precision, device)
    hypernet = world.synchronized(model.hypernet, device)
    stop = stop or _StopFlag()
    prepared_again: set[int] = set()  # each case is prepared again once at most
    started = time.monotonic() - state.elapsed_seconds
    budget = None if config.max_minutes is None else config.max_minutes * 60

    def checkpoint() -> None:
        """Every process's random state into rank 0's checkpoint; once this returns, the file is on disk."""
        state.elapsed_seconds = time.monotonic() - started
        rng = world.gather(rng_state())
        if world.is_main:
            _check_run_folder(run_dir)
            save_checkpoint(run_dir, model, optimizers, state, rng)
        world.barrier()

    def save_progress() -> None:
        checkpoint()
        if world.is_main:
            write_epoch_outputs(run_dir, model, state)

    with stop.installed():
        while state.epoch < config.epochs:
            if not state.epoch_order:
                _start_epoch(state, len(training_set), config.seed)
            global_batches = _global_batches(state, config.batch_size * world.size)
            # Each process takes its share of every batch (the shares differ in size by at most one case).
            shares = [np.array_split(batch, world.size)[world.rank].tolist() for batch in global_batches]
            # The loader's own generator keeps the global RNG (saved in checkpoints) untouched by resuming.
            loader = DataLoader(
                _SkipsUnreadableCases(training_set),
                batch_sampler=shares,
                num_workers=config.workers,
                generator=torch.Generator().manual_seed(world.seed(config.seed, state.epoch, LOADER_SEED)),
                collate_fn=_collate_readable,
                pin_memory=device.type == "cuda",  # page-locked batches: the copies to the GPU overlap compute
            )
            total = state.step_in_epoch + len(global_batches)
            bar = tqdm(loader, total=total, initial=state.step_in_epoch, desc=f"epoch {state.epoch + 1}/{config.epochs}", disable=not progress, leave=False)
            for batch, global_batch in zip(bar, global_batches):
                over_budget = budget is not None and time.monotonic() - started > budget
                step = _train_step(model, optimizers, batch, config, device, autocast, hypernet, world, global_batch, (stop.requested, over_budget))
                _leave_out_unreadable(state, step.unreadable, report=world.is_main, prepare_again=prepare_again, prepared_again=prepared_again)
                if step.cases:
                    _record_step(state, step, report=world.is_main)
                    bar.set_postfix(loss=f"{step.loss:.4f}", latent=f"{_mean_latent_norm(model):.4f}")
                state.step_in_epoch += 1
                state.cases_done_in_epoch += len(global_batch)
                if state.skipped_in_a_row >= MAX_NONFINITE_IN_A_ROW:
                    bar.close()
                    state.skipped_in_a_row = 0  # a resumed run gets a fresh allowance
                    save_progress()  # skipped steps never changed the model: this is the last good state
                    raise _diverged(state, run_dir)
                if step.stop:
                    bar.close()
                    save_progress()
                    return step.stop
            bar.close()
            _finish_epoch(model, state, total, time.monotonic() - started, progress)
            if world.is_main:
                write_epoch_outputs(run_dir, model, state)
            if state.epoch % config.checkpoint_every == 0 or state.epoch == config.epochs:
                checkpoint()
        if stop.requested:  # a signal during the last epoch's outputs: the checkpoint is written, nothing more runs
            return "interrupted"
    return None


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


@dataclass
class StepResult:
    """One training step as all processes took it together."""

    cases: int  # readable cases in the step, over all processes
    terms: dict[str, float]  # batch means of the loss terms (SUM_KEYS), over all processes
    stepped: bool  # False: the loss was NaN or Inf, no parameter changed
    unreadable: list[tuple[int, str]]  # cases found unreadable in this step, as (index, problem)
    stop: str | None  # "interrupted" or "time budget" when any process asked to stop after this step

    @property
    def loss(self) -> float:
        return self.terms["loss"]


def _train_step(model, optimizers, batch, config, device, autocast, hypernet=None, world: World = World(), global_batch=None, stop_flags=(False, False)) -> StepResult:
    """One optimizer step of all processes on their shares of a batch; a NaN or Inf loss anywhere takes none.

    Each process weighs its mean loss by its share of the batch (times the number of processes, which
    DistributedDataParallel divides by again), so the gradients are those of the whole batch's mean loss,
    exactly as one process with the whole batch would compute them.
    """
    hypernet = hypernet or model.hypernet
    image, label, latent = _inputs(model, batch, config, device)
    with autocast:
        logits = model.segment(image, hypernet(latent))
    terms = hypersort_loss(logits, label, latent, config.l1)
    local = len(batch["index"])
    unreadable_here = batch.get("unreadable", [])
    counts = [local, len(unreadable_here), *stop_flags]
    # One all-reduce (and one wait for the GPU) a step: the counts, and the loss sums, which are NaN or Inf
    # wherever any process's loss was (a blank case weighs 0 and adds 0).
    sums = torch.stack([terms.total, terms.cross_entropy, terms.dice, terms.latent_l1]).detach().double() * local
    summed = world.sum(torch.cat([torch.tensor(counts, dtype=torch.float64, device=device), sums])).tolist()
    cases, unreadable_anywhere, interrupted, over_budget = (int(value) for value in summed[:4])
    unreadable = [item for items in world.gather(unreadable_here) for item in items] if unreadable_anywhere else []
    for optimizer in optimizers.values():
        optimizer.zero_grad(set_to_none=True)
    stepped = cases > 0 and math.isfinite(summed[4])
    if stepped:
        (terms.total * (local * world.size / cases)).backward()
        lost = {index for index, _ in unreadable}
        rows = batch["index"].tolist() if global_batch is None else global_batch
        _share_latent_gradients(model, sorted(set(rows) - lost), world)
        for optimizer in optimizers.values():
            optimizer.step()
    means = {key: total / cases if cases else math.nan for key, total in zip(SUM_KEYS, summed[4:])}
    stop = "interrupted" if interrupted else "time budget" if over_budget else None
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
    number of processes once (the loss weighting in _train_step multiplied it in).
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
            item = self.training_set[index]
        except UNREADABLE as error:
            return {"unreadable": index, "problem": _unreadable_problem(self.training_set.cases[index], error)}
        if not torch.isfinite(item["image"]).all():  # a prepared volume overwritten with NaN: one skipped step per epoch otherwise
            case = self.training_set.cases[index]
            return {"unreadable": index, "problem": f"case {case.case_id}: {case.image_file} holds NaN or infinite values"}
        return item


def _unreadable_problem(case, error: Exception) -> str:
    """Name the case and the first of its cached files that no longer loads."""
    files = [path for path in (case.image_file, case.label_file, case.foreground_file) if path is not None]
    culprit, reason = next(((path, problem) for path in files if (problem := check_array(path))), ("its cache", None))
    if reason is None:  # numpy's own messages run on (and advise loading untrusted files with allow_pickle): first line only
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error).split(". ")[0].splitlines()[0]
    return f"case {case.case_id}: {culprit} is unreadable ({reason})"


def _collate_readable(items: list[dict]) -> dict:
    """Batch the readable items; list the unreadable ones apart, as (index, problem)."""
    readable = [item for item in items if "unreadable" not in item]
    batch = default_collate(readable) if readable else {"index": torch.empty(0, dtype=torch.long)}
    batch["unreadable"] = [(item["unreadable"], item["problem"]) for item in items if "unreadable" in item]
    return batch


def _leave_out_unreadable(state: TrainingState, unreadable: list[tuple[int, str]], report: bool, prepare_again=None, prepared_again=None) -> None:
    """A case found unreadable is prepared again from its source files, once (every process does, so that all
    keep the same case list); if that fails, or it is found unreadable again, it is reported once and later
    epochs leave it out."""
    prepared_again = set() if prepared_again is None else prepared_again
    for index, problem in unreadable:
        if index in state.unreadable_cases:
            continue
        if prepare_again is not None and index not in prepared_again:
            prepared_again.add(index)
            failure = prepare_again(index)
            if failure is None:
                if report:
                    _warn(f"{problem}; prepared it again from its source files")
                continue
            problem = f"{problem}; preparing it again failed ({failure})"
        state.unreadable_cases.append(index)
        if report:
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
