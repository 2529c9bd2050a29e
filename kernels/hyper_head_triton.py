"""Fused Triton kernels of the hyper-network head, their launchers and autograd Function.

The forward kernel reads W once and applies the tanh to the fp32 accumulator before the store; the
backward kernel reads W once and writes dW once, and needs only the output y, because
tanh' = 1 - tanh^2 (the pre-activation is never stored; y is kept in fp32 when the output is half
precision).  Every input is read in its own dtype and converted to fp32 in registers.  With B a few
cases a tl.dot tile would be mostly padding, so the kernels multiply and reduce in exact fp32 on the
CUDA cores instead: dW = g^T h is an outer-product accumulation over b, dh a per-program partial sum
over the block's rows, written to a [programs, B, hidden] buffer and summed afterwards (no atomics).

Memory traffic per step, B samples, P parameters, hidden H (fp32): forward reads W (4PH bytes) and
writes y (4BP); backward reads W, y and dy and writes dW (4PH + 8BP + 4PH): the floor for the op.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

NUM_WARPS = 4


@triton.jit
def _hyper_head_forward_kernel(
    h_ptr,
    w_ptr,
    bias_ptr,
    y_ptr,
    y32_ptr,
    B,
    P,
    HIDDEN,
    scale,
    stride_hb,
    stride_hk,
    stride_wp,
    stride_wk,
    stride_bias,
    stride_yb,
    stride_yp,
    STORE_Y32: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """y[b, p] = scale * tanh(sum_k h[b, k] w[p, k] + bias[p]) for one block of P and every b.

    With STORE_Y32 (half-precision y) y is also written in fp32 (contiguous [B, P]) for the backward:
    1 - (y / scale)^2 from a rounded y loses most of its digits where the tanh saturates.
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    row_ok = rows < P
    ks = tl.arange(0, BLOCK_H)
    k_ok = ks < HIDDEN
    w = tl.load(w_ptr + rows[:, None] * stride_wp + (ks * stride_wk)[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + rows * stride_bias, mask=row_ok, other=0.0).to(tl.float32)
    for b in range(B):
        h = tl.load(h_ptr + b * stride_hb + ks * stride_hk, mask=k_ok, other=0.0).to(tl.float32)
        z = tl.sum(w * h[None, :], axis=1) + bias
        # tanh(z) = sign(z) (1 - e) / (1 + e) with e = exp(-2|z|) <= 1: no overflow for any z
        e = tl.exp(-2.0 * tl.abs(z))
        t = (1.0 - e) / (1.0 + e)
        y = scale * tl.where(z < 0, -t, t)
        tl.store(y_ptr + b * stride_yb + rows * stride_yp, y.to(y_ptr.dtype.element_ty), mask=row_ok)
        if STORE_Y32:
            tl.store(y32_ptr + b * P + rows, y, mask=row_ok)


@triton.jit
def _hyper_head_backward_kernel(
    h_ptr,
    w_ptr,
    y_ptr,
    dy_ptr,
    dw_ptr,
    dbias_ptr,
    partial_dh_ptr,
    B,
    P,
    HIDDEN,
    scale,
    stride_hb,
    stride_hk,
    stride_wp,
    stride_wk,
    stride_yb,
    stride_yp,
    stride_dyb,
    stride_dyp,
    stride_dwp,
    stride_dwk,
    stride_dbias,
    BLOCK_P: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """With g = dy * scale * (1 - (y / scale)^2) = dL/dz: dW = g^T h and db = sum_b g for this block of P,
    and this block's share g @ W of dh, written to partial_dh[program, b, :] and summed afterwards."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    row_ok = rows < P
    ks = tl.arange(0, BLOCK_H)
    k_ok = ks < HIDDEN
    tile_ok = row_ok[:, None] & k_ok[None, :]
    w = tl.load(w_ptr + rows[:, None] * stride_wp + (ks * stride_wk)[None, :], mask=tile_ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_P, BLOCK_H), dtype=tl.float32)
    dbias = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for b in range(B):
        y = tl.load(y_ptr + b * stride_yb + rows * stride_yp, mask=row_ok, other=0.0).to(tl.float32) / scale
        dy = tl.load(dy_ptr + b * stride_dyb + rows * stride_dyp, mask=row_ok, other=0.0).to(tl.float32)
        g = dy * scale * (1.0 - y * y)
        h = tl.load(h_ptr + b * stride_hb + ks * stride_hk, mask=k_ok, other=0.0).to(tl.float32)
        dw += g[:, None] * h[None, :]
        dbias += g
        tl.store(partial_dh_ptr + (pid * B + b) * BLOCK_H + ks, tl.sum(g[:, None] * w, axis=0), mask=k_ok)
    tl.store(dw_ptr + rows[:, None] * stride_dwp + (ks * stride_dwk)[None, :], dw.to(dw_ptr.dtype.element_ty), mask=tile_ok)
    tl.store(dbias_ptr + rows * stride_dbias, dbias.to(dbias_ptr.dtype.element_ty), mask=row_ok)


def _blocks(hidden: int) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_H): the whole hidden vector per row and 8K elements of W per program (64 per thread)."""
    block_h = triton.next_power_of_2(hidden)
    return max(16, 8192 // block_h), block_h


def hyper_head_forward(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, scale: float, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """y = scale * tanh(h @ weight.T + bias) for h [B, hidden], weight [P, hidden], bias [P], and y in
    float32 for the backward (y itself when it is float32)."""
    batch, hidden = h.shape
    params = weight.shape[0]
    y = h.new_empty((batch, params), dtype=out_dtype)
    y32 = y if y.dtype == torch.float32 else torch.empty((batch, params), device=y.device, dtype=torch.float32)
    block_p, block_h = _blocks(hidden)
    _hyper_head_forward_kernel[(triton.cdiv(params, block_p),)](
        h,
        weight,
        bias,
        y,
        y32,
        batch,
        params,
        hidden,
        scale,
        *h.stride(),
        *weight.stride(),
        *bias.stride(),
        *y.stride(),
        STORE_Y32=y32 is not y,
        BLOCK_P=block_p,
        BLOCK_H=block_h,
        num_warps=NUM_WARPS,
    )
    return y, y32


def hyper_head_backward(grad_y: torch.Tensor, y32: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, scale: float):
    """(dh, dW, db) in one pass over W, from the forward's float32 output y32."""
    batch, hidden = h.shape
    params = weight.shape[0]
    block_p, block_h = _blocks(hidden)
    programs = triton.cdiv(params, block_p)
    grad_w = torch.empty_like(weight)
    grad_bias = torch.empty_like(bias)
    partial_dh = torch.empty((programs, batch, block_h), device=h.device, dtype=torch.float32)
    _hyper_head_backward_kernel[(programs,)](
        h,
        weight,
        y32,
        grad_y,
        grad_w,
        grad_bias,
        partial_dh,
        batch,
        params,
        hidden,
        scale,
        *h.stride(),
        *weight.stride(),
        *y32.stride(),
        *grad_y.stride(),
        *grad_w.stride(),
        *grad_bias.stride(),
        BLOCK_P=block_p,
        BLOCK_H=block_h,
        num_warps=NUM_WARPS,
    )
    grad_h = partial_dh.sum(dim=0)[:, :hidden].to(h.dtype)
    return grad_h, grad_w, grad_bias


class HyperHeadFunction(torch.autograd.Function):
    """Autograd for the fused head; saves the output y (in float32), not the pre-activation."""

    @staticmethod
    def forward(ctx, h, weight, bias, scale: float, out_dtype: torch.dtype):
        y, y32 = hyper_head_forward(h, weight, bias, scale, out_dtype)
        ctx.save_for_backward(h, weight, bias, y32)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, grad_y):
        h, weight, bias, y32 = ctx.saved_tensors
        grad_h, grad_w, grad_bias = hyper_head_backward(grad_y, y32, h, weight, bias, ctx.scale)
        return grad_h, grad_w, grad_bias, None, None
