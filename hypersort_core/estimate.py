"""Before training: the time per epoch and the peak memory of a run, measured rather than computed.

One real training step (forward, backward and both optimizers, at the run's ROI and batch, on its device)
is timed, and the memory it takes is watched while it runs: on CUDA PyTorch's own peak counter, on the CPU
the process's resident memory, sampled.  A step too large for the machine is not taken: two small steps
first (a quarter and half the ROI's side) give the memory a step needs per voxel, and the run is refused
when the full step would exceed the free memory, before it is taken and before training starts.
"""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from hypersort_core.config import ConfigError, TrainConfig
from hypersort_core.data import read_dataset, select_labels
from hypersort_core.data.volumes import available_memory_bytes
from hypersort_core.device import resolve_device
from hypersort_core.model import HyperSORT
from hypersort_core.train import Trainer, build_optimizers, train_step

# On the CPU the smaller steps' resident memory under-predicts the full step: the allocator keeps what earlier steps
# freed, and the peak moves from the optimizer step to the backward pass as the ROI grows.  Measured on the 2-core,
# 24 GB machine (paper preset, B = 2): the line through 40³ and 80³ predicted 12.4 GiB at 168³, and the step was
# killed for memory at 24.4 GB.  Until the probes measure allocations rather than resident memory, the prediction
# that decides whether the full step may run is doubled there.
CPU_UNDER_PREDICTION = 2.0
GIB = 2**30
SAMPLE_SECONDS = 0.005  # how often the CPU's resident memory is read during a step


@dataclass
class Estimate:
    """What a run will take: per step and epoch, and at its peak; `available` is what the device has free."""

    device: str
    steps_per_epoch: int
    peak_bytes: float  # the training process (CPU) or the GPU at the peak of a step
    available_bytes: float | None
    step_seconds: float | None  # None: the step was not taken, its memory (predicted from smaller steps) does not fit

    @property
    def fits(self) -> bool:
        return self.available_bytes is None or self.peak_bytes <= self.available_bytes

    def check_fits(self, config: TrainConfig) -> None:
        """Refuse, in one line that says what to change, a run whose peak exceeds the free memory."""
        if self.fits:
            return
        roi = "x".join(map(str, config.preprocess.roi))
        raise ConfigError(
            f"training would need about {self.peak_bytes / GIB:.1f} GiB of {self.device} memory (--roi {roi}, --batch-size {config.batch_size}, "
            f"--preset {config.preset}) but {self.available_bytes / GIB:.1f} GiB is free; choose a smaller --roi or --batch-size "
            f"(or --preset small), or --force to start anyway"
        )

    def describe(self) -> str:
        memory = f"peak memory {self.peak_bytes / GIB:.1f} GiB"
        if self.available_bytes is not None:
            memory += f" of {self.available_bytes / GIB:.1f} GiB free"
        if self.step_seconds is None:
            return f"estimated {memory} on {self.device} (from smaller steps; the full step was not taken)"
        epoch = self.steps_per_epoch * self.step_seconds
        return f"estimated time per epoch on {self.device}: {format_duration(epoch)} ({self.steps_per_epoch} steps of {self.step_seconds:.2g} s); {memory}"


def estimate_fit(data: Path, config: TrainConfig) -> Estimate:
    """The estimate for `hsort fit DATA` with `config` in one process: its cases and labels as fit will read them."""
    dataset = read_dataset(data, config.layout, split=config.split)
    classes = select_labels(dataset, config.label).num_classes
    run_config = replace(config, model=replace(config.model, out_channels=classes))
    return estimate_training(run_config, len(dataset.cases), resolve_device(config.device))


def estimate_training(config: TrainConfig, cases: int, device: torch.device, processes: int = 1) -> Estimate:
    """Time one real step of `config` on `device` (train.train_step, the step training takes) and watch its
    memory; `cases` and `processes` give the steps per epoch.  config.model.out_channels must be the run's."""
    steps = math.ceil(cases / (config.batch_size * processes))
    model = HyperSORT(config.model, [str(index) for index in range(max(cases, config.batch_size))]).to(device)
    trainer = Trainer(model, build_optimizers(model, config, device), config, device)
    available = free_memory(device)

    def step(roi: tuple[int, ...]) -> tuple[float, float]:
        return measured_step(trainer, roi)

    smallest = 2 * config.model.size_multiple
    step((smallest,) * 3)  # optimizer states and one-time set-up, before anything is measured
    probes = [scaled_roi(config.preprocess.roi, fraction, config.model.size_multiple, smallest) for fraction in (0.25, 0.5)]
    (_, small_peak), (_, large_peak) = step(probes[0]), step(probes[1])
    predicted = extrapolate(math.prod(probes[0]), small_peak, math.prod(probes[1]), large_peak, math.prod(config.preprocess.roi))
    if device.type == "cpu":
        predicted *= CPU_UNDER_PREDICTION
    if available is not None and predicted > available:
        return Estimate(device_name(device), steps, predicted, available, None)
    seconds, peak = step(config.preprocess.roi)
    return Estimate(device_name(device), steps, peak, available, seconds)


def measured_step(trainer: Trainer, roi: tuple[int, ...]) -> tuple[float, float]:
    """Seconds and peak memory (bytes) of one training step on a random batch of this ROI."""
    config, device = trainer.config, trainer.device
    batch = {
        "index": torch.arange(config.batch_size) % trainer.model.latents.num_embeddings,
        "image": torch.randn(config.batch_size, config.model.in_channels, *roi),
        "label": torch.randint(0, config.model.out_channels, (config.batch_size, *roi)),
    }
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        train_step(trainer, batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    return seconds, memory.peak


def scaled_roi(roi: tuple[int, ...], fraction: float, multiple: int, smallest: int) -> tuple[int, ...]:
    """`roi` scaled by `fraction` on each side, to a valid size (a multiple of `multiple`, at least `smallest`)."""
    return tuple(max(smallest, round(side * fraction / multiple) * multiple) for side in roi)


def extrapolate(small_voxels: int, small_peak: float, large_voxels: int, large_peak: float, voxels: int) -> float:
    """The peak at `voxels`, on the line through two measured steps (activations grow with the voxels)."""
    if large_voxels == small_voxels:
        return large_peak
    per_voxel = max(0.0, (large_peak - small_peak) / (large_voxels - small_voxels))
    return large_peak + per_voxel * (voxels - large_voxels)


class PeakMemory:
    """The peak memory of a block: on CUDA, PyTorch's counter of the device's allocations; on the CPU, the
    process's resident memory, read every few milliseconds by a thread (PyTorch's CPU allocations have no counter)."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0.0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self.done = threading.Event()
        self.peak = resident_bytes()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *_) -> None:
        if self.device.type == "cuda":
            self.peak = float(torch.cuda.max_memory_reserved(self.device))
            return
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, resident_bytes())

    def sample(self) -> None:
        while not self.done.wait(SAMPLE_SECONDS):
            self.peak = max(self.peak, resident_bytes())


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
