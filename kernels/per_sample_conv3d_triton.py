"""Triton kernels of the per-sample conv family, their launchers and autograd Functions.

Three kernels cover both ops and all their gradients, because the gradient of a convolution with respect
to its input is a transposed convolution with the same weight, and the other way round:

* `_per_sample_conv3d_forward_kernel` (implicit GEMM, M = output voxels of one sample, N = Cout,
  K = taps x Cin, the weight pointer offset by batch index): the conv forward and the transposed
  conv's input gradient;
* `_per_sample_conv_transpose3d_forward_kernel` (the same GEMM per output phase, see below): the
  transposed conv forward and the conv's input gradient;
* `_per_sample_conv3d_weight_grad_kernel` (the voxel axis split over programs, partial sums reduced
  afterwards without atomics, so results are deterministic): both weight gradients and the conv's
  bias gradient.

Layout: the kernels read and write channels-last activations (NDHWC), so the K axis of a tile is a run of
contiguous channels and needs no per-element index arithmetic; the planning notes measured an NCDHW
gather at 0.3x cuDNN and channels-last on par.  The public ops take and return ordinary [B, C, D, H, W]
tensors: an input already in `torch.channels_last_3d` memory is used as it is, any other input is copied
once (one read and one write of the activation, about half the memory floor of a 16-channel conv), and
outputs come back as [B, C, D, H, W] views of channels-last memory, so chained convs pay no copies as long
as the ops between them keep that memory format.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import dot_precision, interpreting, stands_for_gpu
from .per_sample_conv3d import Triple, conv_output_size, conv_transpose_output_size

NUM_WARPS = 4


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _voxel_coordinates(index, H, W):
    """(d, h, w) of flat voxel indices over a [*, H, W] grid."""
    w = index % W
    hd = index // W
    return hd // H, hd % H, w


@triton.jit
def _im2col_tile(x_base, in_d, in_h, in_w, row_ok, ks, K, C, D, H, W, KH, KW,
                 stride_d, stride_h, stride_w, stride_c):
    """The [rows, ks] tile of the im2col matrix: x at (in_d + kd, in_h + kh, in_w + kw, c), zero outside.

    A column k of K = (kd, kh, kw, c) with c innermost, so a run of columns is a run of contiguous channels.
    """
    c = ks % C
    tap = ks // C
    kw = tap % KW
    kh = (tap // KW) % KH
    kd = tap // (KW * KH)
    d = in_d[:, None] + kd[None, :]
    h = in_h[:, None] + kh[None, :]
    w = in_w[:, None] + kw[None, :]
    inside = (d >= 0) & (d < D) & (h >= 0) & (h < H) & (w >= 0) & (w < W)
    mask = row_ok[:, None] & (ks < K)[None, :] & inside
    offsets = d * stride_d + h * stride_h + w * stride_w + (c * stride_c)[None, :]
    return tl.load(x_base + offsets, mask=mask, other=0.0)


@triton.jit
def _dot(a, b, acc, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b with fp32 accumulation.  UPCAST multiplies in fp32, exactly equal for bf16 inputs: the
    interpreter's tl.dot multiplies bfloat16 bit patterns (triton-lang/triton#11584)."""
    if UPCAST:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _store_output_tile(acc, bias_ptr, y_ptr, pid_b, od, oh, ow, cols, row_ok, col_ok,
                       stride_bb, stride_bn, stride_yb, stride_yd, stride_yh, stride_yw, stride_yc, HAS_BIAS: tl.constexpr):
    """The forward kernels' epilogue: add the sample's bias to the fp32 tile and store it in y's dtype."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + pid_b * stride_bb + cols * stride_bn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y_offsets = pid_b * stride_yb + (od * stride_yd + oh * stride_yh + ow * stride_yw)[:, None] + (cols * stride_yc)[None, :]
    tl.store(y_ptr + y_offsets, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _per_sample_conv3d_forward_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr,
    C_IN, D_IN, H_IN, W_IN,
    C_OUT, D_OUT, H_OUT, W_OUT,
    KD, KH, KW, SD, SH, SW, PD, PH, PW,
    stride_xb, stride_xd, stride_xh, stride_xw, stride_xc,
    stride_wb, stride_wk, stride_wn,
    stride_bb, stride_bn,
    stride_yb, stride_yd, stride_yh, stride_yw, stride_yc,
    HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y[b, m, n] = sum_k im2col(x[b])[m, k] * w[b, k, n] + bias[b, n], w the tap-major [B, K, Cout] weight."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < D_OUT * H_OUT * W_OUT
    od, oh, ow = _voxel_coordinates(rows, H_OUT, W_OUT)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < C_OUT

    x_base = x_ptr + pid_b * stride_xb
    w_base = w_ptr + pid_b * stride_wb
    K = KD * KH * KW * C_IN
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = _im2col_tile(x_base, od * SD - PD, oh * SH - PH, ow * SW - PW, row_ok, ks, K, C_IN, D_IN, H_IN, W_IN,
                         KH, KW, stride_xd, stride_xh, stride_xw, stride_xc)
        w = tl.load(w_base + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
                    mask=(ks < K)[:, None] & col_ok[None, :], other=0.0)
        acc = _dot(a, w, acc, INPUT_PRECISION, UPCAST)

    _store_output_tile(acc, bias_ptr, y_ptr, pid_b, od, oh, ow, cols, row_ok, col_ok,
                       stride_bb, stride_bn, stride_yb, stride_yd, stride_yh, stride_yw, stride_yc, HAS_BIAS)


@triton.jit
def _per_sample_conv_transpose3d_forward_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr,
    C_IN, D_IN, H_IN, W_IN,
    C_OUT, D_OUT, H_OUT, W_OUT,
    KD, KH, KW, SD, SH, SW, PD, PH, PW,
    stride_xb, stride_xd, stride_xh, stride_xw, stride_xc,
    stride_wb, stride_wd, stride_wh, stride_ww, stride_wc, stride_wn,
    stride_bb, stride_bn,
    stride_yb, stride_yd, stride_yh, stride_yw, stride_yc,
    HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y[b, i, n] = sum over taps t and input voxels o with i = o * s - p + t of x[b, o, c] * w[b, t, c, n].

    Gathered per output phase (i mod s per axis): within one phase the contributing taps are fixed,
    t = r, r + s, ... with r = (phase + p) mod s, so a k4 s2 program multiplies its 8 live taps and not
    all 64.  The grid's third axis enumerates (sample, phase).
    """
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    pid_bp = tl.program_id(2)
    phases = SD * SH * SW
    pid_b = (pid_bp // phases).to(tl.int64)
    phase = pid_bp % phases
    phase_d = phase // (SH * SW)
    phase_h = (phase // SW) % SH
    phase_w = phase % SW

    # output voxels of this phase: i = q * s + phase, q on a grid of ceil(out / s) per axis
    QH = tl.cdiv(H_OUT, SH)
    QW = tl.cdiv(W_OUT, SW)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    qd, qh, qw = _voxel_coordinates(rows, QH, QW)
    od = qd * SD + phase_d
    oh = qh * SH + phase_h
    ow = qw * SW + phase_w
    row_ok = (rows < tl.cdiv(D_OUT, SD) * QH * QW) & (od < D_OUT) & (oh < H_OUT) & (ow < W_OUT)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < C_OUT

    # tap j of an axis is t = r + j * s and reads input voxel o = q + (phase + p) // s - j
    rd = (phase_d + PD) % SD
    rh = (phase_h + PH) % SH
    rw = (phase_w + PW) % SW
    base_d = qd + (phase_d + PD) // SD
    base_h = qh + (phase_h + PH) // SH
    base_w = qw + (phase_w + PW) // SW
    TH = tl.cdiv(KH, SH)
    TW = tl.cdiv(KW, SW)
    K = tl.cdiv(KD, SD) * TH * TW * C_IN

    x_base = x_ptr + pid_b * stride_xb
    w_base = w_ptr + pid_b * stride_wb
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        c = ks % C_IN
        j = ks // C_IN
        jw = j % TW
        jh = (j // TW) % TH
        jd = j // (TW * TH)
        td = rd + jd * SD
        th = rh + jh * SH
        tw = rw + jw * SW
        k_ok = (ks < K) & (td < KD) & (th < KH) & (tw < KW)
        d = base_d[:, None] - jd[None, :]
        h = base_h[:, None] - jh[None, :]
        w = base_w[:, None] - jw[None, :]
        inside = (d >= 0) & (d < D_IN) & (h >= 0) & (h < H_IN) & (w >= 0) & (w < W_IN)
        a = tl.load(x_base + d * stride_xd + h * stride_xh + w * stride_xw + (c * stride_xc)[None, :],
                    mask=row_ok[:, None] & k_ok[None, :] & inside, other=0.0)
        w_offsets = td * stride_wd + th * stride_wh + tw * stride_ww + c * stride_wc
        wt = tl.load(w_base + w_offsets[:, None] + (cols * stride_wn)[None, :],
                     mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = _dot(a, wt, acc, INPUT_PRECISION, UPCAST)

    _store_output_tile(acc, bias_ptr, y_ptr, pid_b, od, oh, ow, cols, row_ok, col_ok,
                       stride_bb, stride_bn, stride_yb, stride_yd, stride_yh, stride_yw, stride_yc, HAS_BIAS)


@triton.jit
def _per_sample_conv3d_weight_grad_kernel(
    g_ptr, x_ptr, partial_w_ptr, partial_b_ptr,
    C_G, D_G, H_G, W_G,
    C_X, D_X, H_X, W_X,
    KD, KH, KW, SD, SH, SW, PD, PH, PW,
    stride_gb, stride_gd, stride_gh, stride_gw, stride_gc,
    stride_xb, stride_xd, stride_xh, stride_xw, stride_xc,
    ROWS_PER_SPLIT, SPLITS,
    SUM_ROWS: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """partial_w[b, split, n, k] = sum over this split's voxels m of g[b, m, n] * im2col(x[b])[m, k].

    g lives on the conv's output grid, x on its input grid.  With SUM_ROWS the column-0 programs also
    write partial_b[b, split, n] = sum_m g[b, m, n], the conv's bias gradient, from the tiles they load anyway.
    """
    pid_nk = tl.program_id(0)
    pid_bs = tl.program_id(1)
    K = KD * KH * KW * C_X
    k_blocks = tl.cdiv(K, BLOCK_K)
    pid_n = pid_nk // k_blocks
    pid_k = pid_nk % k_blocks
    pid_b = (pid_bs // SPLITS).to(tl.int64)
    split = (pid_bs % SPLITS).to(tl.int64)

    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = ns < C_G
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    M = D_G * H_G * W_G
    g_base = g_ptr + pid_b * stride_gb
    x_base = x_ptr + pid_b * stride_xb

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    first_row = split * ROWS_PER_SPLIT
    for m0 in range(0, ROWS_PER_SPLIT, BLOCK_M):
        rows = first_row + m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        od, oh, ow = _voxel_coordinates(rows, H_G, W_G)
        g_offsets = (od * stride_gd + oh * stride_gh + ow * stride_gw)[None, :] + (ns * stride_gc)[:, None]
        g_t = tl.load(g_base + g_offsets, mask=n_ok[:, None] & row_ok[None, :], other=0.0)
        a = _im2col_tile(x_base, od * SD - PD, oh * SH - PH, ow * SW - PW, row_ok, ks, K, C_X, D_X, H_X, W_X,
                         KH, KW, stride_xd, stride_xh, stride_xw, stride_xc)
        acc = _dot(g_t, a, acc, INPUT_PRECISION, UPCAST)
        if SUM_ROWS:
            row_sum += tl.sum(g_t.to(tl.float32), axis=1)

    partial_base = pid_b * SPLITS + split
    w_offsets = (partial_base * C_G + ns)[:, None] * K + ks[None, :]
    tl.store(partial_w_ptr + w_offsets, acc, mask=n_ok[:, None] & (ks < K)[None, :])
    if SUM_ROWS:
        if pid_k == 0:
            tl.store(partial_b_ptr + partial_base * C_G + ns, row_sum, mask=n_ok)


# ---------------------------------------------------------------------------------------------
# Launchers (activations channels-last, [B, D, H, W, C])
# ---------------------------------------------------------------------------------------------


def _to_ndhwc(t: torch.Tensor) -> torch.Tensor:
    """[B, C, D, H, W] -> [B, D, H, W, C] over channels-last memory; free when t already is channels-last."""
    return t.contiguous(memory_format=torch.channels_last_3d).permute(0, 2, 3, 4, 1)


def _from_ndhwc(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 4, 1, 2, 3)


def _data_blocks(c_out: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K) of the forward kernels: all output channels in one tile up to 128, so a
    gathered activation tile is loaded once, and at most 8K fp32 accumulators per program (64 per thread)."""
    block_n = min(max(triton.next_power_of_2(c_out), 16), 128)
    return (64 if block_n == 128 else 128), block_n, 32


def _precision(x: torch.Tensor) -> str:
    return dot_precision(x.dtype, x.device, torch.backends.cudnn.allow_tf32)


def _upcast(x: torch.Tensor) -> bool:
    return x.dtype == torch.bfloat16 and interpreting()


def _bias_args(bias: torch.Tensor | None, fallback: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Bias pointer and strides; a kernel without bias gets any pointer and never reads it."""
    return (fallback, (0, 0)) if bias is None else (bias, bias.stride())


def per_sample_conv3d_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                              stride: Triple, padding: Triple) -> torch.Tensor:
    """Conv of channels-last x [B, D, H, W, Cin] with weight [B, Cout, Cin, kd, kh, kw]; returns
    channels-last y [B, Do, Ho, Wo, Cout]."""
    batch, *size, c_in = x.shape
    c_out, kernel_size = weight.shape[1], tuple(weight.shape[3:])
    out_size = conv_output_size(tuple(size), kernel_size, stride, padding)
    y = x.new_empty((batch, *out_size, c_out))
    w = weight.permute(0, 3, 4, 5, 2, 1).contiguous()  # [B, kd, kh, kw, Cin, Cout]: a [B, K, Cout] matrix
    block_m, block_n, block_k = _data_blocks(c_out)
    grid = (triton.cdiv(out_size[0] * out_size[1] * out_size[2], block_m), triton.cdiv(c_out, block_n), batch)
    bias_ptr, bias_strides = _bias_args(bias, y)
    _per_sample_conv3d_forward_kernel[grid](
        x, w, bias_ptr, y,
        c_in, *size, c_out, *out_size, *kernel_size, *stride, *padding,
        *x.stride(), w.stride(0), w.stride(4), w.stride(5), *bias_strides, *y.stride(),
        HAS_BIAS=bias is not None, INPUT_PRECISION=_precision(x), UPCAST=_upcast(x),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=NUM_WARPS,
    )
    return y


def _launch_conv_transpose3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             stride: Triple, padding: Triple, out_size: Triple) -> torch.Tensor:
    """Channels-last transposed conv of x [B, D, H, W, Cin] with weight [B, Cin, Cout, kd, kh, kw]."""
    batch, *size, c_in = x.shape
    c_out, kernel_size = weight.shape[2], tuple(weight.shape[3:])
    y = x.new_empty((batch, *out_size, c_out))
    w = weight.permute(0, 3, 4, 5, 1, 2).contiguous()  # [B, kd, kh, kw, Cin, Cout]
    block_m, block_n, block_k = _data_blocks(c_out)
    phase_voxels = 1
    for n, s in zip(out_size, stride):
        phase_voxels *= triton.cdiv(n, s)
    grid = (triton.cdiv(phase_voxels, block_m), triton.cdiv(c_out, block_n), batch * stride[0] * stride[1] * stride[2])
    bias_ptr, bias_strides = _bias_args(bias, y)
    _per_sample_conv_transpose3d_forward_kernel[grid](
        x, w, bias_ptr, y,
        c_in, *size, c_out, *out_size, *kernel_size, *stride, *padding,
        *x.stride(), *w.stride(), *bias_strides, *y.stride(),
        HAS_BIAS=bias is not None, INPUT_PRECISION=_precision(x), UPCAST=_upcast(x),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=NUM_WARPS,
    )
    return y


HOPPER_MULTIPROCESSORS = 132  # H100 SXM and H200: what meta tensors stand for (`hsort bench --static`)


def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return HOPPER_MULTIPROCESSORS


def _target_programs(device: torch.device) -> int:
    """Programs that keep a GPU busy; under the interpreter a few, which still exercises the split reduction."""
    return 4 * _multiprocessors(device) if stands_for_gpu(device) else 8


def _launch_weight_grad(g: torch.Tensor, x: torch.Tensor, kernel_size: Triple, stride: Triple, padding: Triple,
                        bias_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dw[b, n, c, t] = sum_m g[b, m, n] x[b, m * s - p + t, c] for g [B, Do, Ho, Wo, N], x [B, Di, Hi, Wi, C].

    Returns dw as [B, N, C, kd, kh, kw] in float32 and, with `bias_grad`, sum_m g[b, m, n] as [B, N].
    """
    batch, *g_size, c_g = g.shape
    _, *x_size, c_x = x.shape
    K = kernel_size[0] * kernel_size[1] * kernel_size[2] * c_x
    rows = g_size[0] * g_size[1] * g_size[2]
    block_m, block_k = 64, 64
    block_n = min(max(triton.next_power_of_2(c_g), 16), 64)
    tiles = triton.cdiv(c_g, block_n) * triton.cdiv(K, block_k)
    splits = max(1, min(triton.cdiv(rows, block_m), triton.cdiv(_target_programs(g.device), batch * tiles)))
    rows_per_split = triton.cdiv(triton.cdiv(rows, splits), block_m) * block_m
    splits = triton.cdiv(rows, rows_per_split)
    partial_w = torch.empty((batch, splits, c_g, K), device=g.device, dtype=torch.float32)
    partial_b = torch.empty((batch, splits, c_g), device=g.device, dtype=torch.float32) if bias_grad else partial_w
    _per_sample_conv3d_weight_grad_kernel[(tiles, batch * splits)](
        g, x, partial_w, partial_b,
        c_g, *g_size, c_x, *x_size, *kernel_size, *stride, *padding,
        *g.stride(), *x.stride(), rows_per_split, splits,
        SUM_ROWS=bias_grad, INPUT_PRECISION=_precision(x), UPCAST=_upcast(x),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=NUM_WARPS,
    )
    dw = partial_w.sum(dim=1).view(batch, c_g, *kernel_size, c_x).permute(0, 1, 5, 2, 3, 4)
    return dw, partial_b.sum(dim=1) if bias_grad else None


def per_sample_conv3d_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: Triple,
                               padding: Triple, needs_grad: tuple[bool, bool, bool]):
    """(dx, dw, db) of the conv, channels-last like the forward; None for a gradient nobody needs."""
    grad_x = grad_w = grad_b = None
    if needs_grad[0]:
        grad_x = _launch_conv_transpose3d(grad_y, weight, None, stride, padding, tuple(x.shape[1:4]))
    if needs_grad[1] or needs_grad[2]:
        grad_w, grad_b = _launch_weight_grad(grad_y, x, tuple(weight.shape[3:]), stride, padding, needs_grad[2])
    return grad_x, grad_w, grad_b


def per_sample_conv_transpose3d_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                        stride: Triple, padding: Triple) -> torch.Tensor:
    """Transposed conv of channels-last x [B, D, H, W, Cin]; returns channels-last y."""
    out_size = conv_transpose_output_size(tuple(x.shape[1:4]), tuple(weight.shape[3:]), stride, padding)
    return _launch_conv_transpose3d(x, weight, bias, stride, padding, out_size)


def per_sample_conv_transpose3d_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: Triple,
                                         padding: Triple, needs_grad: tuple[bool, bool, bool]):
    """(dx, dw, db) of the transposed conv: dx is a strided conv of grad_y, dw a conv weight gradient with
    the roles of input and output swapped, db the plain sum of grad_y."""
    grad_x = grad_w = grad_b = None
    if needs_grad[0]:
        grad_x = per_sample_conv3d_forward(grad_y, weight, None, stride, padding)
    if needs_grad[1]:
        grad_w, _ = _launch_weight_grad(x, grad_y, tuple(weight.shape[3:]), stride, padding, bias_grad=False)
    if needs_grad[2]:
        grad_b = grad_y.sum(dim=(1, 2, 3), dtype=torch.float32)
    return grad_x, grad_w, grad_b


def _public_gradients(grads, weight: torch.Tensor, bias: torch.Tensor | None):
    """Gradients in the caller's layout and dtypes."""
    grad_x, grad_w, grad_b = grads
    return (
        None if grad_x is None else _from_ndhwc(grad_x),
        None if grad_w is None else grad_w.to(weight.dtype),
        None if grad_b is None else grad_b.to(bias.dtype),
    )


class PerSampleConv3dFunction(torch.autograd.Function):
    """Autograd for the per-sample conv kernels; activations cross the boundary as [B, C, D, H, W]."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride: Triple, padding: Triple):
        x_cl = _to_ndhwc(x)
        ctx.save_for_backward(x_cl, weight, bias)
        ctx.geometry = (stride, padding)
        return _from_ndhwc(per_sample_conv3d_forward(x_cl, weight, bias, stride, padding))

    @staticmethod
    def backward(ctx, grad_y):
        x_cl, weight, bias = ctx.saved_tensors
        grads = per_sample_conv3d_backward(_to_ndhwc(grad_y), x_cl, weight, *ctx.geometry, ctx.needs_input_grad[:3])
        return (*_public_gradients(grads, weight, bias), None, None)


class PerSampleConvTranspose3dFunction(torch.autograd.Function):
    """Autograd for the per-sample transposed conv kernels."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride: Triple, padding: Triple):
        x_cl = _to_ndhwc(x)
        ctx.save_for_backward(x_cl, weight, bias)
        ctx.geometry = (stride, padding)
        return _from_ndhwc(per_sample_conv_transpose3d_forward(x_cl, weight, bias, stride, padding))

    @staticmethod
    def backward(ctx, grad_y):
        x_cl, weight, bias = ctx.saved_tensors
        grads = per_sample_conv_transpose3d_backward(_to_ndhwc(grad_y), x_cl, weight, *ctx.geometry,
                                                     ctx.needs_input_grad[:3])
        return (*_public_gradients(grads, weight, bias), None, None)
