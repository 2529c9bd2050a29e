"""Triton kernels of the per-sample conv family, their launchers and autograd Functions.

The gradient of a convolution with respect to its input is a transposed convolution with the same weight, and
the other way round, so a few kernels cover both ops and all their gradients.

On Hopper (and in the interpreter), where the input has whole 16-channel rows in contiguous channels-last memory:

* `_per_sample_conv3d_tma_forward_kernel`: a stride-1 conv, or a transposed conv of any stride (output phase by
  output phase), as an implicit GEMM over a box of output voxels whose input rows, for each tap, are the box
  shifted, which one TMA descriptor load brings in, zero outside the volume.  No per-row address or bounds
  arithmetic remains in its loop.  It runs the UNet's stride-1 convs, every input gradient (each a transposed
  conv; a stride-1 one as a conv with the flipped kernel, so that it reuses the forward conv's compiled kernel)
  and the transposed convs' forward.
* `_per_sample_conv3d_tma_weight_grad_kernel`: a stride-1 conv's weight gradient (and the bias gradient), the
  same boxes of x and of the output gradient read by descriptors, x's channel chunk as the dot's M.

Elsewhere (sm_80, strided convs, and the first and last layers' 1- and 2-channel tensors), the gathering kernels:

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

import contextlib
import math
from collections.abc import Iterator

import torch
import triton
import triton.language as tl

from ._dispatch import dot_precision, interpreting, stands_for_gpu
from .conv_shapes import Triple, conv_output_size, conv_transpose_output_size

NUM_WARPS = 4
WARP_THREADS = 32


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _voxel_coordinates(index, H, W):
    """(d, h, w) of flat voxel indices over a [*, H, W] grid (int32: computed once per tile, outside the loops)."""
    w = index % W
    hd = index // W
    return hd // H, hd % H, w


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
def _accumulate_run(
    acc,
    x_base,
    w_slab,
    row_offsets,
    ok,
    w0,
    W,
    stride_w,
    first_tap,
    k0,
    k_live,
    cols,
    col_ok,
    TAPS: tl.constexpr,
    TAP_STEP: tl.constexpr,
    KW: tl.constexpr,
    C_IN: tl.constexpr,
    C_OUT: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """acc + columns k0 .. k0 + BLOCK_K of one run of taps along w, for every row, times their rows of the
    weight slab w_slab ([KW, C_IN, C_OUT], the taps of one (kd, kh)).

    Along w a run of taps reads consecutive voxels, which channels-last memory holds as one contiguous run of
    TAPS x C_IN values: a row's run is one offset (`row_offsets`, column group 0 at voxel `w0`) plus column
    offsets that do not depend on the row.  Per row and run there is one offset and the d/h bounds test
    (`ok`); per column group the w test.  Column group g (voxel w0 + g) meets weight tap first_tap +
    TAP_STEP * g; columns from `k_live` on (0: the whole run is missing) and taps outside [0, KW) add nothing.
    """
    ks = k0 + tl.arange(0, BLOCK_K)
    g = ks // C_IN
    c = ks % C_IN
    tap = first_tap + TAP_STEP * g
    k_ok = (ks < k_live) & (ks < TAPS * C_IN) & (tap >= 0) & (tap < KW)
    w = w0[:, None] + g[None, :]
    a = tl.load(x_base + row_offsets[:, None] + (g * stride_w + c)[None, :], mask=ok[:, None] & k_ok[None, :] & (w >= 0) & (w < W), other=0.0)
    wt = tl.load(w_slab + (tap * C_IN + c)[:, None] * C_OUT + cols[None, :], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
    return _dot(a, wt, acc, INPUT_PRECISION, UPCAST)


@triton.jit
def _store_output_tile(
    acc, bias_ptr, y_ptr, pid_b, od, oh, ow, cols, row_ok, col_ok, stride_bb, stride_yb, stride_yd, stride_yh, stride_yw, HAS_BIAS: tl.constexpr
):
    """The forward kernels' epilogue: add the sample's bias to the fp32 tile and store it in y's dtype."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + pid_b * stride_bb + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y_offsets = (od * stride_yd + oh * stride_yh + ow * stride_yw)[:, None] + cols[None, :]
    tl.store(y_ptr + pid_b * stride_yb + y_offsets, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _per_sample_conv3d_forward_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    y_ptr,
    D_IN: tl.constexpr,
    H_IN: tl.constexpr,
    W_IN: tl.constexpr,
    D_OUT: tl.constexpr,
    H_OUT: tl.constexpr,
    W_OUT: tl.constexpr,
    stride_xb,
    stride_xd,
    stride_xh,
    stride_xw,
    stride_wb,
    stride_bb,
    stride_yb,
    stride_yd,
    stride_yh,
    stride_yw,
    C_IN: tl.constexpr,
    C_OUT: tl.constexpr,
    KD: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    SD: tl.constexpr,
    SH: tl.constexpr,
    SW: tl.constexpr,
    PD: tl.constexpr,
    PH: tl.constexpr,
    PW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """y[b, m, n] = sum over taps t and channels c of x[b, m * s - p + t, c] * w[b, t, c, n] + bias[b, n], w the
    tap-major [B, kd, kh, kw, Cin, Cout] weight; one loop trip per (kd, kh)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)  # 64-bit only in the base pointers

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < D_OUT * H_OUT * W_OUT
    od, oh, ow = _voxel_coordinates(rows, H_OUT, W_OUT)
    in_d, in_h, in_w = od * SD - PD, oh * SH - PH, ow * SW - PW
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < C_OUT

    x_base = x_ptr + pid_b * stride_xb
    w_base = w_ptr + pid_b * stride_wb
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    CHUNKS: tl.constexpr = (KW * C_IN + BLOCK_K - 1) // BLOCK_K
    for step in range(KD * KH * CHUNKS):  # one trip per chunk of a (kd, kh)'s run of KW taps along w
        slab = step // CHUNKS
        kd = slab // KH
        kh = slab % KH
        d = in_d + kd
        h = in_h + kh
        ok = row_ok & (d >= 0) & (d < D_IN) & (h >= 0) & (h < H_IN)
        acc = _accumulate_run(
            acc,
            x_base,
            w_base + slab * (KW * C_IN * C_OUT),
            d * stride_xd + h * stride_xh + in_w * stride_xw,
            ok,
            in_w,
            W_IN,
            stride_xw,
            0,
            (step % CHUNKS) * BLOCK_K,
            KW * C_IN,
            cols,
            col_ok,
            KW,
            1,
            KW,
            C_IN,
            C_OUT,
            BLOCK_K,
            INPUT_PRECISION,
            UPCAST,
        )

    _store_output_tile(acc, bias_ptr, y_ptr, pid_b, od, oh, ow, cols, row_ok, col_ok, stride_bb, stride_yb, stride_yd, stride_yh, stride_yw, HAS_BIAS)


@triton.jit
def _box_origin(box, H, W, BOX_D: tl.constexpr, BOX_H: tl.constexpr, BOX_W: tl.constexpr):
    """(d0, h0, w0) of box number `box` of a volume of H x W planes cut into BOX_D x BOX_H x BOX_W boxes, w fastest
    (H and W constexpr or not)."""
    BOXES_H = (H + BOX_H - 1) // BOX_H
    BOXES_W = (W + BOX_W - 1) // BOX_W
    return box // (BOXES_H * BOXES_W) * BOX_D, box // BOXES_W % BOXES_H * BOX_H, box % BOXES_W * BOX_W


@triton.jit
def _box_voxels(d0, h0, w0, BOX_D: tl.constexpr, BOX_H: tl.constexpr, BOX_W: tl.constexpr):
    """(d, h, w) of each row of the box at (d0, h0, w0), in the row order of a descriptor load of it."""
    r = tl.arange(0, BOX_D * BOX_H * BOX_W)
    return d0 + r // (BOX_H * BOX_W), h0 + r // BOX_W % BOX_H, w0 + r % BOX_W


@triton.jit
def _tma_tap(phase, j, S: tl.constexpr, P: tl.constexpr, TRANSPOSED: tl.constexpr):
    """Along one axis, the offset from a program's box to the input rows that tap j reads, and the weight tap it is.

    Conv (stride 1): output o reads input o - p + j with tap j.  Transposed conv, output phase r = o mod s: output
    o = q * s + r gathers input q + (r + p) // s - j with tap (r + p) mod s + j * s, a tap past the kernel (k not a
    multiple of s) reading nothing."""
    if TRANSPOSED:
        return (phase + P) // S - j, (phase + P) % S + j * S
    return j - P, j


@triton.jit
def _per_sample_conv3d_tma_forward_kernel(
    x_desc,
    w_ptr,
    bias_ptr,
    y_ptr,
    D_OUT,
    H_OUT,
    W_OUT,
    stride_wb,
    stride_bb,
    stride_yb,
    stride_yd,
    stride_yh,
    stride_yw,
    C_IN,
    C_OUT: tl.constexpr,
    KD: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    SD: tl.constexpr,
    SH: tl.constexpr,
    SW: tl.constexpr,
    PD: tl.constexpr,
    PH: tl.constexpr,
    PW: tl.constexpr,
    TRANSPOSED: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BOX_D: tl.constexpr,
    BOX_H: tl.constexpr,
    BOX_W: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """A stride-1 conv, or a transposed conv of any stride, with the activation read by the tensor-memory
    accelerator (Hopper's TMA).

    A program owns a BOX_D x BOX_H x BOX_W box of output voxels (of one output phase: voxels q * s + phase, the
    grid's third axis enumerating (sample, phase)).  For each tap the input rows it needs form the same box shifted
    (`_tma_tap`), which one descriptor load brings into shared memory, zero where the box leaves the volume: no
    per-row address or bounds arithmetic remains in the loop, one trip per (tap, chunk of BLOCK_K channels).
    There is always a bias (zeros where the op has none), so that a stride-1 conv's input gradient, run as a conv
    with the flipped kernel, shares the compiled kernel of the forward conv with its channel counts; and the input
    channels and the volume's size are run-time values, so that convs of the same output channels and K tile share
    one too (the decoder's first conv with the level's others, the 128-channel convs at two levels): fewer kernels
    to compile in a run's first step (`hsort bench --static`), for a few instructions a trip.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_b = tl.program_id(2) // (SD * SH * SW)  # a descriptor coordinate (int32); 64-bit in the base pointers
    phase = tl.program_id(2) % (SD * SH * SW)
    phase_d = phase // (SH * SW)
    phase_h = phase // SW % SH
    phase_w = phase % SW
    d0, h0, w0 = _box_origin(pid_m, (H_OUT + SH - 1) // SH, (W_OUT + SW - 1) // SW, BOX_D, BOX_H, BOX_W)  # of the phase's voxels
    BLOCK_M: tl.constexpr = BOX_D * BOX_H * BOX_W
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < C_OUT

    w_base = w_ptr + pid_b.to(tl.int64) * stride_wb
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    TD: tl.constexpr = (KD + SD - 1) // SD
    TH: tl.constexpr = (KH + SH - 1) // SH
    TW: tl.constexpr = (KW + SW - 1) // SW
    j = 0  # the trip's tap of the phase
    c0 = 0  # and its chunk of channels (the launcher takes BLOCK_K dividing C_IN)
    for _ in range(TD * TH * TW * (C_IN // BLOCK_K)):
        shift_d, kd = _tma_tap(phase_d, j // (TH * TW), SD, PD, TRANSPOSED)
        shift_h, kh = _tma_tap(phase_h, j // TW % TH, SH, PH, TRANSPOSED)
        shift_w, kw = _tma_tap(phase_w, j % TW, SW, PW, TRANSPOSED)
        a = x_desc.load([pid_b, d0 + shift_d, h0 + shift_h, w0 + shift_w, c0]).reshape(BLOCK_M, BLOCK_K)
        ks = ((kd * KH + kh) * KW + kw) * C_IN + c0 + tl.arange(0, BLOCK_K)
        w_ok = col_ok[None, :]
        if TRANSPOSED:  # a tap past the kernel (k not a multiple of s) reads nothing
            k_live = tl.where((kd < KD) & (kh < KH) & (kw < KW), KD * KH * KW * C_IN, 0)
            w_ok = (ks < k_live)[:, None] & w_ok
        wt = tl.load(w_base + ks[:, None] * C_OUT + cols[None, :], mask=w_ok, other=0.0)
        acc = _dot(a, wt, acc, INPUT_PRECISION, UPCAST)
        c0 += BLOCK_K
        j += (c0 == C_IN).to(tl.int32)
        c0 = tl.where(c0 == C_IN, 0, c0)

    qd, qh, qw = _box_voxels(d0, h0, w0, BOX_D, BOX_H, BOX_W)
    od, oh, ow = qd * SD + phase_d, qh * SH + phase_h, qw * SW + phase_w
    row_ok = (od < D_OUT) & (oh < H_OUT) & (ow < W_OUT)
    _store_output_tile(acc, bias_ptr, y_ptr, pid_b.to(tl.int64), od, oh, ow, cols, row_ok, col_ok, stride_bb, stride_yb, stride_yd, stride_yh, stride_yw, True)


@triton.jit
def _per_sample_conv_transpose3d_forward_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    y_ptr,
    D_IN: tl.constexpr,
    H_IN: tl.constexpr,
    W_IN: tl.constexpr,
    D_OUT: tl.constexpr,
    H_OUT: tl.constexpr,
    W_OUT: tl.constexpr,
    stride_xb,
    stride_xd,
    stride_xh,
    stride_xw,
    stride_wb,
    stride_bb,
    stride_yb,
    stride_yd,
    stride_yh,
    stride_yw,
    C_IN: tl.constexpr,
    C_OUT: tl.constexpr,
    KD: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    SD: tl.constexpr,
    SH: tl.constexpr,
    SW: tl.constexpr,
    PD: tl.constexpr,
    PH: tl.constexpr,
    PW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """y[b, i, n] = sum over taps t and input voxels o with i = o * s - p + t of x[b, o, c] * w[b, t, c, n].

    Gathered per output phase (i mod s per axis): within one phase the contributing taps are fixed,
    t = r, r + s, ... with r = (phase + p) mod s, so a k4 s2 program multiplies its 8 live taps and not
    all 64.  The grid's third axis enumerates (sample, phase); one loop trip per live (kd, kh).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_bp = tl.program_id(2)
    pid_b = (pid_bp // (SD * SH * SW)).to(tl.int64)
    phase = pid_bp % (SD * SH * SW)
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
    TD: tl.constexpr = (KD + SD - 1) // SD
    TH: tl.constexpr = (KH + SH - 1) // SH
    TW: tl.constexpr = (KW + SW - 1) // SW

    x_base = x_ptr + pid_b * stride_xb
    w_base = w_ptr + pid_b * stride_wb
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w0 = base_w - (TW - 1)  # the run's voxels ascend along w while its taps j descend: group g is j = TW - 1 - g
    first_tap = rw + (TW - 1) * SW
    CHUNKS: tl.constexpr = (TW * C_IN + BLOCK_K - 1) // BLOCK_K
    for step in range(TD * TH * CHUNKS):  # one trip per chunk of a live (kd, kh)'s run of taps along w
        slab = step // CHUNKS
        jd = slab // TH
        jh = slab % TH
        td = rd + jd * SD
        th = rh + jh * SH
        d = base_d - jd
        h = base_h - jh
        ok = row_ok & (d >= 0) & (d < D_IN) & (h >= 0) & (h < H_IN)
        k_live = tl.where((td < KD) & (th < KH), TW * C_IN, 0)  # 0: this phase lacks the slab
        acc = _accumulate_run(
            acc,
            x_base,
            w_base + (td * KH + th) * (KW * C_IN * C_OUT),
            d * stride_xd + h * stride_xh + w0 * stride_xw,
            ok,
            w0,
            W_IN,
            stride_xw,
            first_tap,
            (step % CHUNKS) * BLOCK_K,
            k_live,
            cols,
            col_ok,
            TW,
            -SW,
            KW,
            C_IN,
            C_OUT,
            BLOCK_K,
            INPUT_PRECISION,
            UPCAST,
        )

    _store_output_tile(acc, bias_ptr, y_ptr, pid_b, od, oh, ow, cols, row_ok, col_ok, stride_bb, stride_yb, stride_yd, stride_yh, stride_yw, HAS_BIAS)


@triton.jit
def _per_sample_conv3d_weight_grad_kernel(
    g_ptr,
    x_ptr,
    partial_w_ptr,
    partial_b_ptr,
    TILES_PER_SPLIT,
    SPLITS,
    D_G: tl.constexpr,
    H_G: tl.constexpr,
    W_G: tl.constexpr,
    D_X: tl.constexpr,
    H_X: tl.constexpr,
    W_X: tl.constexpr,
    C_G: tl.constexpr,
    C_X: tl.constexpr,
    KD: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    SD: tl.constexpr,
    SH: tl.constexpr,
    SW: tl.constexpr,
    PD: tl.constexpr,
    PH: tl.constexpr,
    PW: tl.constexpr,
    FLAT: tl.constexpr,
    SUM_ROWS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """partial_w[b, split, k, n] = sum over this split's voxels m of im2col(x[b])[m, k] * g[b, m, n].

    g (contiguous [B, D_G, H_G, W_G, C_G]) lives on the conv's output grid, x (contiguous [B, D_X, H_X, W_X, C_X])
    on its input grid, k = (kd, kh, kw, c) with c innermost.  A program owns one chunk of one (kd, kh) slab's
    run of KW x C_X columns (contiguous in x, as in the forward kernels; with FLAT, a K of at most one tile such
    as the first layer's 27 x 1, every tap) and sweeps tiles of BLOCK_M consecutive voxels along one w-line of
    g: for them the im2col rows are a sliding window over one line of x, so every offset and bounds test is a
    constant of the tile plus one scalar per line, and no per-voxel index arithmetic remains.  The K chunk is
    the dot's M (>= 64, so Hopper's wgmma applies whatever Cout is).  With SUM_ROWS the first chunk's programs
    also write partial_b[b, split, n] = sum_m g[b, m, n], the conv's bias gradient, from the tiles they load.
    """
    pid_nk = tl.program_id(0)
    pid_bs = tl.program_id(1)
    SLABS: tl.constexpr = 1 if FLAT else KD * KH
    RUN_K: tl.constexpr = (KD * KH * KW if FLAT else KW) * C_X
    CHUNKS: tl.constexpr = (RUN_K + BLOCK_K - 1) // BLOCK_K
    W_BLOCKS: tl.constexpr = (W_G + BLOCK_M - 1) // BLOCK_M
    TILES: tl.constexpr = D_G * H_G * W_BLOCKS
    pid_n = pid_nk // (SLABS * CHUNKS)
    slab = (pid_nk // CHUNKS) % SLABS
    chunk = pid_nk % CHUNKS
    pid_b = (pid_bs // SPLITS).to(tl.int64)
    split = pid_bs % SPLITS

    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = ns < C_G
    ks = chunk * BLOCK_K + tl.arange(0, BLOCK_K)  # column of the slab's run: tap * C_X + c
    k_ok = ks < RUN_K
    col_tap = ks // C_X
    if FLAT:  # every column its own (kd, kh, kw)
        col_d = col_tap // (KH * KW)
        col_h = (col_tap // KW) % KH
        col_w = col_tap % KW
    else:  # one (kd, kh) for every column, as vectors so that every bounds test below is one of vectors
        col_d = slab // KH + tl.zeros_like(ks)
        col_h = slab % KH + tl.zeros_like(ks)
        col_w = col_tap
    col_offsets = (col_d * H_X + col_h) * (W_X * C_X) + col_w * C_X + ks % C_X
    r = tl.arange(0, BLOCK_M)
    g_base = g_ptr + pid_b * (D_G * H_G * W_G * C_G)
    x_base = x_ptr + pid_b * (D_X * H_X * W_X * C_X)

    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    g_sum = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # summed over rows once, after the loop
    first = split * TILES_PER_SPLIT
    for t in range(first, tl.minimum(first + TILES_PER_SPLIT, TILES)):
        line = t // W_BLOCKS
        w_start = (t % W_BLOCKS) * BLOCK_M
        od = line // H_G
        oh = line % H_G
        row_ok = r < W_G - w_start
        g = tl.load(g_base + (line * W_G + w_start) * C_G + (r * C_G)[:, None] + ns[None, :], mask=row_ok[:, None] & n_ok[None, :], other=0.0)
        d = od * SD - PD + col_d
        h = oh * SH - PH + col_h
        col_ok = k_ok & (d >= 0) & (d < D_X) & (h >= 0) & (h < H_X)
        w = (w_start * SW - PW + r * SW)[:, None] + col_w[None, :]
        x_line = x_base + ((od * SD - PD) * H_X + (oh * SH - PH)) * (W_X * C_X) + (w_start * SW - PW) * C_X
        a = tl.load(x_line + (r * (SW * C_X))[:, None] + col_offsets[None, :], mask=(row_ok[:, None] & col_ok[None, :]) & (w >= 0) & (w < W_X), other=0.0)
        acc = _dot(tl.trans(a), g, acc, INPUT_PRECISION, UPCAST)
        if SUM_ROWS:
            g_sum += g.to(tl.float32)

    partial_base = pid_b * SPLITS + split
    w_offsets = (partial_base * (SLABS * RUN_K) + slab * RUN_K + ks)[:, None] * C_G + ns[None, :]
    tl.store(partial_w_ptr + w_offsets, acc, mask=k_ok[:, None] & n_ok[None, :])
    if SUM_ROWS:  # noqa: SIM102 (a constexpr branch, compiled out; the inner test runs on the GPU)
        if slab + chunk == 0:
            tl.store(partial_b_ptr + partial_base * C_G + ns, tl.sum(g_sum, axis=0), mask=n_ok)


@triton.jit
def _load_box(
    t_ptr,
    pid_b,
    d0,
    h0,
    w0,
    n0,
    D: tl.constexpr,
    H: tl.constexpr,
    W: tl.constexpr,
    C: tl.constexpr,
    BOX_D: tl.constexpr,
    BOX_H: tl.constexpr,
    BOX_W: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The [BOX_D * BOX_H * BOX_W, BLOCK_N] box of contiguous [B, D, H, W, C] memory at (d0, h0, w0, n0), zero outside,
    as a descriptor load would give it."""
    d, h, w = _box_voxels(d0, h0, w0, BOX_D, BOX_H, BOX_W)
    ns = n0 + tl.arange(0, BLOCK_N)
    rows = ((pid_b.to(tl.int64) * D + d) * H + h) * W + w
    return tl.load(t_ptr + rows[:, None] * C + ns[None, :], mask=((d < D) & (h < H) & (w < W))[:, None] & (ns < C)[None, :], other=0.0)


@triton.jit
def _per_sample_conv3d_tma_weight_grad_kernel(
    g_desc,
    x_desc,
    partial_w_ptr,
    partial_b_ptr,
    BOXES_PER_SPLIT,
    SPLITS,
    C_X,
    D_G: tl.constexpr,
    H_G: tl.constexpr,
    W_G: tl.constexpr,
    C_G: tl.constexpr,
    KD: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    PD: tl.constexpr,
    PH: tl.constexpr,
    PW: tl.constexpr,
    TAP_RUN: tl.constexpr,
    FIRST_RUN: tl.constexpr,
    G_DESCRIPTOR: tl.constexpr,
    BIAS_SUM: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BOX_D: tl.constexpr,
    BOX_H: tl.constexpr,
    BOX_W: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """partial_w[b, split, t * C_X + c, n] = sum over this split's boxes of output voxels m of x[b, m - p + t, c] * g[b, m, n]
    for a stride-1 conv, both operands read by descriptor loads (zero outside the volume, so no masks); g by
    masked loads instead where its rows are too narrow for a descriptor (G_DESCRIPTOR false: g_desc is a pointer).

    A program owns a run of TAP_RUN taps along w (from run FIRST_RUN on: (kd, kh) and the run's first kw), one
    chunk of BLOCK_C channels of x and one block of BLOCK_N channels of g: each box of g it loads serves the run's
    taps, one accumulator each.  The chunk is the dot's M and at least 64 wide, so that Hopper's wgmma applies: a
    box wider than x's channels reads zeros beyond them.  Unless BIAS_SUM is "none", the programs of run 0's first
    chunk also write partial_b[b, split, n] = sum_m g[b, m, n], the conv's bias gradient, summed in the loop by
    every program of the launch: "dot" by one more dot with a tile of ones (16-bit g: ~64 more instructions a trip
    at 16 channels, so all runs are one launch and one compiled kernel), "add" in registers (float32 g, where that
    TF32 dot took ~350 and spilled: ~100, and so in a launch of run 0 alone, that the other runs do not pay).
    """
    pid_rcn = tl.program_id(0)
    pid_bs = tl.program_id(1)
    C_CHUNKS = tl.cdiv(C_X, BLOCK_C)  # C_X at run time: a level's convs with C_G channels share a compiled kernel
    N_BLOCKS: tl.constexpr = (C_G + BLOCK_N - 1) // BLOCK_N
    RUNS_W: tl.constexpr = (KW + TAP_RUN - 1) // TAP_RUN
    run = FIRST_RUN + pid_rcn // (C_CHUNKS * N_BLOCKS)
    c0 = pid_rcn // N_BLOCKS % C_CHUNKS * BLOCK_C
    n0 = pid_rcn % N_BLOCKS * BLOCK_N
    kd = run // (KH * RUNS_W)
    kh = run // RUNS_W % KH
    kw0 = run % RUNS_W * TAP_RUN
    pid_b = pid_bs // SPLITS
    split = pid_bs % SPLITS
    BOXES: tl.constexpr = (D_G + BOX_D - 1) // BOX_D * ((H_G + BOX_H - 1) // BOX_H) * ((W_G + BOX_W - 1) // BOX_W)
    BLOCK_M: tl.constexpr = BOX_D * BOX_H * BOX_W

    accs = (tl.zeros((BLOCK_C, BLOCK_N), dtype=tl.float32),) * TAP_RUN
    if BIAS_SUM == "dot":
        g_sum = tl.zeros((BLOCK_N, 16), dtype=tl.float32)  # each column the sum of g's rows so far
    else:
        g_sum = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # summed over its rows after the loop
    first = split * BOXES_PER_SPLIT
    for box in range(first, tl.minimum(first + BOXES_PER_SPLIT, BOXES)):
        d0, h0, w0 = _box_origin(box, H_G, W_G, BOX_D, BOX_H, BOX_W)
        if G_DESCRIPTOR:
            g = g_desc.load([pid_b, d0, h0, w0, n0]).reshape(BLOCK_M, BLOCK_N)
        else:  # rows of too few channels for a descriptor (the last conv's 2): masked loads, once per box
            g = _load_box(g_desc, pid_b, d0, h0, w0, n0, D_G, H_G, W_G, C_G, BOX_D, BOX_H, BOX_W, BLOCK_N)
        updated = ()
        for j in tl.static_range(TAP_RUN):
            x = x_desc.load([pid_b, d0 + kd - PD, h0 + kh - PH, w0 + kw0 + j - PW, c0]).reshape(BLOCK_M, BLOCK_C)
            updated = updated + (_dot(tl.trans(x), g, accs[j], INPUT_PRECISION, UPCAST),)
        accs = updated
        if BIAS_SUM == "dot":
            g_sum = _dot(tl.trans(g), tl.full((BLOCK_M, 16), 1.0, g.dtype), g_sum, INPUT_PRECISION, UPCAST)
        elif BIAS_SUM == "add":
            g_sum += g.to(tl.float32)

    cs = c0 + tl.arange(0, BLOCK_C)
    ns = n0 + tl.arange(0, BLOCK_N)
    partial_base = pid_b.to(tl.int64) * SPLITS + split
    for j in tl.static_range(TAP_RUN):
        tap = (kd * KH + kh) * KW + kw0 + j
        w_offsets = (partial_base * (KD * KH * KW * C_X) + tap * C_X + cs)[:, None] * C_G + ns[None, :]
        tl.store(partial_w_ptr + w_offsets, accs[j], mask=(cs < C_X)[:, None] & (ns < C_G)[None, :])
    if BIAS_SUM != "none":  # noqa: SIM102 (a constexpr branch, compiled out; the inner test runs on the GPU)
        if (run == 0) & (c0 == 0):
            db = tl.max(g_sum, axis=1) if BIAS_SUM == "dot" else tl.sum(g_sum, axis=0)  # "dot": equal columns
            tl.store(partial_b_ptr + partial_base * C_G + ns, db, mask=ns < C_G)


# ---------------------------------------------------------------------------------------------
# Launchers (activations channels-last, [B, D, H, W, C])
# ---------------------------------------------------------------------------------------------


def _to_ndhwc(t: torch.Tensor) -> torch.Tensor:
    """[B, C, D, H, W] -> [B, D, H, W, C] over channels-last memory; free when t already is channels-last."""
    return t.contiguous(memory_format=torch.channels_last_3d).permute(0, 2, 3, 4, 1)


def _from_ndhwc(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 4, 1, 2, 3)


def _data_blocks(run_k: int, c_out: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K) of the forward kernels: all output channels in one tile up to 128, so a
    gathered activation tile is loaded once, at most 8K fp32 accumulators per program (64 per thread), and a
    run of taps along w (run_k = taps x Cin columns) in chunks of up to 64 (at least 16, the dot's least K)."""
    block_n = min(max(triton.next_power_of_2(c_out), 16), 128)
    block_k = min(max(triton.next_power_of_2(run_k), 16), 64)
    return (64 if block_n == 128 else 128), block_n, block_k


def _geometry(kernel_size: Triple, stride: Triple, padding: Triple) -> dict[str, int]:
    """Kernel size, stride and padding as the kernels' constexprs: each layer's loops are unrolled and its
    index arithmetic folded for its own shape (the UNet has a handful)."""
    names = ("KD", "KH", "KW", "SD", "SH", "SW", "PD", "PH", "PW")
    return dict(zip(names, (*kernel_size, *stride, *padding)))


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    """t with contiguous channels (its last axis), which the kernels' vector loads assume."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _precision(x: torch.Tensor) -> str:
    return dot_precision(x.dtype, x.device, torch.backends.cudnn.allow_tf32)


def _upcast(x: torch.Tensor) -> bool:
    return x.dtype == torch.bfloat16 and interpreting()


def _bias_args(bias: torch.Tensor | None, fallback: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Bias pointer and batch stride; a kernel without bias gets any pointer and never reads it."""
    if bias is None:
        return fallback, 0
    bias = _channels_last(bias)
    return bias, bias.stride(0)


def _launch_data_kernel(
    kernel,
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    y: torch.Tensor,
    grid: tuple[int, int, int],
    blocks: tuple[int, int, int],
    kernel_size: Triple,
    stride: Triple,
    padding: Triple,
) -> torch.Tensor:
    """Launch a forward kernel on channels-last x, the tap-major [B, kd, kh, kw, Cin, Cout] weight w and y."""
    x = _channels_last(x)
    bias_ptr, bias_stride = _bias_args(bias, y)
    block_m, block_n, block_k = blocks
    kernel[grid](
        x,
        w,
        bias_ptr,
        y,
        *x.shape[1:4],
        *y.shape[1:4],
        *x.stride()[:4],
        w.stride(0),
        bias_stride,
        *y.stride()[:4],
        C_IN=x.shape[4],
        C_OUT=y.shape[4],
        **_geometry(kernel_size, stride, padding),
        HAS_BIAS=bias is not None,
        INPUT_PRECISION=_precision(x),
        UPCAST=_upcast(x),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=NUM_WARPS,
    )
    return y


def per_sample_conv3d_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: Triple, padding: Triple) -> torch.Tensor:
    """Conv of channels-last x [B, D, H, W, Cin] with weight [B, Cout, Cin, kd, kh, kw]; returns
    channels-last y [B, Do, Ho, Wo, Cout]."""
    batch, *size, c_in = x.shape
    c_out, kernel_size = weight.shape[1], tuple(weight.shape[3:])
    out_size = conv_output_size(tuple(size), kernel_size, stride, padding)
    y = x.new_empty((batch, *out_size, c_out))
    w = weight.permute(0, 3, 4, 5, 2, 1).contiguous()  # [B, kd, kh, kw, Cin, Cout]: a [B, K, Cout] matrix
    if _tma_applies(x, stride):
        return _launch_tma_forward(x, w, bias, y, kernel_size, stride, padding, transposed=False)
    blocks = _data_blocks(kernel_size[2] * c_in, c_out)
    grid = (triton.cdiv(out_size[0] * out_size[1] * out_size[2], blocks[0]), triton.cdiv(c_out, blocks[1]), batch)
    return _launch_data_kernel(_per_sample_conv3d_forward_kernel, x, w, bias, y, grid, blocks, kernel_size, stride, padding)


META_CAPABILITY = (9, 0)  # the GPU that meta tensors stand for (`hsort bench --static --arch` sets it)
TMA_CHANNELS = 16  # the descriptor path's least channel count: 16-byte rows in every dtype, one dot's least K


@contextlib.contextmanager
def meta_tensors_stand_for(capability: tuple[int, int]) -> Iterator[None]:
    """Choose kernels for meta tensors as for a GPU of this compute capability (TMA from 9.0 on)."""
    global META_CAPABILITY
    before, META_CAPABILITY = META_CAPABILITY, capability
    try:
        yield
    finally:
        META_CAPABILITY = before


def _has_tma(device: torch.device) -> bool:
    """Hopper and later load tiles with the tensor-memory accelerator; the interpreter emulates it."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (9, 0)
    if device.type == "meta":
        return META_CAPABILITY >= (9, 0)
    return interpreting()


def _descriptor_fits(t: torch.Tensor) -> bool:
    """Whether a TMA descriptor can read t: whole 16-channel rows in contiguous, 16-byte-aligned channels-last memory."""
    return t.shape[-1] % TMA_CHANNELS == 0 and t.is_contiguous() and t.data_ptr() % 16 == 0 and _has_tma(t.device)


def _tma_applies(x: torch.Tensor, stride: Triple) -> bool:
    """Whether the descriptor kernels run a conv (not transposed) of x: stride 1, x readable by a descriptor.
    A transposed conv needs only the latter: its output phases make any stride a shift of the input box."""
    return stride == (1, 1, 1) and _descriptor_fits(x)


def _tma_blocks(c_in: int, c_out: int, element_size: int) -> tuple[tuple[int, int, int], int, int]:
    """(box of output voxels, BLOCK_N, BLOCK_K) of the descriptor kernel.

    A box is 8 x 8 voxels in an (h, w) plane (the UNet's sides, 168 / 2^level, are mostly multiples of 8) and as
    many planes deep as the accumulators allow, since a loop trip's fixed cost (barriers, pipeline stages) is shared
    by the box's rows: 128 fp32 accumulators a thread, 64 where the K tile is wider than N (the decoder's first
    convs, which spilled with 128), half as many rows for 4-byte elements (their stages spilled too).
    """
    block_n = min(max(triton.next_power_of_2(c_out), 16), 128)
    block_k = min(c_in & -c_in, 64)
    accumulators = (128 if block_k <= block_n else 64) * NUM_WARPS * WARP_THREADS
    planes = max(1, accumulators // (64 * block_n) * 2 // element_size)
    return (planes, 8, 8), block_n, block_k


def _launch_tma_forward(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor, kernel_size: Triple, stride: Triple, padding: Triple, transposed: bool
) -> torch.Tensor:
    """The conv (stride 1) or transposed conv of contiguous channels-last x with the tap-major weight w, through a
    descriptor over x."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    batch, *out_size, c_out = y.shape
    box, block_n, block_k = _tma_blocks(x.shape[-1], c_out, x.element_size())
    x_desc = TensorDescriptor.from_tensor(x, [1, *box, block_k])
    bias_ptr, bias_stride = _bias_args(y.new_zeros((batch, c_out)) if bias is None else bias, y)
    boxes = math.prod(triton.cdiv(triton.cdiv(n, s), b) for n, s, b in zip(out_size, stride, box))
    _per_sample_conv3d_tma_forward_kernel[(boxes, triton.cdiv(c_out, block_n), batch * math.prod(stride))](
        x_desc,
        w,
        bias_ptr,
        y,
        *out_size,
        w.stride(0),
        bias_stride,
        *y.stride()[:4],
        x.shape[-1],
        C_OUT=c_out,
        **_geometry(kernel_size, stride, padding),
        TRANSPOSED=transposed,
        INPUT_PRECISION=_precision(x),
        UPCAST=_upcast(x),
        BOX_D=box[0],
        BOX_H=box[1],
        BOX_W=box[2],
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=NUM_WARPS,
    )
    return y


def _launch_conv_transpose3d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: Triple, padding: Triple, out_size: Triple
) -> torch.Tensor:
    """Channels-last transposed conv of x [B, D, H, W, Cin] with weight [B, Cin, Cout, kd, kh, kw]."""
    batch, *size, c_in = x.shape
    c_out, kernel_size = weight.shape[2], tuple(weight.shape[3:])
    y = x.new_empty((batch, *out_size, c_out))
    x, w = _channels_last(x), weight.permute(0, 3, 4, 5, 1, 2)  # w: [B, kd, kh, kw, Cin, Cout]
    if _descriptor_fits(x):
        if stride == (1, 1, 1):  # a conv with the flipped kernel: the forward conv's compiled kernel serves it
            conv_padding = tuple(k - 1 - p for k, p in zip(kernel_size, padding))
            return _launch_tma_forward(x, w.flip(1, 2, 3).contiguous(), bias, y, kernel_size, stride, conv_padding, transposed=False)
        return _launch_tma_forward(x, w.contiguous(), bias, y, kernel_size, stride, padding, transposed=True)
    w = w.contiguous()
    blocks = _data_blocks(triton.cdiv(kernel_size[2], stride[2]) * c_in, c_out)
    phase_voxels = 1
    for n, s in zip(out_size, stride):
        phase_voxels *= triton.cdiv(n, s)
    grid = (triton.cdiv(phase_voxels, blocks[0]), triton.cdiv(c_out, blocks[1]), batch * stride[0] * stride[1] * stride[2])
    return _launch_data_kernel(_per_sample_conv_transpose3d_forward_kernel, x, w, bias, y, grid, blocks, kernel_size, stride, padding)


HOPPER_MULTIPROCESSORS = 132  # H100 SXM and H200: what meta tensors stand for (`hsort bench --static`)


def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return HOPPER_MULTIPROCESSORS


def _target_programs(device: torch.device) -> int:
    """Programs that keep a GPU busy; under the interpreter a few, which still exercises the split reduction."""
    return 4 * _multiprocessors(device) if stands_for_gpu(device) else 8


TILE_COST = 60  # instructions a weight-gradient tile issues besides those per voxel (`hsort bench --static`)


def _line_block(width: int) -> int:
    """BLOCK_M of the weight gradient: tiles of voxels along a w-line of `width`.  A tile issues about
    TILE_COST + BLOCK_M instructions per thread whatever share of its voxels lies inside the line, so take the
    size from 128, 64, 32, 16 with the fewest instructions per voxel inside."""
    return min((128, 64, 32, 16), key=lambda block: (TILE_COST + block) * triton.cdiv(width, block) / width)


TMA_STAGE_BYTES, TMA_STAGES = 108 * 1024, 2  # shared memory of one pipeline stage of the TMA weight gradient, and its stages
MAX_TAP_RUN = 3  # taps along w that share a box of g in the TMA weight gradient, each with its own accumulator


def _split_count(work: int, programs_per_split: int, device: torch.device) -> tuple[int, int]:
    """(splits, work items per split): enough programs to fill the GPU, each with a whole number of items."""
    splits = max(1, min(work, triton.cdiv(_target_programs(device), programs_per_split)))
    per_split = triton.cdiv(work, splits)
    return triton.cdiv(work, per_split), per_split


def _weight_grad_chunk(c_x: int, element_size: int) -> int:
    """BLOCK_C of the TMA weight gradient, the dot's M: 64, the least M of Hopper's wgmma, padded with zeros beyond
    x's channels; but 16 for float32 with at most 16 channels, where wgmma (TF32 reads a transposed operand only
    through registers) would transpose four times the live data and mma.sync costs less (`hsort bench --static`)."""
    return 16 if element_size == 4 and c_x <= 16 else 64


def _weight_grad_box(row_elements: int, element_size: int) -> tuple[int, int, int]:
    """The TMA weight gradient's box of voxels: 8 x 8 in an (h, w) plane, as many planes (up to 8) as one pipeline
    stage of TMA_STAGE_BYTES holds rows of `row_elements` (the run's x chunks and g's block)."""
    rows = TMA_STAGE_BYTES // (row_elements * element_size)
    return (min(max((1 << (rows.bit_length() - 1)) // 64, 1), 8), 8, 8)


def _reduced_partials(partial_w: torch.Tensor, partial_b: torch.Tensor | None, kernel_size: Triple) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The splits' partial sums added up: dw as [B, N, C, kd, kh, kw] and the bias gradient as [B, N] (or None)."""
    batch, _, k, c_g = partial_w.shape
    c_x = k // math.prod(kernel_size)
    dw = partial_w.sum(dim=1).view(batch, *kernel_size, c_x, c_g).permute(0, 5, 4, 1, 2, 3)
    return dw, None if partial_b is None else partial_b.sum(dim=1)


def _launch_tma_weight_grad(
    g: torch.Tensor, x: torch.Tensor, kernel_size: Triple, padding: Triple, bias_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The stride-1 weight gradient through descriptors over g and x; returns what `_launch_weight_grad` returns.
    The bias gradient is summed by a dot in the one launch for 16-bit g, in registers by a launch of the first run of
    taps for float32 (the kernel's docstring says why)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    batch, *g_size, c_g = g.shape
    c_x = x.shape[-1]
    block_n, block_c = min(max(triton.next_power_of_2(c_g), 16), 64), _weight_grad_chunk(c_x, x.element_size())
    tap_run = kernel_size[2] if kernel_size[2] <= MAX_TAP_RUN else 1  # divides KW: every run is whole
    box = _weight_grad_box(tap_run * block_c + block_n, x.element_size())
    boxes = math.prod(triton.cdiv(n, b) for n, b in zip(g_size, box))
    runs = kernel_size[0] * kernel_size[1] * triton.cdiv(kernel_size[2], tap_run)
    tiles_per_run = triton.cdiv(c_x, block_c) * triton.cdiv(c_g, block_n)
    splits, boxes_per_split = _split_count(boxes, batch * runs * tiles_per_run, g.device)
    taps = kernel_size[0] * kernel_size[1] * kernel_size[2]
    partial_w = torch.empty((batch, splits, taps * c_x, c_g), device=g.device, dtype=torch.float32)
    partial_b = torch.empty((batch, splits, c_g), device=g.device, dtype=torch.float32) if bias_grad else partial_w
    geometry = _geometry(kernel_size, (1, 1, 1), padding)
    g_by_descriptor = _descriptor_fits(g)
    g_operand = TensorDescriptor.from_tensor(g, [1, *box, block_n]) if g_by_descriptor else g
    descriptors = (g_operand, TensorDescriptor.from_tensor(x, [1, *box, block_c]))
    if not bias_grad:
        launches = ((0, runs, "none"),)
    elif g.element_size() == 2:
        launches = ((0, runs, "dot"),)
    else:
        launches = ((0, 1, "add"), (1, runs - 1, "none"))
    for first_run, launch_runs, bias_sum in launches:
        if launch_runs == 0:
            continue
        _per_sample_conv3d_tma_weight_grad_kernel[(launch_runs * tiles_per_run, batch * splits)](
            *descriptors,
            partial_w,
            partial_b,
            boxes_per_split,
            splits,
            c_x,
            *g_size,
            C_G=c_g,
            **{k: geometry[k] for k in ("KD", "KH", "KW", "PD", "PH", "PW")},
            TAP_RUN=tap_run,
            FIRST_RUN=first_run,
            G_DESCRIPTOR=g_by_descriptor,
            BIAS_SUM=bias_sum,
            INPUT_PRECISION=_precision(x),
            UPCAST=_upcast(x),
            BOX_D=box[0],
            BOX_H=box[1],
            BOX_W=box[2],
            BLOCK_N=block_n,
            BLOCK_C=block_c,
            num_warps=NUM_WARPS,
            num_stages=TMA_STAGES,
        )
    return _reduced_partials(partial_w, partial_b if bias_grad else None, kernel_size)


def _launch_weight_grad(
    g: torch.Tensor, x: torch.Tensor, kernel_size: Triple, stride: Triple, padding: Triple, bias_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dw[b, n, c, t] = sum_m g[b, m, n] x[b, m * s - p + t, c] for g [B, Do, Ho, Wo, N], x [B, Di, Hi, Wi, C].

    Returns dw as [B, N, C, kd, kh, kw] in float32 and, with `bias_grad`, sum_m g[b, m, n] as [B, N].
    """
    g, x = g.contiguous(), x.contiguous()  # [B, D, H, W, C] views of channels-last memory: free
    if _tma_applies(x, stride) and g.is_contiguous():
        return _launch_tma_weight_grad(g, x, kernel_size, padding, bias_grad)
    batch, *g_size, c_g = g.shape
    _, *x_size, c_x = x.shape
    K = kernel_size[0] * kernel_size[1] * kernel_size[2] * c_x
    block_m, block_k = _line_block(g_size[2]), 64
    block_n = min(max(triton.next_power_of_2(c_g), 16), 64)
    flat = block_k >= K  # one tile holds every tap: better than a run of KW x C_X padded to 64 for tiny C_X
    slabs, run_k = (1, K) if flat else (kernel_size[0] * kernel_size[1], kernel_size[2] * c_x)
    tiles = triton.cdiv(c_g, block_n) * slabs * triton.cdiv(run_k, block_k)
    line_tiles = g_size[0] * g_size[1] * triton.cdiv(g_size[2], block_m)
    splits, tiles_per_split = _split_count(line_tiles, batch * tiles, g.device)
    partial_w = torch.empty((batch, splits, K, c_g), device=g.device, dtype=torch.float32)
    partial_b = torch.empty((batch, splits, c_g), device=g.device, dtype=torch.float32) if bias_grad else partial_w
    _per_sample_conv3d_weight_grad_kernel[(tiles, batch * splits)](
        g,
        x,
        partial_w,
        partial_b,
        tiles_per_split,
        splits,
        *g_size,
        *x_size,
        C_G=c_g,
        C_X=c_x,
        **_geometry(kernel_size, stride, padding),
        FLAT=flat,
        SUM_ROWS=bias_grad,
        INPUT_PRECISION=_precision(x),
        UPCAST=_upcast(x),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=NUM_WARPS,
    )
    return _reduced_partials(partial_w, partial_b if bias_grad else None, kernel_size)


def per_sample_conv3d_backward(
    grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: Triple, padding: Triple, needs_grad: tuple[bool, bool, bool]
):
    """(dx, dw, db) of the conv, channels-last like the forward; None for a gradient nobody needs."""
    grad_x = grad_w = grad_b = None
    if needs_grad[0]:
        grad_x = _launch_conv_transpose3d(grad_y, weight, None, stride, padding, tuple(x.shape[1:4]))
    if needs_grad[1] or needs_grad[2]:
        grad_w, grad_b = _launch_weight_grad(grad_y, x, tuple(weight.shape[3:]), stride, padding, needs_grad[2])
    return grad_x, grad_w, grad_b


def per_sample_conv_transpose3d_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: Triple, padding: Triple) -> torch.Tensor:
    """Transposed conv of channels-last x [B, D, H, W, Cin]; returns channels-last y."""
    out_size = conv_transpose_output_size(tuple(x.shape[1:4]), tuple(weight.shape[3:]), stride, padding)
    return _launch_conv_transpose3d(x, weight, bias, stride, padding, out_size)


def per_sample_conv_transpose3d_backward(
    grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: Triple, padding: Triple, needs_grad: tuple[bool, bool, bool]
):
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
        grads = per_sample_conv_transpose3d_backward(_to_ndhwc(grad_y), x_cl, weight, *ctx.geometry, ctx.needs_input_grad[:3])
        return (*_public_gradients(grads, weight, bias), None, None)
