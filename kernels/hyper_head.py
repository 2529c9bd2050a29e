"""The hyper-network's head: theta = 5 * tanh(h @ W.T + b), one Linear for all UNet parameters.

W is [P, hidden] with P in the millions, so the head is a memory-bound pass over W.  This file holds the
public op and its pure-PyTorch reference, which is also the CPU path; the fused Triton kernels live in
`hyper_head_triton.py`, imported only when they run (see `_dispatch`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import triton_runs, unsupported_dtypes

HEAD_SCALE = 5.0
MAX_HIDDEN = 1024


def hyper_head_reference(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, scale: float = HEAD_SCALE) -> torch.Tensor:
    """scale * tanh(h @ weight.T + bias): caps every predicted UNet parameter to (-scale, scale)."""
    return scale * torch.tanh(F.linear(h, weight, bias))


def _output_dtype(h: torch.Tensor) -> torch.dtype:
    """The autocast dtype under autocast, as F.linear's output would have, and h's dtype otherwise."""
    device_type = h.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else h.dtype


def _unsupported(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> str | None:
    """Why the kernels cannot run this configuration, or None when they can."""
    dtypes = {h.dtype, weight.dtype, bias.dtype}
    if reason := unsupported_dtypes(dtypes):
        return reason
    if len(dtypes) > 1 and not torch.is_autocast_enabled(h.device.type):
        return "mixed dtypes outside autocast"
    if len({h.device, weight.device, bias.device}) > 1:
        return "tensors on different devices"
    if h.dim() != 2 or weight.dim() != 2 or bias.dim() != 1 or h.shape[1] != weight.shape[1] or bias.shape[0] != weight.shape[0]:
        return "shapes other than h [B, hidden], weight [P, hidden], bias [P]"
    if h.shape[1] > MAX_HIDDEN or h.numel() == 0 or weight.numel() == 0:
        return f"hidden sizes above {MAX_HIDDEN} or empty tensors"
    return None


def hyper_head(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, scale: float = HEAD_SCALE) -> torch.Tensor:
    """The head op the model is written against.

    The kernels read every input in its own dtype and compute in fp32, so under autocast nothing is cast
    (a cast of W would copy it, 0.66 GB for the paper's UNet, every step); only the output takes the
    autocast dtype.
    """
    if triton_runs("hyper_head", [h, weight, bias], _unsupported(h, weight, bias)):
        from .hyper_head_triton import HyperHeadFunction

        return HyperHeadFunction.apply(h, weight, bias, float(scale), _output_dtype(h))
    return hyper_head_reference(h, weight, bias, scale)
