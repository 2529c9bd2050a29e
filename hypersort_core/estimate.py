"""Before training: the time per epoch and the peak memory of a run, measured rather than computed.

One real training step (forward, backward and both optimizers, at the run's ROI and batch, on its device)
is timed (the median of up to TIMED_STEPS of them), and the memory it takes is watched while it runs.  A step
too large for the machine is not taken: two smaller steps first (a quarter and half the ROI's side) give the
memory the backward pass needs per voxel, and the run is refused when the full step would exceed the free
memory, before it is taken.

The peak of a step is the larger of two phases: the end of the backward pass (the activations, which grow
with the voxels) and the optimizer step (Adam's temporaries for the hyper-network's head, which do not).
Small steps peak in the second, large ones in the first; so the probes measure the backward pass alone
(up to the optimizers' step) in *allocated* bytes, which, unlike resident memory, fall when memory is freed:
PyTorch's counters on CUDA, glibc's `mallinfo2` on the CPU.  Measured on the 2-core machine (paper preset,
B = 2): the backward pass allocates 4.2 KiB per voxel, on a line through 40³ and 80³ that gives 104³ within
0.2 %; the 40³ and 80³ steps' resident peaks had put the 168³ step at 12.4 GiB, the line puts it at 23 GiB.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import multiprocessing
import os
import statistics
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from hypersort_core.config import ConfigError, TrainConfig
from hypersort_core.data import read_dataset, select_labels
from hypersort_core.data.volumes import available_memory_bytes
from hypersort_core.device import resolve_device
from hypersort_core.model import HyperSORT
from hypersort_core.train import Trainer, build_optimizers, train_step

GIB = 2**30
# The full step is taken only when its predicted peak, with this margin, fits: a step that does not fit kills the
# process.  On the 2-core machine the prediction fell short of the step's resident peak by at most 15 % (small preset,
# 64³, batch 2: the allocator keeps more of what it freed), and was 5 % and 1 % over for the paper preset at 104³ and 128³.
PREDICTION_MARGIN = 1.25
SAMPLE_SECONDS = 0.005  # how often the CPU's memory is read during a step
# One step's time is not the usual one: on the 2-core machine the demo's estimate said 0.34, 0.74 and 0.87 s a step
# on three fresh clones, whose steps all took about 0.34 s.  So the step is timed again, up to TIMED_STEPS times in
# all while they cost under TIMING_SECONDS together, and the median is taken.
TIMED_STEPS = 3
TIMING_SECONDS = 5.0


@dataclass
class Estimate:
    """What a run will take: per step and epoch, and at its peak; `available` is what the device has free."""

    device: str
    steps_per_epoch: int
    peak_bytes: float  # one training process (CPU) or its GPU at the peak of a step
    available_bytes: float | None
    step_seconds: float | None  # None: the step was not taken, its memory (predicted from smaller steps) does not fit
    sharing: int = 1  # training processes that share this memory: all of them on the CPU, one per GPU

    @property
    def needed_bytes(self) -> float:
        return self.sharing * self.peak_bytes

    @property
    def fits(self) -> bool:
        return self.available_bytes is None or self.needed_bytes <= self.available_bytes

    def check_fits(self, config: TrainConfig) -> None:
        """Refuse, in one line that says what to change, a run whose peak exceeds the free memory."""
        if self.fits:
            return
        roi = "x".join(map(str, config.preprocess.roi))
        processes = f", {self.sharing} processes" if self.sharing > 1 else ""
        raise ConfigError(
            f"training would need about {self.needed_bytes / GIB:.1f} GiB of {self.device} memory (--roi {roi}, --batch-size {config.batch_size}, "
            f"--preset {config.preset}{processes}) but {self.available_bytes / GIB:.1f} GiB is free; choose a smaller --roi or --batch-size "
            f"(or --preset small{', fewer processes' if processes else ''}), or --force to start anyway"
        )

    def describe(self) -> str:
        memory = f"peak memory {self.peak_bytes / GIB:.1f} GiB"
        if self.sharing > 1:
            memory += f" per process, {self.needed_bytes / GIB:.1f} GiB for {self.sharing}"
        if self.available_bytes is not None:
            memory += f" of {self.available_bytes / GIB:.1f} GiB free"
        if self.step_seconds is None:
            return f"estimated {memory} on {self.device} (from smaller steps, with a {PREDICTION_MARGIN - 1:.0%} margin; the full step was not taken)"
        epoch = self.steps_per_epoch * self.step_seconds
        return f"estimated time per epoch on {self.device}: {format_duration(epoch)} ({self.steps_per_epoch} steps of {self.step_seconds:.2g} s); {memory}"


def estimate_fit(data: Path, config: TrainConfig, processes: int = 1) -> Estimate:
    """The estimate for `hsort fit DATA` with `config`: its cases and labels as fit will read them.

    For `--nproc N` the step is taken in a process of its own with the threads torchrun gives each training
    process (OMP_NUM_THREADS, 1 unless set), so that it is timed as they will run, and so that this process,
    which starts them, holds no GPU memory while they train."""
    if processes > 1:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(_estimate_as_one_of_several, data, config, processes).result()
    return _estimate_here(data, config, processes)


def _estimate_as_one_of_several(data: Path, config: TrainConfig, processes: int) -> Estimate:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    return _estimate_here(data, config, processes)


def _estimate_here(data: Path, config: TrainConfig, processes: int) -> Estimate:
    dataset = read_dataset(data, config.layout, split=config.split)
    classes = select_labels(dataset, config.label).num_classes
    run_config = replace(config, model=replace(config.model, out_channels=classes))
    return estimate_training(run_config, len(dataset.cases), resolve_device(config.device), processes)


def estimate_training(config: TrainConfig, cases: int, device: torch.device, processes: int = 1) -> Estimate:
    """Time one real step of `config` on `device` (train.train_step, the step training takes) and watch its
    memory; `cases` and `processes` give the steps per epoch.  config.model.out_channels must be the run's."""
    steps = math.ceil(cases / (config.batch_size * processes))
    sharing = processes if device.type == "cpu" else 1
    model = HyperSORT(config.model, [str(index) for index in range(max(cases, config.batch_size))]).to(device)
    trainer = Trainer(model, build_optimizers(model, config, device), config, device)
    available = free_memory(device)

    smallest = 2 * config.model.size_multiple
    measured_step(trainer, (smallest,) * 3)  # optimizer states and one-time set-up, before anything is measured
    probes = [scaled_roi(config.preprocess.roi, fraction, config.model.size_multiple, smallest) for fraction in (0.25, 0.5)]
    small, large = (measured_step(trainer, roi) for roi in probes)
    predicted = PREDICTION_MARGIN * predicted_peak(math.prod(probes[0]), small, math.prod(probes[1]), large, math.prod(config.preprocess.roi))
    if available is not None and sharing * predicted > available:
        return Estimate(device_name(device), steps, predicted, available, None, sharing)
    full = measured_step(trainer, config.preprocess.roi)
    return Estimate(device_name(device), steps, full.peak, available, typical_step_seconds(trainer, config.preprocess.roi, full.seconds), sharing)


def typical_step_seconds(trainer: Trainer, roi: tuple[int, ...], first: float) -> float:
    """The median time of the full step: `first`, and more steps while TIMED_STEPS cost under TIMING_SECONDS."""
    times = [first]
    while len(times) < TIMED_STEPS and sum(times) < TIMING_SECONDS:
        times.append(measured_step(trainer, roi).seconds)
    return statistics.median(times)


@dataclass(frozen=True)
class StepMemory:
    """One measured training step: its time, its peak (resident on the CPU, reserved on CUDA), and its allocations."""

    seconds: float
    peak: float
    allocated_before: float  # when the step began: weights, gradients, optimizer states
    backward_peak: float  # allocated, at most, up to the optimizers' step: the activations on top of the above
    allocated_peak: float  # allocated, at most, in the whole step

    @property
    def backward_growth(self) -> float:
        return self.backward_peak - self.allocated_before


def measured_step(trainer: Trainer, roi: tuple[int, ...]) -> StepMemory:
    """One training step on a random batch of this ROI, timed and with its memory watched."""
    config, device = trainer.config, trainer.device
    batch = {
        "index": torch.arange(config.batch_size) % trainer.model.latents.num_embeddings,
        "image": torch.randn(config.batch_size, config.model.in_channels, *roi),
        "label": torch.randint(0, config.model.out_channels, (config.batch_size, *roi)),
    }
    with PeakMemory(device) as memory:
        hooks = [optimizer.register_step_pre_hook(memory.mark_backward_end) for optimizer in trainer.optimizers.values()]
        start = time.perf_counter()
        train_step(trainer, batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    for hook in hooks:
        hook.remove()
    return StepMemory(seconds, memory.peak, memory.allocated_before, memory.backward_peak, memory.allocated_peak)


def predicted_peak(small_voxels: int, small: StepMemory, large_voxels: int, large: StepMemory, voxels: int) -> float:
    """The peak of a step of `voxels`: its backward pass on the line through two smaller ones, plus what the
    device holds beyond the allocations (resident libraries and freed memory kept; CUDA's cache), or the larger
    step's own peak where the optimizer's phase dominates."""
    growth = extrapolate(small_voxels, small.backward_growth, large_voxels, large.backward_growth, voxels)
    held_beyond_allocations = max(0.0, large.peak - large.allocated_peak)
    return max(large.peak, large.allocated_before + growth + held_beyond_allocations)


def scaled_roi(roi: tuple[int, ...], fraction: float, multiple: int, smallest: int) -> tuple[int, ...]:
    """`roi` scaled by `fraction` on each side, to a valid size (a multiple of `multiple`, at least `smallest`)."""
    return tuple(max(smallest, round(side * fraction / multiple) * multiple) for side in roi)


def extrapolate(small_voxels: int, small_value: float, large_voxels: int, large_value: float, voxels: int) -> float:
    """The value at `voxels` on the line through two measured steps (never falling as the voxels grow)."""
    if large_voxels == small_voxels:
        return large_value
    per_voxel = max(0.0, (large_value - small_value) / (large_voxels - small_voxels))
    return large_value + per_voxel * (voxels - large_voxels)


class PeakMemory:
    """The memory of a block: the peak it reached (resident on the CPU, reserved by PyTorch on CUDA) and its
    allocations, at the start and at most up to `mark_backward_end`.  On CUDA PyTorch counts; on the CPU a
    thread reads the process's memory every few milliseconds (PyTorch keeps no count of CPU allocations)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = self.allocated_peak = self.allocated_before = 0.0
        self.backward_peak: float | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.allocated_before = float(torch.cuda.memory_allocated(self.device))
            return self
        self.allocated_before = self.allocated_peak = allocated_bytes()
        self.peak = resident_bytes()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *_) -> None:
        if self.device.type == "cuda":
            self.peak = float(torch.cuda.max_memory_reserved(self.device))
            self.allocated_peak = float(torch.cuda.max_memory_allocated(self.device))
        else:
            self.done.set()
            self.thread.join()
            self.sample_once()
        if self.backward_peak is None:
            self.backward_peak = self.allocated_peak

    def mark_backward_end(self, *_) -> None:
        """An optimizer step begins: the allocations so far were the forward and backward passes'."""
        if self.backward_peak is None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
                self.allocated_peak = float(torch.cuda.max_memory_allocated(self.device))
            else:
                self.sample_once()
            self.backward_peak = self.allocated_peak

    def sample(self) -> None:
        while not self.done.wait(SAMPLE_SECONDS):
            self.sample_once()

    def sample_once(self) -> None:
        self.peak = max(self.peak, resident_bytes())
        self.allocated_peak = max(self.allocated_peak, allocated_bytes())


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.cache
def _mallinfo2():
    """glibc's mallinfo2 (2.33 and later), or None (another C library)."""
    try:
        function = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    function.restype = _MallInfo2
    return function


def allocated_bytes() -> float:
    """The bytes this process has allocated and not freed (glibc: in the heap plus mapped blocks); where the
    C library cannot say, its resident memory, which includes what was freed but kept."""
    mallinfo2 = _mallinfo2()
    if mallinfo2 is None:
        return resident_bytes()
    info = mallinfo2()
    return float(info.uordblks + info.hblkhd)


def resident_bytes() -> float:
    """This process's resident memory now (/proc/self/statm)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def free_memory(device: torch.device) -> float | None:
    """What the run may use: the GPU's free memory, or on the CPU this process's resident memory plus what the machine has available."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device)
    available = available_memory_bytes()
    return None if available is None else available + resident_bytes()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "this CPU"


def format_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"
