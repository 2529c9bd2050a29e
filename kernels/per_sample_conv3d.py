"""Per-sample 3D convolution: every batch element is convolved with its own weight.

This file holds the public ops `per_sample_conv3d` / `per_sample_conv_transpose3d` and their pure-PyTorch
references, which are also the CPU path; the Triton kernels of the family live in
`per_sample_conv3d_triton.py`, imported only when they run (see `_dispatch`).  The reference folds the
batch into channel groups (`groups = B`), which is exactly what `torch.func.vmap` lowers a batched-weight
convolution to.  Weights use PyTorch's own layouts per sample: Conv3d `[Cout, Cin, kd, kh, kw]`,
ConvTranspose3d `[Cin, Cout, kd, kh, kw]`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import autocast_inputs, triton_runs, unsupported_dtypes
from .conv_shapes import Triple, conv_output_size, conv_transpose_output_size

IntOr3 = int | tuple[int, int, int]


def _check_batched(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cin_dim: int) -> None:
    """Reject shapes the grouped formulation would silently misread."""
    if x.dim() != 5 or weight.dim() != 6:
        raise ValueError(f"expected x [B,C,D,H,W] and weight [B,*,*,k,k,k], got {tuple(x.shape)} and {tuple(weight.shape)}")
    if weight.shape[0] != x.shape[0]:
        raise ValueError(f"batch of x ({x.shape[0]}) and of weight ({weight.shape[0]}) differ")
    if weight.shape[cin_dim] != x.shape[1]:
        raise ValueError(f"x has {x.shape[1]} channels, weight expects {weight.shape[cin_dim]}")
    if bias is not None and bias.shape[0] != x.shape[0]:
        raise ValueError(f"batch of bias ({bias.shape[0]}) and of x ({x.shape[0]}) differ")


def _grouped(conv, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cout: int, stride: IntOr3, padding: IntOr3) -> torch.Tensor:
    """The batch folded into channel groups: one grouped `conv` call with groups = B.

    Both weight layouts, [B, Cout, Cin, k..] and [B, Cin, Cout, k..], fold their first two axes into
    the grouped layout PyTorch expects for that op.
    """
    batch = x.shape[0]
    grouped_b = None if bias is None else bias.reshape(batch * cout)
    y = conv(x.reshape(1, -1, *x.shape[2:]), weight.flatten(0, 1), grouped_b, stride=stride, padding=padding, groups=batch)
    return y.reshape(batch, cout, *y.shape[2:])


def per_sample_conv3d_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: IntOr3 = 1,
    padding: IntOr3 = 0,
) -> torch.Tensor:
    """y[b] = conv3d(x[b], weight[b], bias[b]) for x [B,Cin,D,H,W], weight [B,Cout,Cin,k,k,k]."""
    _check_batched(x, weight, bias, cin_dim=2)
    return _grouped(F.conv3d, x, weight, bias, weight.shape[1], stride, padding)


def per_sample_conv_transpose3d_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: IntOr3 = 1,
    padding: IntOr3 = 0,
) -> torch.Tensor:
    """y[b] = conv_transpose3d(x[b], weight[b], bias[b]) for weight [B,Cin,Cout,k,k,k]."""
    _check_batched(x, weight, bias, cin_dim=1)
    return _grouped(F.conv_transpose3d, x, weight, bias, weight.shape[2], stride, padding)


def _triple(value: IntOr3) -> Triple:
    return (value,) * 3 if isinstance(value, int) else tuple(value)


def _unsupported(tensors: tuple[torch.Tensor | None, ...], stride: Triple, padding: Triple, out_size: Triple) -> str | None:
    """Why the kernels cannot run this configuration, or None when they can."""
    present = [t for t in tensors if t is not None]
    dtypes = {t.dtype for t in present}
    if reason := unsupported_dtypes(dtypes):
        return reason
    if len(dtypes) > 1:
        return "mixed dtypes"
    if len({t.device for t in present}) > 1:
        return "tensors on different devices"
    if min(stride) < 1 or min(padding) < 0 or min(out_size) < 1 or present[0].numel() == 0:
        return "empty tensors, strides below 1 or negative padding"
    return None


def _run(op: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: IntOr3, padding: IntOr3) -> torch.Tensor:
    """Check, then run the Triton Function of `op` where it applies and the reference otherwise."""
    transposed = op == "per_sample_conv_transpose3d"
    _check_batched(x, weight, bias, cin_dim=1 if transposed else 2)
    stride3, padding3 = _triple(stride), _triple(padding)
    output_size = conv_transpose_output_size if transposed else conv_output_size
    out_size = output_size(tuple(x.shape[2:]), tuple(weight.shape[3:]), stride3, padding3)
    cast = autocast_inputs(x, weight, bias)
    if triton_runs(op, [x, weight], _unsupported(cast, stride3, padding3, out_size)):
        from . import per_sample_conv3d_triton as kernels

        function = kernels.PerSampleConvTranspose3dFunction if transposed else kernels.PerSampleConv3dFunction
        return function.apply(*cast, stride3, padding3)
    reference = per_sample_conv_transpose3d_reference if transposed else per_sample_conv3d_reference
    return reference(x, weight, bias, stride, padding)


def per_sample_conv3d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: IntOr3 = 1,
    padding: IntOr3 = 0,
) -> torch.Tensor:
    """Per-sample Conv3d; the stable entry point the UNet is written against."""
    return _run("per_sample_conv3d", x, weight, bias, stride, padding)


def per_sample_conv_transpose3d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: IntOr3 = 1,
    padding: IntOr3 = 0,
) -> torch.Tensor:
    """Per-sample ConvTranspose3d; the stable entry point the UNet is written against."""
    return _run("per_sample_conv_transpose3d", x, weight, bias, stride, padding)
