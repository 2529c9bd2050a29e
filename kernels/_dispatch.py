"""Which implementation runs an op: the Triton kernels or the PyTorch reference.

`HSORT_KERNELS=auto` (the default) runs the kernels on CUDA tensors and the reference elsewhere;
`HSORT_KERNELS=triton` forces the kernels, on CPU tensors through the Triton interpreter
(`TRITON_INTERPRET=1`, which is how CI tests them); `HSORT_KERNELS=torch` forces the reference.
A configuration the kernels do not cover falls back to the reference with one warning per kind of
configuration: a slower answer, never a wrong one.  Without Triton installed (CPU-only machines)
the ops use the reference silently.

Triton itself is imported only when a kernel first runs (the op modules import their `*_triton`
modules lazily): `triton.jit` and Triton's own library decide between compiling and interpreting when
they are imported, so TRITON_INTERPRET must be set by then, and a test may set it in a fixture.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Sequence

import torch

BACKEND_ENV = "HSORT_KERNELS"
BACKENDS = ("auto", "triton", "torch")
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_warned: set[str] = set()


def requested_backend() -> str:
    """The backend named by HSORT_KERNELS, read at every call so that tests and users can switch it."""
    choice = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={choice!r} is not one of {', '.join(BACKENDS)}")
    return choice


def interpreting() -> bool:
    """Whether Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on")


def warn_once(kind: str, message: str) -> None:
    """One warning per kind of fallback, so a training loop is not flooded with the same line."""
    if kind not in _warned:
        _warned.add(kind)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def triton_runs(op: str, tensors: Sequence[torch.Tensor], unsupported: str | None) -> bool:
    """Whether `op` runs its Triton kernels for these tensors; `unsupported` names a configuration they lack."""
    choice = requested_backend()
    if choice == "torch":
        return False
    if not TRITON_INSTALLED:
        if choice == "triton":
            raise RuntimeError(f"{BACKEND_ENV}=triton, but Triton is not installed")
        return False
    if not all(t.is_cuda for t in tensors) and not (choice == "triton" and interpreting()):
        if choice == "triton":
            warn_once(f"{op}:device", f"{op}: Triton needs CUDA tensors or TRITON_INTERPRET=1; using the PyTorch reference")
        return False
    if unsupported is not None:
        warn_once(f"{op}:{unsupported}", f"{op}: the Triton kernels do not support {unsupported}; using the PyTorch reference")
        return False
    return True


def unsupported_dtypes(dtypes: set[torch.dtype]) -> str | None:
    """The dtypes among `dtypes` the kernels lack, as a fallback reason, or None."""
    missing = sorted(str(d) for d in dtypes - set(KERNEL_DTYPES))
    return f"dtype {', '.join(missing)}" if missing else None


def stands_for_gpu(device: torch.device) -> bool:
    """CUDA, or meta: tensors without data that stand for a GPU run when launches are only compiled
    (`hsort bench --static`)."""
    return device.type in ("cuda", "meta")


def dot_precision(dtype: torch.dtype, device: torch.device, tf32_allowed: bool) -> str:
    """tl.dot's input precision: TF32 for float32 only where PyTorch itself allows it, IEEE otherwise."""
    return "tf32" if dtype == torch.float32 and stands_for_gpu(device) and tf32_allowed else "ieee"


def autocast_inputs(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Cast inputs to the autocast dtype, as PyTorch does for conv and linear, when autocast is on."""
    first = next(t for t in tensors if t is not None)
    device_type = first.device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(None if t is None else t.to(dtype) for t in tensors)
