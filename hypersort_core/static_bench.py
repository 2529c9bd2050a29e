"""`hsort bench --static`: what the kernels of one training step would cost on a GPU that is not here.

Triton compiles for a GPU ahead of time on any machine (`triton.compile(..., target=GPUTarget("cuda", 90, 32))`)
and its wheel ships `cuobjdump`, so the machine code an H100 would run can be read and counted on the CPU:

1. *Capture*: the real launchers of the per-sample convs and the head run on `meta` tensors (no data, no device)
   for every layer of the UNet, in the order of a training step: head forward, UNet forward, UNet backward
   (input gradient, weight gradient, from the last layer to the first), head backward.  Each kernel launch is
   recorded instead of run, with its grid and arguments.
2. *Specialise*: Triton's own argument binder turns the arguments into the signature, constexprs and
   divisibility hints a GPU run would compile (integers equal to 1 become constants, pointers and integers
   divisible by 16 get the hint), so the kernel compiled here is the one a GPU run compiles.
3. *Compile and read*: every distinct specialisation is compiled for the target; the log of the `ptxas -v` run
   Triton makes gives the spill stores, `cuobjdump -res-usage` the registers and stack frame, `cuobjdump -sass`
   the instructions.  The main loop is the backward branch whose body holds the most tensor-core instructions
   (HGMMA: wgmma on Hopper, HMMA: mma.sync), the shortest of them (a TMA wait's out-of-line retry jumps back
   into the loop from after its end, which looks like a longer loop around the same instructions), or, without
   any, the longest loop holding FFMAs.
4. *Bound*: a kernel cannot finish before its SMs have issued its instructions.  Each SM's four schedulers issue
   at most one warp instruction per clock, so

       issue-bound time >= programs x warps x (trip count x loop instructions + prologue) / (SMs x 4 x clock)

   where the prologue is the straight code before the first branch (always executed) and the trip count comes
   from the launch's own arguments (`TRIP_COUNTS`, read from each kernel's source).  Beside it the roofline
   floor of the same launch: its useful FLOPs at the tensor-core peak and its least memory traffic (inputs
   read, output written once) at the memory bandwidth, whichever is longer.

The bound leaves out memory latency, caches, bank conflicts, launch overheads and the tail of the last wave; a
GPU can only be slower than it.  The device figures (`DEVICES`) are the vendors' datasheet peaks.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from hypersort_core.atomic import atomic_write_text
from hypersort_core.benchmark import conv_shape
from hypersort_core.config import PRESETS, ConfigError
from hypersort_core.kernels._dispatch import interpreting
from hypersort_core.kernels.conv_shapes import conv_output_size
from hypersort_core.model import ModelConfig, parameter_count, plain_unet

ARCHES = {"sm_90": 90, "sm_80": 80}
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
ISSUE_PER_CLOCK = 4  # warp instructions one SM issues per clock: one per scheduler (four per SM since Volta)
WARP_THREADS = 32


@dataclass(frozen=True)
class Device:
    """The figures of one GPU that bound a kernel; peaks are dense (no sparsity)."""

    name: str
    arch: int
    multiprocessors: int
    boost_ghz: float
    bf16_tflops: float
    tf32_tflops: float
    memory_tbps: float
    shared_kib_per_sm: int  # usable by thread blocks
    registers_per_sm: int
    max_threads_per_sm: int
    max_blocks_per_sm: int
    source: str

    def peak_tflops(self, dtype: str) -> float:
        return self.bf16_tflops if dtype == "bfloat16" else self.tf32_tflops


DEVICES = {
    "H100": Device(
        "H100 SXM5 80GB",
        90,
        132,
        1.98,
        989.4,
        494.7,
        3.35,
        227,
        65536,
        2048,
        32,
        "NVIDIA H100 Tensor Core GPU datasheet (SXM5); Hopper tuning guide (228 KB shared per SM, 227 per block)",
    ),
    "H200": Device(
        "H200 SXM 141GB", 90, 132, 1.98, 989.4, 494.7, 4.8, 227, 65536, 2048, 32, "NVIDIA H200 Tensor Core GPU datasheet (SXM); same GH100 SMs as the H100"
    ),
    "A100": Device(
        "A100 SXM4 80GB",
        80,
        108,
        1.41,
        312.0,
        156.0,
        2.039,
        163,
        65536,
        2048,
        32,
        "NVIDIA A100 Tensor Core GPU datasheet (SXM4 80GB); Ampere tuning guide (164 KB shared per SM)",
    ),
}
DEFAULT_DEVICES = {90: ("H100", "H200"), 80: ("A100",)}


# ---------------------------------------------------------------------------------------------
# What one training step launches


@dataclass(frozen=True)
class Layer:
    """One conv of the UNet as a training step meets it."""

    name: str
    transposed: bool
    c_in: int
    c_out: int
    kernel: int
    stride: int
    padding: int
    in_size: int
    needs_input_grad: bool

    @property
    def out_size(self) -> int:
        if self.transposed:
            return (self.in_size - 1) * self.stride - 2 * self.padding + self.kernel
        return conv_output_size((self.in_size,) * 3, (self.kernel,) * 3, (self.stride,) * 3, (self.padding,) * 3)[0]

    @property
    def live_taps(self) -> int:
        """Weight taps that meet an input voxel per output voxel (k^3, or (k/s)^3 for a transposed conv)."""
        return math.ceil(self.kernel / self.stride) ** 3 if self.transposed else self.kernel**3

    def flops(self, batch: int) -> int:
        """Useful FLOPs of the forward, equal to those of each of its two gradients."""
        return 2 * batch * self.c_in * self.c_out * self.live_taps * self.out_size**3


def unet_layers(config: ModelConfig, size: int) -> list[Layer]:
    """Every conv of the UNet at ROI size^3, in forward order, read from the UNet itself on the meta device."""
    layers: list[Layer] = []

    def recorder(name: str):
        def record(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            shape = conv_shape(module, inputs[0])
            layers.append(
                Layer(name, shape.transposed, shape.c_in, shape.c_out, shape.kernel, shape.stride, shape.padding, shape.size, needs_input_grad=bool(layers))
            )

        return record

    with torch.device("meta"):
        unet = plain_unet(config)
        for name, module in unet.named_modules():
            if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
                module.register_forward_hook(recorder(name))
        unet(torch.empty(1, config.in_channels, size, size, size))
    return layers


@dataclass
class Launch:
    """One kernel launch of the step: where it comes from, its grid and arguments, and its useful work."""

    layer: str
    role: str
    kernel: Callable = field(repr=False)
    grid: tuple[int, int, int]
    args: tuple = field(repr=False)
    kwargs: dict = field(repr=False)
    flops: float = 0.0
    bytes: float = 0.0
    shape: dict | None = None  # the layer's geometry, as `hsort bench` names its layer cases

    @property
    def programs(self) -> int:
        return math.prod(self.grid)

    @property
    def kernel_name(self) -> str:
        return self.kernel.fn.__name__


@contextlib.contextmanager
def _recording(modules, launches: list[Launch], labels: dict) -> Iterator[None]:
    """Every `kernel[grid](...)` of the modules' kernels appends a Launch (labelled from `labels`) instead of running."""
    from triton.runtime.jit import JITFunction

    kernels = [k for m in modules for k in vars(m).values() if isinstance(k, JITFunction) and k.fn.__name__.endswith("_kernel")]

    def recorder(kernel):
        def run(*args, grid, warmup, **kwargs):
            grid = tuple(grid) + (1,) * (3 - len(grid))
            launches.append(Launch(labels["layer"], labels["role"], kernel, grid, args, kwargs))

        return run

    for kernel in kernels:
        kernel.run = recorder(kernel)
    try:
        yield
    finally:
        for kernel in kernels:
            del kernel.run


def capture_training_step(config: ModelConfig, size: int, batch: int, dtype: str, arch: int = 90) -> list[Launch]:
    """The kernel launches of one HyperSORT training step, from the real launchers on meta tensors.

    The launchers are called as the autograd Functions call them (channels-last activations, the layer's own
    weight layout), so block sizes, grids and specialisation are those of a GPU run of compute capability
    `arch` (which decides, for one, whether the TMA kernels run); the UNet's activations and weights take
    `dtype`, as under `hsort fit --precision bf16` (autocast) or tf32.
    """
    from hypersort_core.kernels import hyper_head_triton as head
    from hypersort_core.kernels import per_sample_conv3d_triton as conv

    torch_dtype = DTYPES[dtype]
    element = torch.empty((), dtype=torch_dtype).element_size()
    layers = unet_layers(config, size)
    launches: list[Launch] = []
    labels = {"layer": "", "role": ""}

    def meta(*shape: int, dtype: torch.dtype = torch_dtype) -> torch.Tensor:
        return torch.empty(shape, device="meta", dtype=dtype)

    def activation(channels: int, side: int) -> torch.Tensor:  # channels-last [B, D, H, W, C], as the Functions hand on
        return meta(batch, channels, side, side, side).contiguous(memory_format=torch.channels_last_3d).permute(0, 2, 3, 4, 1)

    def run(layer: str, role: str, call: Callable[[], object], flops: float, traffic: float) -> None:
        first = len(launches)
        labels.update(layer=layer, role=role)
        call()
        shape = next(
            ({k: v for k, v in asdict(candidate).items() if k not in ("name", "needs_input_grad")} for candidate in layers if candidate.name == layer), None
        )
        programs = sum(launch.programs for launch in launches[first:])
        for launch in launches[first:]:  # a role run as several launches (float32 TMA weight gradients) shares its floor out
            share = launch.programs / programs
            launch.flops, launch.bytes, launch.shape = flops * share, traffic * share, shape

    hidden, params = config.hidden[-1], parameter_count(config)
    h, w_head, b_head = meta(batch, hidden, dtype=torch.float32), meta(params, hidden, dtype=torch.float32), meta(params, dtype=torch.float32)
    head_bytes = 4 * params * hidden + batch * params * element
    with _recording((conv, head), launches, labels), conv.meta_tensors_stand_for(divmod(arch, 10)):
        run("head", "forward", lambda: head.hyper_head_forward(h, w_head, b_head, config.head_scale, torch_dtype), 2 * batch * params * hidden, head_bytes)
        for layer in layers:
            x, weight, bias = _layer_tensors(layer, batch, activation, meta)
            launcher = conv.per_sample_conv_transpose3d_forward if layer.transposed else conv.per_sample_conv3d_forward
            geometry = ((layer.stride,) * 3, (layer.padding,) * 3)
            run(layer.name, "forward", lambda: launcher(x, weight, bias, *geometry), layer.flops(batch), _traffic(layer, batch, element, "forward"))
        for layer in reversed(layers):
            x, weight, bias = _layer_tensors(layer, batch, activation, meta)
            grad_y = activation(layer.c_out, layer.out_size)
            backward = conv.per_sample_conv_transpose3d_backward if layer.transposed else conv.per_sample_conv3d_backward
            geometry = ((layer.stride,) * 3, (layer.padding,) * 3)
            roles = (("input-grad", (True, False, False)),) if layer.needs_input_grad else ()
            for role, wanted in (*roles, ("weight-grad", (False, True, True))):
                run(layer.name, role, lambda: backward(grad_y, x, weight, *geometry, wanted), layer.flops(batch), _traffic(layer, batch, element, role))
        y32 = meta(batch, params, dtype=torch.float32)
        run(
            "head",
            "backward",
            lambda: head.hyper_head_backward(meta(batch, params), y32, h, w_head, b_head, config.head_scale),
            4 * batch * params * hidden,
            8 * params * hidden + 4 * batch * params + batch * params * element,
        )
    return launches


def _layer_tensors(layer: Layer, batch: int, activation, meta) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    channels = (layer.c_in, layer.c_out) if layer.transposed else (layer.c_out, layer.c_in)
    return activation(layer.c_in, layer.in_size), meta(batch, *channels, *(layer.kernel,) * 3), meta(batch, layer.c_out)


def _traffic(layer: Layer, batch: int, element: int, role: str) -> float:
    """Least bytes a launch moves: each operand read once, the result written once (weight gradients in fp32)."""
    x = batch * layer.c_in * layer.in_size**3 * element
    y = batch * layer.c_out * layer.out_size**3 * element
    w = batch * layer.c_in * layer.c_out * layer.kernel**3
    if role == "weight-grad":
        return x + y + 4 * w
    return x + y + element * w


# ---------------------------------------------------------------------------------------------
# Compiling a launch as a GPU run would, and reading its machine code


@dataclass(frozen=True)
class Compiled:
    """What the machine code of one specialisation says."""

    registers: int
    spill_bytes: int  # ptxas's spill stores per thread
    stack_bytes: int  # the stack frame, where spills live
    shared_bytes: int
    num_warps: int
    sass: str = field(repr=False)
    seconds: float


def _specialise(launch: Launch, backend) -> tuple:
    """(signature, constexprs, attrs, options) exactly as JITFunction.run derives them for this launch."""
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, dict(launch.kwargs), bound_args, specialization, options)
    return signature, constexprs, attrs, options


def _tool(name: str) -> Path:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.is_file():
        raise ConfigError(f"{path}: not found; this Triton wheel does not ship {name}")
    return path


def _resource_usage(cubin: Path) -> dict[str, int]:
    """REG, STACK, SHARED, LOCAL ... of the cubin's one function, from `cuobjdump -res-usage`."""
    text = subprocess.run([_tool("cuobjdump"), "-res-usage", cubin], capture_output=True, text=True, check=True).stdout
    usage = re.search(r"Function \S+:\s*\n\s*(.+)", text).group(1)
    return {key: int(value) for key, value in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", usage)}


def _compile(launch: Launch, specialisation: tuple, target, workdir: Path) -> Compiled:
    """Compile one specialisation for the target, keeping the log of the ptxas run Triton makes (`-v`), and
    read its registers, spills, stack and instructions."""
    import triton
    from triton.compiler import ASTSource

    signature, constexprs, attrs, options = specialisation
    log = io.StringIO()
    started = time.perf_counter()
    with _environment_variable("TRITON_DUMP_PTXAS_LOG", "1"), contextlib.redirect_stdout(log):
        compiled = triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs), target=target, options=options.__dict__)
    seconds = time.perf_counter() - started
    spills = re.search(r"(\d+) bytes spill stores", log.getvalue())
    cubin = workdir / f"{compiled.hash}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    usage = _resource_usage(cubin)
    sass = subprocess.run([_tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True, check=True).stdout
    return Compiled(
        usage["REG"],
        int(spills.group(1)) if spills else usage.get("LOCAL", 0),
        usage.get("STACK", 0),
        compiled.metadata.shared,
        compiled.metadata.num_warps,
        sass,
        seconds,
    )


# ---------------------------------------------------------------------------------------------
# The instructions


INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
TENSOR = ("HGMMA", "HMMA", "IMMA")
INTEGER = (
    "IMAD",
    "IADD",
    "IADD3",
    "LEA",
    "LOP",
    "LOP3",
    "SHF",
    "SHL",
    "SHR",
    "IMNMX",
    "IABS",
    "POPC",
    "FLO",
    "BREV",
    "PRMT",
    "BMSK",
    "SGXT",
    "IDP",
    "IMUL",
    "BFE",
    "BFI",
    "VIADD",
    "VIMNMX",
    "IMNMX",
)
COMPARE_SELECT = ("ISETP", "FSETP", "HSETP2", "DSETP", "SEL", "FSEL", "PLOP3", "P2R", "R2P", "CSET", "CSETP", "VOTE")
CONVERSION = ("F2F", "F2I", "I2F", "I2FP", "F2FP", "FRND", "I2I")
MEMORY = (
    "LDG",
    "STG",
    "LDS",
    "STS",
    "LDSM",
    "STSM",
    "LDGSTS",
    "LDGDEPBAR",
    "LD",
    "ST",
    "RED",
    "ATOM",
    "ATOMS",
    "UBLKCP",
    "UTMALDG",
    "UTMASTG",
    "SYNCS",
    "LDC",
    "ULDC",
    "LDL",
    "STL",
)
CATEGORIES = ("tensor", "memory", "integer", "compare_select", "conversion", "other")


def _category(opcode: str) -> str:
    base = opcode.split(".")[0]
    if base.startswith("U") and base not in ("UBLKCP", "UTMALDG", "UTMASTG"):
        base = base[1:]  # the uniform datapath issues like the vector one
    for name, members in (("tensor", TENSOR), ("memory", MEMORY), ("integer", INTEGER), ("compare_select", COMPARE_SELECT), ("conversion", CONVERSION)):
        if base in members:
            return name
    return "other"


@dataclass(frozen=True)
class LoopProfile:
    """The main loop of a kernel's machine code and what it issues per trip."""

    instructions: int
    categories: dict[str, int]
    tensor_instruction: str  # HGMMA, HMMA or none
    prologue: int  # straight code before the first branch, executed once per program
    total: int  # instructions in the function
    has_loop: bool


def profile_sass(sass: str) -> LoopProfile:
    """Find the main loop (see the module's docstring) and count its instructions by kind."""
    code = [(int(address, 16), opcode, operands) for address, _, opcode, operands in INSTRUCTION.findall(sass)]
    position = {address: i for i, (address, _, _) in enumerate(code)}
    loops = []
    for i, (address, opcode, operands) in enumerate(code):
        target = re.match(r"\s*(?:`\()?\s*0x([0-9a-f]+)", operands)
        if opcode.startswith("BRA") and target and int(target.group(1), 16) < address:
            start = position.get(int(target.group(1), 16))
            if start is not None:
                body = code[start : i + 1]
                tensor = sum(1 for _, op, _ in body if op.split(".")[0] in TENSOR)
                ffma = sum(1 for _, op, _ in body if op.startswith("FFMA"))
                loops.append((tensor, ffma > 0, len(body), body))
    prologue = next((i for i, (_, op, _) in enumerate(code) if op.startswith(("BRA", "EXIT", "BSSY"))), len(code))
    useful = [loop for loop in loops if loop[0] or loop[1]]
    if useful:
        body = max(useful, key=lambda loop: (loop[0], -loop[2] if loop[0] else loop[2]))[3]
    else:
        body, prologue = code, 0
    categories = {name: 0 for name in CATEGORIES}
    for _, opcode, _ in body:
        categories[_category(opcode)] += 1
    tensor_ops = [op.split(".")[0] for _, op, _ in body if op.split(".")[0] in TENSOR]
    return LoopProfile(len(body), categories, tensor_ops[0] if tensor_ops else "none", prologue, len(code), bool(useful))


# ---------------------------------------------------------------------------------------------
# Trip counts of each kernel's main loop, read from the kernels' source


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


TRIP_COUNTS: dict[str, Callable[[dict], int]] = {
    "_per_sample_conv3d_forward_kernel":  # one trip per chunk of a (kd, kh)'s run of taps along w
    lambda a: a["KD"] * a["KH"] * _cdiv(a["KW"] * a["C_IN"], a["BLOCK_K"]),
    "_per_sample_conv3d_tma_forward_kernel":  # one trip per (tap of the phase, chunk of channels)
    lambda a: _cdiv(a["KD"], a["SD"]) * _cdiv(a["KH"], a["SH"]) * _cdiv(a["KW"], a["SW"]) * (a["C_IN"] // a["BLOCK_K"]),
    "_per_sample_conv_transpose3d_forward_kernel":  # the same over the live taps of a phase
    lambda a: _cdiv(a["KD"], a["SD"]) * _cdiv(a["KH"], a["SH"]) * _cdiv(_cdiv(a["KW"], a["SW"]) * a["C_IN"], a["BLOCK_K"]),
    "_per_sample_conv3d_weight_grad_kernel":  # the line tiles of g's grid, shared out over the splits
    lambda a: a["D_G"] * a["H_G"] * _cdiv(a["W_G"], a["BLOCK_M"]) / a["SPLITS"],
    "_per_sample_conv3d_tma_weight_grad_kernel":  # the boxes of g's grid, shared out over the splits
    lambda a: _cdiv(a["D_G"], a["BOX_D"]) * _cdiv(a["H_G"], a["BOX_H"]) * _cdiv(a["W_G"], a["BOX_W"]) / a["SPLITS"],
    "_hyper_head_forward_kernel": lambda a: a["B"],
    "_hyper_head_backward_kernel": lambda a: a["B"],
}


def _bound_arguments(launch: Launch) -> dict:
    """The launch's arguments by parameter name, constexprs included."""
    names = [p.name for p in launch.kernel.params]
    values = dict(zip(names, launch.args))
    values.update({k: v for k, v in launch.kwargs.items() if k in names})
    return values


def trip_count(launch: Launch) -> float:
    if launch.kernel_name not in TRIP_COUNTS:
        raise KeyError(f"{launch.kernel_name}: no trip count in static_bench.TRIP_COUNTS")
    return TRIP_COUNTS[launch.kernel_name](_bound_arguments(launch))


# ---------------------------------------------------------------------------------------------
# The bound


def resident_blocks(compiled: Compiled, device: Device) -> int:
    """Blocks one SM holds at once, limited by registers (allocated per warp in units of 256), shared memory,
    threads and the block limit."""
    threads = compiled.num_warps * WARP_THREADS
    registers_per_warp = math.ceil(max(compiled.registers, 1) * WARP_THREADS / 256) * 256
    by_registers = device.registers_per_sm // (registers_per_warp * compiled.num_warps)
    by_shared = (device.shared_kib_per_sm * 1024) // (compiled.shared_bytes + 1024) if compiled.shared_bytes else device.max_blocks_per_sm
    return max(0, min(by_registers, by_shared, device.max_threads_per_sm // threads, device.max_blocks_per_sm))


def launch_row(launch: Launch, compiled: Compiled, loop: LoopProfile, device: Device, dtype: str) -> dict:
    """One line of the report: the launch, its machine code, its bound and its floor on `device`."""
    trips = trip_count(launch) if loop.has_loop else 1
    per_program = trips * loop.instructions + loop.prologue
    warp_instructions = launch.programs * compiled.num_warps * per_program
    issue_s = warp_instructions / (device.multiprocessors * ISSUE_PER_CLOCK * device.boost_ghz * 1e9)
    compute_s = launch.flops / (device.peak_tflops(dtype) * 1e12)
    memory_s = launch.bytes / (device.memory_tbps * 1e12)
    blocks = resident_blocks(compiled, device)
    constexprs = _bound_arguments(launch)
    return {
        "layer": launch.layer,
        "role": launch.role,
        "shape": launch.shape,
        "kernel": launch.kernel_name,
        "grid": list(launch.grid),
        "programs": launch.programs,
        "blocks": {k: constexprs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_P", "BLOCK_H", "BLOCK_C") if k in constexprs},
        "num_warps": compiled.num_warps,
        "registers": compiled.registers,
        "spill_bytes": compiled.spill_bytes,
        "stack_bytes": compiled.stack_bytes,
        "shared_bytes": compiled.shared_bytes,
        "tensor_instruction": loop.tensor_instruction,
        "tensor_per_iteration": loop.categories["tensor"],
        "loop_instructions": loop.instructions,
        "loop_categories": loop.categories,
        "loop_index_instructions": loop.categories["integer"] + loop.categories["compare_select"] + loop.categories["conversion"],
        "trip_count": trips,
        "prologue_instructions": loop.prologue,
        "resident_blocks_per_sm": blocks,
        "waves": launch.programs / (blocks * device.multiprocessors) if blocks else None,
        "flops": launch.flops,
        "bytes": launch.bytes,
        "issue_bound_s": issue_s,
        "floor_compute_s": compute_s,
        "floor_memory_s": memory_s,
        "floor_s": max(compute_s, memory_s),
    }


# ---------------------------------------------------------------------------------------------
# The run


@dataclass(frozen=True)
class StaticSettings:
    arch: str
    preset: str
    size: int
    batch: int
    dtypes: tuple[str, ...]
    layers: tuple[str, ...] | None = None  # None: every layer and the head

    @property
    def model(self) -> ModelConfig:
        return PRESETS[self.preset]["model"]


def static_settings(
    arch: str = "sm_90",
    preset: str | None = None,
    size: int | None = None,
    batches: tuple[int, ...] | None = None,
    dtypes: tuple[str, ...] | None = None,
    layers: tuple[str, ...] | None = None,
    timing_options: dict | None = None,
) -> StaticSettings:
    """The paper's shapes unless told otherwise, checked; `timing_options` are `hsort bench`'s own, which a static
    run cannot honour (a device, --quick, --only): any of them given is an error, not silently ignored."""
    given = [f"--{name}" for name, value in (timing_options or {}).items() if value not in (None, False, "auto")]
    if given:
        raise ConfigError(f"--static compiles without running anything; {', '.join(given)} applies to timed runs only")
    if batches is not None and len(batches) != 1:
        raise ConfigError(f"--static bounds one batch size at a time, got --batch {','.join(map(str, batches))}")
    settings = StaticSettings(
        arch, preset or "paper", size or 168, batches[0] if batches else 2, tuple(dtypes or ("bfloat16", "float32")), tuple(layers) if layers else None
    )
    if settings.arch not in ARCHES:
        raise ConfigError(f"unknown --arch {settings.arch!r}; choose one of {', '.join(ARCHES)}")
    if settings.preset not in PRESETS:
        raise ConfigError(f"unknown preset {settings.preset!r}; choose one of {', '.join(PRESETS)}")
    if unknown := [d for d in settings.dtypes if d not in DTYPES]:
        raise ConfigError(f"unknown dtype {', '.join(unknown)}; choose from {', '.join(DTYPES)}")
    if settings.batch < 1:
        raise ConfigError(f"--batch must be at least 1, got {settings.batch}")
    multiple = settings.model.size_multiple
    if settings.size < 2 * multiple or settings.size % multiple:
        raise ConfigError(f"--size {settings.size}: the {settings.preset} UNet needs a multiple of {multiple}, at least {2 * multiple}")
    known = ["head", *(layer.name for layer in unet_layers(settings.model, settings.size))]
    if unknown := [name for name in settings.layers or () if name not in known]:
        raise ConfigError(f"unknown layer {', '.join(unknown)}; the {settings.preset} UNet has {', '.join(known)}")
    if interpreting():  # Triton's own library is interpreted from its import on: nothing would compile
        raise ConfigError("--static compiles the kernels for a GPU: run it without TRITON_INTERPRET=1")
    return settings


@contextlib.contextmanager
def _environment_variable(name: str, value: str) -> Iterator[None]:
    """os.environ[name] = value inside the block (Triton reads its knobs from the environment), restored after."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


@contextlib.contextmanager
def _fresh_triton_cache() -> Iterator[Path]:
    """A Triton cache of its own, so that compile times are those of a first run and nothing is reused."""
    with tempfile.TemporaryDirectory(prefix="hsort-static-") as directory, _environment_variable("TRITON_CACHE_DIR", str(Path(directory) / "cache")):
        yield Path(directory)


def _environment() -> dict:
    import triton

    return {"triton": triton.__version__, "torch": torch.__version__}


def run_static(settings: StaticSettings, out: Path | None = None, progress: Callable[[str], None] | None = None) -> dict:
    """Capture, compile and bound every launch of one training step, per dtype; the report as a dict, also
    written to `out` as JSON (atomically)."""
    say = progress or (lambda line: None)
    arch = ARCHES[settings.arch]
    devices = [DEVICES[name] for name in DEFAULT_DEVICES[arch]]
    report = {
        "environment": _environment(),
        "settings": asdict(settings),
        "devices": {d.name: asdict(d) for d in devices},
        "model": (
            "issue-bound time = programs x warps x (trip count x loop instructions + prologue) / "
            f"(SMs x {ISSUE_PER_CLOCK} x boost clock); floor = max(useful FLOPs / peak, least bytes / bandwidth)"
        ),
        "dtypes": {},
    }
    with _fresh_triton_cache() as workdir:
        for dtype in settings.dtypes:
            launches = [
                launch
                for launch in capture_training_step(settings.model, settings.size, settings.batch, dtype, arch)
                if settings.layers is None or launch.layer in settings.layers
            ]
            compiled: dict[str, Compiled] = {}
            keys = []
            for launch in launches:
                key, figures = _compile_once(launch, arch, workdir, compiled)
                keys.append(key)
                if figures is not None:
                    say(f"[static {dtype}] compiled {launch.kernel_name} for {launch.layer} {launch.role} in {figures.seconds:.1f} s")
            profiles = {key: profile_sass(c.sass) for key, c in compiled.items()}
            report["dtypes"][dtype] = {
                "launches": len(launches),
                "kernels_compiled": len(compiled),
                "compile_seconds": sum(c.seconds for c in compiled.values()),
                "devices": {d.name: _device_report(launches, keys, compiled, profiles, d, dtype) for d in devices},
            }
    if out is not None:
        atomic_write_text(out, json.dumps(report, indent=1) + "\n")
    return report


def _target(arch: int):
    """The GPU that Triton compiles for, here where there is none."""
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", arch, WARP_THREADS)


def kernel_key(launch: Launch, arch: int) -> tuple[str, tuple]:
    """(key, specialisation) of the kernel a launch compiles: launches with the same key share one compiled kernel."""
    from triton.compiler.compiler import make_backend

    specialisation = _specialise(launch, make_backend(_target(arch)))
    signature, constexprs, attrs, options = specialisation
    key = repr((launch.kernel_name, signature, sorted(constexprs.items()), sorted(attrs.items()), sorted(options.__dict__.items())))
    return key, specialisation


def _compile_once(launch: Launch, arch: int, workdir: Path, compiled: dict[str, Compiled]) -> tuple[str, Compiled | None]:
    """Compile a specialisation the first time it is launched: (its key, its figures, or None when known)."""
    key, specialisation = kernel_key(launch, arch)
    if key in compiled:
        return key, None
    compiled[key] = _compile(launch, specialisation, _target(arch), workdir)
    return key, compiled[key]


def _device_report(
    launches: list[Launch], keys: list[str], compiled: dict[str, Compiled], profiles: dict[str, LoopProfile], device: Device, dtype: str
) -> dict:
    rows = [launch_row(launch, compiled[key], profiles[key], device, dtype) for launch, key in zip(launches, keys)]
    unet = [row for row in rows if row["layer"] != "head"]
    totals = {
        "unet_issue_bound_s": sum(r["issue_bound_s"] for r in unet),
        "unet_floor_s": sum(r["floor_s"] for r in unet),
        "step_issue_bound_s": sum(r["issue_bound_s"] for r in rows),
        "step_floor_s": sum(r["floor_s"] for r in rows),
        "spill_bytes": max(r["spill_bytes"] for r in rows),
    }
    totals["unet_ratio"] = totals["unet_issue_bound_s"] / totals["unet_floor_s"] if unet else None
    return {"rows": rows, "totals": totals}


# ---------------------------------------------------------------------------------------------
# The table


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:.0f}"


def format_static_report(report: dict, out: Path | None = None) -> str:
    """One table per dtype (figures of the first device; the others' totals below it)."""
    settings, env = report["settings"], report["environment"]
    lines = [
        f"hsort bench --static | {settings['arch']} | triton {env['triton']} | preset {settings['preset']}, ROI {settings['size']}³, batch {settings['batch']}",
        f"model: {report['model']}",
    ]
    for dtype, result in report["dtypes"].items():
        first, *others = result["devices"].items()
        name, figures = first
        lines += ["", f"{dtype} ({'TF32 dots' if dtype == 'float32' else 'bf16 dots'}), figures for the {name}:", _static_table(figures["rows"])]
        for device_name, device_figures in result["devices"].items():
            t = device_figures["totals"]
            ratio = "" if t["unet_ratio"] is None else f" ({t['unet_ratio']:.2f}x)"
            lines.append(
                f"{device_name}: UNet fwd+bwd issue-bound >= {t['unet_issue_bound_s'] * 1e3:.2f} ms, roofline floor "
                f"{t['unet_floor_s'] * 1e3:.2f} ms{ratio}; all launches shown "
                f"{t['step_issue_bound_s'] * 1e3:.2f} ms against {t['step_floor_s'] * 1e3:.2f} ms; "
                f"largest spill {t['spill_bytes']} B"
            )
        lines.append(
            f"compile: {result['kernels_compiled']} kernels for {result['launches']} launches in "
            f"{result['compile_seconds']:.1f} s (a first run: an empty Triton cache)"
        )
    if out is not None:
        lines.append(f"every launch: {out}")
    return "\n".join(lines)


def _static_table(rows: list[dict]) -> str:
    header = [
        "layer",
        "role",
        "kernel",
        "grid",
        "blocks",
        "warps",
        "regs",
        "spill",
        "smem KB",
        "tensor/iter",
        "loop (index)",
        "trips",
        "blk/SM",
        "waves",
        "bound µs",
        "floor µs",
    ]
    lines = [header]
    for row in rows:
        lines.append(
            [
                row["layer"],
                row["role"],
                row["kernel"].strip("_").replace("per_sample_", "").replace("_kernel", ""),
                "×".join(map(str, row["grid"])),
                "/".join(map(str, row["blocks"].values())),
                str(row["num_warps"]),
                str(row["registers"]),
                str(row["spill_bytes"]),
                f"{row['shared_bytes'] / 1024:.0f}",
                f"{row['tensor_per_iteration']} {row['tensor_instruction']}" if row["tensor_per_iteration"] else "none",
                f"{row['loop_instructions']} ({row['loop_index_instructions']})",
                f"{row['trip_count']:.4g}",
                str(row["resident_blocks_per_sm"]),
                "" if row["waves"] is None else f"{row['waves']:.1f}",
                _us(row["issue_bound_s"]),
                _us(row["floor_s"]),
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines)
