"""`hsort bench`: what the batched per-sample formulation costs, against the ways around it.

Four sections, compared in one table and saved to one JSON file:

* layers: every distinct conv and transposed-conv shape of the UNet at the ROI size, computed by `ours` (the
  public ops: Triton kernels on CUDA, their PyTorch reference elsewhere), `grouped` (the grouped-convolution
  trick, `*_reference`), `loop` (one F.conv3d per sample: the reference code's way) and `dense` (one weight
  shared by the batch: the same FLOPs without per-sample weights, the practical floor);
* head: the fused head (one [P, hidden] matrix) against one Linear + 5*tanh per UNet tensor (the reference's);
* step: a whole training step of `train.py` against the reference formulation, one case at a time
  (`reference.ReferenceTraining`);
* block: conv -> ReLU -> InstanceNorm with per-sample weights against the same block with one shared weight.

Every section runs forward and forward+backward, except the step.  FLOPs count the live taps only (27 for
a 3x3x3 conv, 8 for the k4 s2 transposed conv); bytes are the floor: input read, weights read and output
written once, in the dtype.  A backward costs twice its forward in both.  On CUDA float32 means TF32, as in
PyTorch's convolutions by default, and every rate is also a share of the device's measured ceilings: a
large copy for bandwidth and a large matmul for arithmetic.  Inputs are ordinary NCDHW tensors, the format
the UNet hands from one block to the next.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import math
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hypersort_core.atomic import atomic_write_text
from hypersort_core.config import PRESETS, ConfigError, TrainConfig
from hypersort_core.device import autocast_for, resolve_device
from hypersort_core.kernels import (
    per_sample_conv3d,
    per_sample_conv3d_reference,
    per_sample_conv_transpose3d,
    per_sample_conv_transpose3d_reference,
)
from hypersort_core.kernels._dispatch import interpreting, triton_runs
from hypersort_core.layers import HyperHead
from hypersort_core.model import HyperSORT, ModelConfig, conv_block, parameter_count, plain_unet
from hypersort_core.reference import ReferenceHyperNetwork, ReferenceTraining
from hypersort_core.train import Trainer, build_optimizers, train_step

SECTIONS = ("layers", "head", "step", "block")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
FORWARD, FORWARD_BACKWARD, STEP = "forward", "fwd+bwd", "step"
BACKWARD_COST = 2  # a backward does twice its forward's work: the input gradient and the weight gradient
COPY_ELEMENTS = 1 << 28  # 1 GiB of float32: far beyond any cache
MATMUL_SIDE = 8192


# ---------------------------------------------------------------------------------------------
# What to run


@dataclass(frozen=True)
class BenchSettings:
    device: torch.device
    preset: str
    size: int
    batches: tuple[int, ...]
    dtypes: tuple[str, ...]
    sections: tuple[str, ...]
    quick: bool

    @property
    def model(self) -> ModelConfig:
        return PRESETS[self.preset]["model"]

    def to_dict(self) -> dict:
        return {**asdict(self), "device": str(self.device)}


def bench_settings(
    device: str = "auto",
    size: int | None = None,
    batches: tuple[int, ...] | None = None,
    preset: str | None = None,
    dtypes: tuple[str, ...] | None = None,
    sections: tuple[str, ...] | None = None,
    quick: bool = False,
) -> BenchSettings:
    """Fill what was not given with the device's defaults: the paper's shapes on CUDA, CPU-sized ones elsewhere."""
    resolved = resolve_device(device)
    cuda = resolved.type == "cuda"
    settings = BenchSettings(
        device=resolved,
        preset=preset or ("paper" if cuda else "small"),
        size=size or (168 if cuda else 32),
        batches=tuple(batches or ((2, 4) if cuda else (2,))),
        dtypes=tuple(dtypes or (("float32", "bfloat16") if cuda else ("float32",))),
        sections=tuple(sections or SECTIONS),
        quick=quick,
    )
    _check(settings)
    return settings


def _check(settings: BenchSettings) -> None:
    if settings.preset not in PRESETS:
        raise ConfigError(f"unknown preset {settings.preset!r}; choose one of {', '.join(PRESETS)}")
    for given, known, what in [(settings.dtypes, DTYPES, "dtype"), (settings.sections, SECTIONS, "section")]:
        if unknown := [name for name in given if name not in known]:
            raise ConfigError(f"unknown {what} {', '.join(unknown)}; choose from {', '.join(known)}")
    if min(settings.batches) < 1:
        raise ConfigError(f"batch sizes must be at least 1, got {', '.join(map(str, settings.batches))}")
    multiple = settings.model.size_multiple
    if settings.size < multiple or settings.size % multiple:
        raise ConfigError(f"--size {settings.size}: the {settings.preset} UNet ({settings.model.levels} levels) needs a multiple of {multiple}")


# ---------------------------------------------------------------------------------------------
# Timing


@dataclass(frozen=True)
class Repeats:
    """Warm-up calls, then at least `least` timed calls, more while under `seconds`, never over `most`."""

    warmup: int
    least: int
    most: int
    seconds: float


FULL = Repeats(warmup=2, least=3, most=25, seconds=0.1)
QUICK = Repeats(warmup=1, least=2, most=2, seconds=0.0)


@dataclass(frozen=True)
class Timing:
    median: float
    p20: float
    p80: float
    repeats: int


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call; on CUDA between events around it, so the GPU work is what is timed."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    start_time = time.perf_counter()
    fn()
    return time.perf_counter() - start_time


def measure(fn: Callable[[], object], device: torch.device, repeats: Repeats) -> Timing:
    """Median and 20th/80th percentiles of fn's time, after warm-up calls (compilation, caches, autotuning)."""
    for _ in range(repeats.warmup):
        fn()
    _synchronize(device)
    times: list[float] = []
    while len(times) < repeats.most and (len(times) < repeats.least or sum(times) < repeats.seconds):
        times.append(_time_once(fn, device))
    p20, median, p80 = np.percentile(times, [20, 50, 80])
    return Timing(float(median), float(p20), float(p80), len(times))


# ---------------------------------------------------------------------------------------------
# The UNet's layer shapes


@dataclass(frozen=True)
class LayerShape:
    """One conv of the UNet: channels, kernel, stride, padding and input side; `count` layers share it."""

    transposed: bool
    c_in: int
    c_out: int
    kernel: int
    stride: int
    padding: int
    size: int
    count: int = 1

    @property
    def out_size(self) -> int:
        if self.transposed:
            return (self.size - 1) * self.stride - 2 * self.padding + self.kernel
        return (self.size + 2 * self.padding - self.kernel) // self.stride + 1

    @property
    def taps(self) -> int:
        """Weight taps that meet an input voxel per output voxel: k^3, or (k/s)^3 for a transposed conv."""
        return math.ceil(self.kernel / self.stride) ** 3 if self.transposed else self.kernel**3

    @property
    def name(self) -> str:
        where = f"@{self.size}" if self.size == self.out_size else f"{self.size}→{self.out_size}"
        return f"{'tconv' if self.transposed else 'conv'} {self.c_in}→{self.c_out} k{self.kernel} s{self.stride} {where} (×{self.count})"

    def weight_shape(self, batch: int) -> tuple[int, ...]:
        channels = (self.c_in, self.c_out) if self.transposed else (self.c_out, self.c_in)
        return (batch, *channels, *(self.kernel,) * 3)

    def forward_flops(self, batch: int) -> int:
        return 2 * self.c_in * self.c_out * self.taps * self.out_size**3 * batch

    def forward_bytes(self, batch: int, element_size: int) -> int:
        elements = self.c_in * self.size**3 + self.c_in * self.c_out * self.kernel**3 + self.c_out * self.out_size**3
        return elements * batch * element_size


def conv_shape(module: nn.Conv3d | nn.ConvTranspose3d, x: torch.Tensor) -> LayerShape:
    """The shape of a UNet conv as a forward hook meets it (cubic kernels, strides, paddings and inputs)."""
    return LayerShape(
        isinstance(module, nn.ConvTranspose3d),
        module.in_channels,
        module.out_channels,
        module.kernel_size[0],
        module.stride[0],
        module.padding[0],
        x.shape[2],
    )


def unet_layer_shapes(config: ModelConfig, size: int) -> list[LayerShape]:
    """The distinct conv shapes of the UNet at ROI size^3, in the order its forward pass meets them.

    Read from the UNet itself, run on the meta device, so strides, paddings and each level's side are the
    ones the model has, and the layers are those of `parameter_layout`.
    """
    counts: dict[LayerShape, int] = {}

    def record(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        shape = conv_shape(module, inputs[0])
        counts[shape] = counts.get(shape, 0) + 1

    with torch.device("meta"):
        unet = plain_unet(config)
        for module in unet.modules():
            if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
                module.register_forward_hook(record)
        unet(torch.empty(1, config.in_channels, size, size, size))
    return [replace(shape, count=count) for shape, count in counts.items()]


def one_of_each_kind(shapes: list[LayerShape]) -> list[LayerShape]:
    """The first shape of each kind (conv changing channels or not, strided conv, transposed conv): --quick."""
    firsts: dict[tuple, LayerShape] = {}
    for shape in shapes:
        firsts.setdefault((shape.transposed, shape.stride, shape.c_in == shape.c_out), shape)
    return list(firsts.values())


# ---------------------------------------------------------------------------------------------
# Measurements and their rows


@dataclass
class Row:
    """One measurement: a variant of a case, forward, forward+backward or a training step."""

    section: str
    case: str
    dtype: str
    batch: int
    mode: str
    variant: str
    flops: float | None
    bytes: float | None
    count: int = 1  # UNet layers the case stands for
    timing: Timing | None = None
    error: str | None = None
    samples_per_second: float | None = None
    peak_memory_bytes: int | None = None

    def to_dict(self, ceilings: dict) -> dict:
        values = {k: v for k, v in asdict(self).items() if k != "timing"}
        timing = self.timing
        values.update(median_s=None, p20_s=None, p80_s=None, repeats=None, tflops=None, gbps=None, pct_matmul=None, pct_copy=None)
        if timing is None:
            return values
        values.update(median_s=timing.median, p20_s=timing.p20, p80_s=timing.p80, repeats=timing.repeats)
        if self.flops:
            values["tflops"] = self.flops / timing.median / 1e12
            if matmul := ceilings.get("matmul_tflops", {}).get(self.dtype):
                values["pct_matmul"] = 100 * values["tflops"] / matmul
        if self.bytes:
            values["gbps"] = self.bytes / timing.median / 1e9
            if copy := ceilings.get("copy_gbps"):
                values["pct_copy"] = 100 * values["gbps"] / copy
        return values


def _work(mode: str, forward: float | None) -> float | None:
    """FLOPs or bytes of a mode from its forward's."""
    return None if forward is None else forward * (1 + BACKWARD_COST if mode == FORWARD_BACKWARD else 1)


def _run_measurement(row: Row, prepare: Callable[[], Callable[[], object]], device: torch.device, repeats: Repeats) -> Row:
    """Prepare the call and time it into row.  A failure (out of memory, a kernel that does not compile)
    becomes the row's error, shown in the table, so that one bad case does not cost the rest of the run."""
    try:
        row.timing = measure(prepare(), device, repeats)
    except Exception as error:
        message = str(error).strip().splitlines()
        row.error = f"{type(error).__name__}: {message[0] if message else ''}"
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def _forward_and_backward(fn: Callable[..., torch.Tensor | dict], inputs: list[torch.Tensor], mode: str) -> Callable[[], object]:
    """fn(*inputs) without autograd, or fn then the gradients of every input for a fixed random output gradient."""
    if mode == FORWARD:
        return torch.no_grad()(lambda: fn(*inputs))
    with torch.no_grad():
        outputs = fn(*inputs)
    outputs = list(outputs.values()) if isinstance(outputs, dict) else [outputs]
    grads = [torch.randn_like(output) for output in outputs]

    def forward_backward():
        result = fn(*inputs)
        return torch.autograd.grad(list(result.values()) if isinstance(result, dict) else [result], inputs, grads)

    return forward_backward


# ---------------------------------------------------------------------------------------------
# Sections


def _random(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, device=device) * scale).to(dtype).requires_grad_()


def _conv_variants(shape: LayerShape) -> dict[str, Callable[..., torch.Tensor]]:
    stride, padding = shape.stride, shape.padding
    if shape.transposed:
        op, grouped, plain = per_sample_conv_transpose3d, per_sample_conv_transpose3d_reference, F.conv_transpose3d
    else:
        op, grouped, plain = per_sample_conv3d, per_sample_conv3d_reference, F.conv3d
    return {
        "ours": lambda x, w, b: op(x, w, b, stride, padding),
        "grouped": lambda x, w, b: grouped(x, w, b, stride, padding),
        "loop": lambda x, w, b: torch.cat([plain(x[i : i + 1], w[i], b[i], stride=stride, padding=padding) for i in range(len(x))]),
        "dense": lambda x, w, b: plain(x, w, b, stride=stride, padding=padding),
    }


def layer_rows(shape: LayerShape, batch: int, dtype_name: str, device: torch.device, repeats: Repeats) -> list[Row]:
    """The four implementations of one layer shape, forward and forward+backward."""
    dtype = DTYPES[dtype_name]
    x = _random((batch, shape.c_in, *(shape.size,) * 3), dtype, device)
    weight = _random(shape.weight_shape(batch), dtype, device, scale=(shape.c_in * shape.taps) ** -0.5)
    bias = _random((batch, shape.c_out), dtype, device, scale=0.1)
    shared = [weight[0].detach().clone().requires_grad_(), bias[0].detach().clone().requires_grad_()]
    element_size = x.element_size()
    rows = []
    for mode in (FORWARD, FORWARD_BACKWARD):
        for variant, fn in _conv_variants(shape).items():
            inputs = [x, *shared] if variant == "dense" else [x, weight, bias]
            row = Row(
                "layers",
                shape.name,
                dtype_name,
                batch,
                mode,
                variant,
                _work(mode, shape.forward_flops(batch)),
                _work(mode, shape.forward_bytes(batch, element_size)),
                count=shape.count,
            )
            prepare = functools.partial(_forward_and_backward, fn, inputs, mode)
            rows.append(_run_measurement(row, prepare, device, repeats))
    return rows


def head_rows(config: ModelConfig, batch: int, dtype_name: str, device: torch.device, repeats: Repeats) -> list[Row]:
    """The fused head against one Linear + 5*tanh per UNet tensor, both on the batch's hidden vectors.

    Weights stay float32 as in training; bfloat16 runs under autocast, as `hsort fit` does.
    """
    params, hidden = parameter_count(config), config.hidden[-1]
    with device:  # built where it runs: initialising 166M weights on the CPU first takes seconds
        fused = HyperHead(hidden, params, scale=config.head_scale)
        per_tensor = ReferenceHyperNetwork(config)
    h = torch.randn(batch, hidden, device=device, requires_grad=True)
    variants = {
        "ours": (lambda h, *_: fused(h), [h, *fused.parameters()]),
        "per-tensor": (lambda h, *_: per_tensor.head_outputs(h), [h, *per_tensor.heads.parameters()]),
    }
    autocast = torch.autocast(device.type, dtype=DTYPES[dtype_name], enabled=dtype_name != "float32")
    output_size = torch.empty((), dtype=DTYPES[dtype_name]).element_size()
    forward_bytes = (params * hidden + params) * 4 + batch * params * output_size
    rows = []
    for mode in (FORWARD, FORWARD_BACKWARD):
        for variant, (fn, inputs) in variants.items():
            row = Row(
                "head", f"head {hidden}→{params:,}", dtype_name, batch, mode, variant, _work(mode, 2 * batch * params * hidden), _work(mode, forward_bytes)
            )
            rows.append(_run_measurement(row, functools.partial(_under_autocast, autocast, fn, inputs, mode), device, repeats))
    return rows


def _under_autocast(autocast: torch.autocast, fn: Callable[..., object], inputs: list[torch.Tensor], mode: str) -> Callable[[], object]:
    """_forward_and_backward with every call of fn under autocast."""
    with autocast:
        call = _forward_and_backward(fn, inputs, mode)

    def call_under_autocast():
        with autocast:
            return call()

    return call_under_autocast


def _precision(dtype_name: str, device: torch.device) -> str:
    """The `hsort fit --precision` that computes in this dtype."""
    if dtype_name == "bfloat16":
        return "bf16"
    return "tf32" if device.type == "cuda" else "fp32"


def step_rows(settings: BenchSettings, batch: int, dtype_name: str, repeats: Repeats) -> list[Row]:
    """One training step on `batch` cases: ours batched (train.py) against the reference, one case at a time."""
    device, size = settings.device, settings.size
    config = TrainConfig.from_preset(settings.preset)
    model = config.model
    images = torch.randn(batch, model.in_channels, size, size, size, device=device)
    labels = torch.randint(0, model.out_channels, (batch, size, size, size), device=device)
    config = replace(config, precision=_precision(dtype_name, device))
    autocast = autocast_for(config.precision, device)

    def ours() -> Callable[[], object]:
        with device:
            hypersort = HyperSORT(model, [f"case{i}" for i in range(batch)])
        trainer = Trainer(hypersort, build_optimizers(hypersort, config, device), config, device)
        data = {"image": images, "label": labels, "index": torch.arange(batch, device=device)}
        return lambda: train_step(trainer, data)

    def reference() -> Callable[[], object]:
        training = ReferenceTraining(model, batch, config.lr, config.latent_lr, config.latent_betas, config.l1, device)
        return lambda: training.step(images, labels, list(range(batch)), autocast)

    flops = _work(FORWARD_BACKWARD, sum(s.count * s.forward_flops(batch) for s in unet_layer_shapes(model, size)))
    rows = []
    for variant, build in [("ours", ours), ("reference", reference)]:
        row = Row("step", f"training step {settings.preset} @{size}", dtype_name, batch, STEP, variant, flops, None)
        rows.append(_step_row(row, build, device, repeats))
    return rows


def _step_row(row: Row, build: Callable[[], Callable[[], object]], device: torch.device, repeats: Repeats) -> Row:
    """Build a formulation (model and optimizers), time its steps, and note its throughput and peak memory."""
    _release_memory(device)
    _run_measurement(row, build, device, repeats)
    if row.timing is not None:
        row.samples_per_second = row.batch / row.timing.median
        if device.type == "cuda":
            row.peak_memory_bytes = torch.cuda.max_memory_allocated(device)
    return row


def _release_memory(device: torch.device) -> None:
    """Free what earlier measurements left, and start counting peak memory afresh."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def block_rows(shape: LayerShape, batch: int, dtype_name: str, device: torch.device, repeats: Repeats) -> list[Row]:
    """conv -> ReLU -> InstanceNorm(affine) as the UNet runs it (per-sample weights) and with one shared weight."""
    dtype, channels = DTYPES[dtype_name], shape.c_out
    x = _random((batch, shape.c_in, *(shape.size,) * 3), dtype, device)
    weight = _random(shape.weight_shape(batch), dtype, device, scale=(shape.c_in * shape.taps) ** -0.5)
    vectors = [_random((batch, channels), dtype, device, scale=0.1) for _ in range(3)]
    shared = nn.Sequential(nn.Conv3d(shape.c_in, channels, shape.kernel, shape.stride, shape.padding), nn.ReLU(), nn.InstanceNorm3d(channels, affine=True)).to(
        device, dtype
    )
    names = ("conv.weight", "conv.bias", "norm.weight", "norm.bias")

    def ours(x, *tensors):
        return conv_block(x, dict(zip(names, tensors)), "conv", "norm", stride=shape.stride)

    variants = {"ours": (ours, [x, weight, *vectors]), "shared": (lambda x, *_: shared(x), [x, *shared.parameters()])}
    rows = []
    for mode in (FORWARD, FORWARD_BACKWARD):
        for variant, (fn, inputs) in variants.items():
            row = Row(
                "block",
                f"block {shape.name}",
                dtype_name,
                batch,
                mode,
                variant,
                _work(mode, shape.forward_flops(batch)),
                _work(mode, shape.forward_bytes(batch, x.element_size())),
            )
            rows.append(_run_measurement(row, functools.partial(_forward_and_backward, fn, inputs, mode), device, repeats))
    return rows


# ---------------------------------------------------------------------------------------------
# Ceilings and environment


def measure_ceilings(device: torch.device, dtypes: tuple[str, ...], repeats: Repeats) -> dict:
    """Copy bandwidth (bytes read + written) and matmul rate per dtype, measured on this device."""
    if device.type != "cuda":
        return {}
    buffers = {"source": torch.rand(COPY_ELEMENTS, device=device)}
    buffers["target"] = torch.empty_like(buffers["source"])
    copy = measure(lambda: buffers["target"].copy_(buffers["source"]), device, repeats)
    buffers.clear()  # free 2 x 1 GB before the matmuls
    ceilings = {"copy_gbps": 2 * COPY_ELEMENTS * 4 / copy.median / 1e9, "matmul_tflops": {}}
    for name in dtypes:
        a, b = (torch.randn(MATMUL_SIDE, MATMUL_SIDE, device=device, dtype=DTYPES[name]) for _ in range(2))
        matmul = measure(lambda: a @ b, device, repeats)
        ceilings["matmul_tflops"][name] = 2 * MATMUL_SIDE**3 / matmul.median / 1e12
    return ceilings


def ops_implementation(device: torch.device) -> str:
    """What `ours` runs on this device: the dispatch rule of the public ops, asked directly."""
    if triton_runs("hsort bench", [torch.empty(1, device=device)], None):
        return "Triton kernels (interpreter)" if interpreting() else "Triton kernels"
    return "PyTorch reference (grouped conv, as `grouped`)"


def _package_version(name: str) -> str | None:
    """A package's version without importing it (importing Triton decides between compiling and interpreting)."""
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict:
    values = {
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {platform.machine()}, {torch.get_num_threads()} thread(s)",
        "torch": torch.__version__,
        "triton": _package_version("triton"),
        "python": platform.python_version(),
        "ours": ops_implementation(device),
        "HSORT_KERNELS": os.environ.get("HSORT_KERNELS", "auto"),
    }
    if device.type == "cuda":
        values.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(), float32_as_tf32=True, cudnn_benchmark=torch.backends.cudnn.benchmark)
    return values


@contextlib.contextmanager
def _tf32_on_cuda(device: torch.device) -> Iterator[None]:
    """float32 on CUDA as PyTorch's convolutions run it by default, TF32, matmuls included; restored afterwards."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


# ---------------------------------------------------------------------------------------------
# The run


def run_benchmark(settings: BenchSettings, out: Path | None = None, progress: Callable[[str], None] | None = None) -> dict:
    """Run the sections; the JSON report is rewritten after each case, so a run cut short keeps what it measured."""
    device, repeats = settings.device, QUICK if settings.quick else FULL
    say = progress or (lambda line: None)
    shapes = unet_layer_shapes(settings.model, settings.size)
    report = {
        "environment": environment(device),
        "settings": settings.to_dict(),
        "unet_parameters": parameter_count(settings.model),
        "layer_shapes": [{"name": s.name, **asdict(s), "out_size": s.out_size, "forward_gflop_per_sample": s.forward_flops(1) / 1e9} for s in shapes],
        "ceilings": {},
        "rows": [],
        "sections_done": [],
        "summary": [],
    }
    rows: list[Row] = []

    def save() -> None:
        report["rows"] = [row.to_dict(report["ceilings"]) for row in rows]
        report["summary"] = summarize(report["rows"])
        if out is not None:
            atomic_write_text(out, json.dumps(report, indent=1) + "\n")

    with _tf32_on_cuda(device):
        report["ceilings"] = measure_ceilings(device, settings.dtypes, repeats)
        for section in settings.sections:
            for dtype_name in settings.dtypes:
                for batch in settings.batches:
                    for group in _section_groups(section, settings, shapes, batch, dtype_name, repeats):
                        rows.extend(group)
                        say(_progress_line(group))
                        save()
            report["sections_done"].append(section)
    save()
    return report


def _section_groups(section: str, settings: BenchSettings, shapes: list[LayerShape], batch: int, dtype_name: str, repeats: Repeats) -> Iterator[list[Row]]:
    """The rows of one section for one dtype and batch, a case at a time."""
    device = settings.device
    if section == "layers":
        for shape in one_of_each_kind(shapes) if settings.quick else shapes:
            yield layer_rows(shape, batch, dtype_name, device, repeats)
    elif section == "head":
        yield head_rows(settings.model, batch, dtype_name, device, repeats)
    elif section == "step":
        yield step_rows(settings, batch, dtype_name, repeats)
    else:
        block = next(s for s in shapes if not s.transposed and s.stride == 1 and s.c_in == s.c_out)
        yield block_rows(block, batch, dtype_name, device, repeats)


def _progress_line(group: list[Row]) -> str:
    first = group[0]
    times = ", ".join(f"{row.mode} {row.variant} " + ("failed" if row.timing is None else f"{_ms(row.timing.median)} ms") for row in group)
    return f"[{first.section} {first.dtype} B={first.batch}] {first.case}: {times}"


# ---------------------------------------------------------------------------------------------
# Summary and table


def _geometric_mean(values: list[float], weights: list[int]) -> float:
    return math.exp(sum(w * math.log(v) for v, w in zip(values, weights)) / sum(weights))


def _times(rows: list[dict], section: str, mode: str) -> dict[tuple, dict[str, float]]:
    """Median seconds by (dtype, batch, case, count) and variant, for the rows that ran."""
    table: dict[tuple, dict[str, float]] = {}
    for row in rows:
        if row["section"] == section and row["mode"] == mode and row["median_s"] is not None:
            table.setdefault((row["dtype"], row["batch"], row["case"], row["count"]), {})[row["variant"]] = row["median_s"]
    return table


def summarize(rows: list[dict]) -> list[dict]:
    """The headline numbers: speed-ups over the layers, the head against the copy bandwidth, the step."""
    return [*_layer_summary(rows), *_head_summary(rows), *_step_summary(rows)]


def _layer_summary(rows: list[dict]) -> Iterator[dict]:
    """Per dtype and batch, forward+backward: geometric means over the UNet's conv layers, and their total time."""
    layers = _times(rows, "layers", FORWARD_BACKWARD)
    for dtype, batch in dict.fromkeys(key[:2] for key in layers):
        cases = [(count, t) for (d, b, _, count), t in layers.items() if (d, b) == (dtype, batch) and {"ours", "grouped", "dense"} <= t.keys()]
        if not cases:
            continue
        counts = [count for count, _ in cases]
        over_grouped, over_dense = (_geometric_mean([t[other] / t["ours"] for _, t in cases], counts) for other in ("grouped", "dense"))
        totals = {v: sum(count * t[v] for count, t in cases) for v in ("ours", "grouped", "dense")}
        yield {
            "name": "layers",
            "dtype": dtype,
            "batch": batch,
            "speedup_over_grouped": over_grouped,
            "speedup_over_dense": over_dense,
            "layers": sum(counts),
            "total_s": totals,
            "text": f"layers {dtype} B={batch} fwd+bwd, speed-up of ours (geometric mean over {sum(counts)} conv layers): "
            f"{over_grouped:.2f}× over grouped, {over_dense:.2f}× over dense (below 1: slower than the floor); "
            f"summed over the layers: ours {_ms(totals['ours'])}, grouped {_ms(totals['grouped'])}, dense {_ms(totals['dense'])} ms",
        }


def _head_summary(rows: list[dict]) -> Iterator[dict]:
    for row in rows:
        if row["section"] == "head" and row["mode"] == FORWARD_BACKWARD and row["variant"] == "ours" and row["gbps"]:
            share = f", {row['pct_copy']:.0f}% of the copy bandwidth" if row["pct_copy"] else ""
            yield {
                "name": "head",
                "dtype": row["dtype"],
                "batch": row["batch"],
                "gbps": row["gbps"],
                "pct_copy": row["pct_copy"],
                "text": f"head {row['dtype']} B={row['batch']} fwd+bwd: {_ms(row['median_s'])} ms, {row['gbps']:.3g} GB/s{share}",
            }


def _step_summary(rows: list[dict]) -> Iterator[dict]:
    for (dtype, batch, case, _), t in _times(rows, "step", STEP).items():
        if {"ours", "reference"} <= t.keys():
            speedup = t["reference"] / t["ours"]
            yield {
                "name": "step",
                "dtype": dtype,
                "batch": batch,
                "speedup_over_reference": speedup,
                "samples_per_second": {v: batch / t[v] for v in ("ours", "reference")},
                "text": f"{case} {dtype} B={batch}: ours {batch / t['ours']:.3g} samples/s, reference formulation "
                f"{batch / t['reference']:.3g} samples/s: {speedup:.2f}× faster",
            }


def _cell(value: float | None, digits: str = ".3g") -> str:
    return "" if value is None else format(value, digits)


def _ms(seconds: float) -> str:
    """Milliseconds with three significant digits, without exponents."""
    milliseconds = seconds * 1e3
    return f"{milliseconds:.0f}" if milliseconds >= 100 else f"{milliseconds:.3g}"


def format_report(report: dict, out: Path | None = None) -> str:
    """The header (device, versions, ceilings), one table with a line per case, and the summary."""
    env, settings, ceilings = report["environment"], report["settings"], report["ceilings"]
    lines = [
        f"hsort bench on {env['device_name']} | torch {env['torch']} | triton {env['triton'] or 'not installed'}"
        + (f" | CUDA {env['cuda']} | cuDNN {env['cudnn']}" if "cuda" in env else ""),
        f"preset {settings['preset']} ({report['unet_parameters']:,} UNet parameters), ROI {settings['size']}³; ours = public ops running {env['ours']}",
    ]
    if ceilings:
        rates = ", ".join(f"{name} {rate:.0f} TFLOP/s" for name, rate in ceilings["matmul_tflops"].items())
        lines.append(f"ceilings: copy {ceilings['copy_gbps']:.0f} GB/s; matmul {rates} (float32 as TF32)")
    lines += ["", _table(report["rows"]), ""]
    lines += [entry["text"] for entry in report["summary"]]
    if out is not None:
        lines.append(f"every measurement: {out}")
    return "\n".join(lines)


def _table(rows: list[dict]) -> str:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["section"], row["case"], row["dtype"], row["batch"], row["mode"]), []).append(row)
    header = [
        "section",
        "case",
        "dtype",
        "B",
        "mode",
        "ours ms",
        "p20–p80",
        "TFLOP/s",
        "GB/s",
        "%mm",
        "%copy",
        "others ms (speed-up of ours)",
        "samples/s, peak GiB",
    ]
    lines = [header]
    for (section, case, dtype, batch, mode), group in groups.items():
        ours, others = group[0], group[1:]
        spread = "" if ours["median_s"] is None else f"{_ms(ours['p20_s'])}–{_ms(ours['p80_s'])}"
        lines.append(
            [
                section,
                case,
                dtype,
                str(batch),
                mode,
                "failed" if ours["median_s"] is None else _ms(ours["median_s"]),
                spread,
                _cell(ours["tflops"]),
                _cell(ours["gbps"]),
                _cell(ours["pct_matmul"], ".0f"),
                _cell(ours["pct_copy"], ".0f"),
                ", ".join(_compared(ours, other) for other in others),
                "; ".join(_throughput(row) for row in group if row["samples_per_second"]),
            ]
        )
    failures = [
        f"  {row['section']} {row['case']} {row['dtype']} B={row['batch']} {row['mode']} {row['variant']}: {row['error']}" for row in rows if row["error"]
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines)
    return text + ("\nfailed measurements:\n" + "\n".join(failures) if failures else "")


def _compared(ours: dict, other: dict) -> str:
    if other["median_s"] is None:
        return f"{other['variant']} failed"
    ratio = f" ({other['median_s'] / ours['median_s']:.2f}×)" if ours["median_s"] else ""
    return f"{other['variant']} {_ms(other['median_s'])}{ratio}"


def _throughput(row: dict) -> str:
    memory = f" {row['peak_memory_bytes'] / 2**30:.1f}" if row["peak_memory_bytes"] else ""
    return f"{row['variant']} {row['samples_per_second']:.3g}{memory}"
