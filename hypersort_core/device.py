"""Where a run computes and in what precision: shared by training, loading a run and the benchmarks."""

from __future__ import annotations

import contextlib

import torch

from hypersort_core.config import ConfigError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but PyTorch sees no CUDA device")
    return torch.device(name)


def resolved_precision(precision: str, device: torch.device) -> str:
    """`auto`: bf16 autocast on CUDA, plain float32 on the CPU."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def use_precision(precision: str, device: torch.device) -> None:
    """Switch TF32 matmuls and convolutions on for `tf32` and off otherwise (process-wide torch flags)."""
    allowed = resolved_precision(precision, device) == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allowed


def autocast_for(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast where the precision is bf16; nothing otherwise (fp32 and tf32 compute in float32)."""
    if resolved_precision(precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
