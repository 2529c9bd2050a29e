"""The per-sample conv kernels agree with a float64 reference, forward and every gradient.

Tiny odd shapes; every fresh tensor is filled with NaN, so a kernel that leaves an output element
unwritten fails.
"""

import math

import pytest
import torch
from kernel_checks import DEVICE, assert_matches, needs_triton

from hypersort_core.kernels import (
    per_sample_conv3d,
    per_sample_conv3d_reference,
    per_sample_conv_transpose3d,
    per_sample_conv_transpose3d_reference,
)

pytestmark = [needs_triton, pytest.mark.usefixtures("triton_kernels")]


def run_against_reference(op, reference, x, weight, bias, stride, padding):
    """Output and gradients of the op and of the float64 reference, for one random output gradient."""
    inputs = [t for t in (x, weight, bias) if t is not None and t.requires_grad]
    y = op(x, weight, bias, stride, padding)
    grad_y = torch.randn_like(y)
    grads = torch.autograd.grad(y, inputs, grad_y)
    as64 = [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in (x, weight, bias)]
    y64 = reference(*as64, stride, padding)
    grads64 = torch.autograd.grad(y64, [t for t in as64 if t is not None and t.requires_grad], grad_y.double())
    return y, y64, grads, grads64


CONV_CASES = [
    # batch, c_in, c_out, size, kernel, stride, padding, bias
    (2, 3, 5, (5, 6, 7), 3, 1, 1, True),
    (1, 1, 3, (7, 5, 3), 3, 2, 1, False),
    (3, 5, 1, (5, 5, 5), 1, 1, 0, True),
    (2, 3, 5, (6, 7, 5), 3, 2, 2, True),
    (1, 5, 3, (4, 5, 6), 3, 1, 0, True),
    (2, 3, 3, (5, 6, 7), 3, (1, 2, 2), (0, 1, 2), True),
    (1, 2, 130, (3, 3, 3), 3, 1, 1, True),
    (1, 20, 40, (3, 4, 5), 3, 2, 1, True),
    (1, 24, 20, (3, 5, 4), 3, 1, 1, True),  # a run of 3 x 24 columns: two K chunks per (kd, kh)
]


@pytest.mark.parametrize("batch, c_in, c_out, size, kernel, stride, padding, with_bias", CONV_CASES)
def test_conv3d_forward_and_gradients_match_reference(batch, c_in, c_out, size, kernel, stride, padding, with_bias):
    torch.manual_seed(0)
    x = torch.randn(batch, c_in, *size, requires_grad=True)
    weight = torch.randn(batch, c_out, c_in, kernel, kernel, kernel, requires_grad=True)
    bias = torch.randn(batch, c_out, requires_grad=True) if with_bias else None
    y, y64, grads, grads64 = run_against_reference(per_sample_conv3d, per_sample_conv3d_reference, x, weight, bias, stride, padding)
    voxels_out = y.shape[2] * y.shape[3] * y.shape[4]
    assert y.shape == y64.shape and y.dtype == x.dtype
    assert_matches(y, y64, c_in * kernel**3)
    assert_matches(grads[0], grads64[0], c_out * kernel**3)
    for grad, grad64 in zip(grads[1:], grads64[1:]):
        assert_matches(grad, grad64, voxels_out)


TRANSPOSE_CASES = [
    # batch, c_in, c_out, size, kernel, stride, padding, bias
    (2, 3, 5, (3, 4, 5), 4, 2, 1, True),
    (1, 5, 3, (2, 3, 2), 3, 2, 1, False),
    (3, 1, 2, (4, 5, 6), 3, 1, 2, True),
    (2, 3, 1, (3, 2, 3), 1, 1, 0, True),
    (1, 40, 24, (2, 3, 2), 4, 2, 1, True),  # a run of 2 live taps x 40 columns: two K chunks
]


@pytest.mark.parametrize("batch, c_in, c_out, size, kernel, stride, padding, with_bias", TRANSPOSE_CASES)
def test_conv_transpose3d_forward_and_gradients_match_reference(batch, c_in, c_out, size, kernel, stride, padding, with_bias):
    torch.manual_seed(0)
    x = torch.randn(batch, c_in, *size, requires_grad=True)
    weight = torch.randn(batch, c_in, c_out, kernel, kernel, kernel, requires_grad=True)
    bias = torch.randn(batch, c_out, requires_grad=True) if with_bias else None
    y, y64, grads, grads64 = run_against_reference(per_sample_conv_transpose3d, per_sample_conv_transpose3d_reference, x, weight, bias, stride, padding)
    taps = math.ceil(kernel / stride) ** 3
    voxels_in = size[0] * size[1] * size[2]
    assert y.shape == y64.shape and y.dtype == x.dtype
    assert_matches(y, y64, c_in * taps)
    assert_matches(grads[0], grads64[0], c_out * kernel**3)
    assert_matches(grads[1], grads64[1], voxels_in)
    if with_bias:
        assert_matches(grads[2], grads64[2], y.numel() // (batch * c_out))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_conv3d_accumulates_in_float32(dtype):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 5, 6, 7, dtype=dtype, requires_grad=True)
    weight = torch.randn(2, 3, 5, 3, 3, 3, dtype=dtype, requires_grad=True)
    bias = torch.randn(2, 3, dtype=dtype, requires_grad=True)
    y, y64, grads, grads64 = run_against_reference(per_sample_conv3d, per_sample_conv3d_reference, x, weight, bias, 1, 1)
    assert y.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert_matches(y, y64, 5 * 27)
    assert_matches(grads[0], grads64[0], 3 * 27)
    assert_matches(grads[1], grads64[1], 5 * 6 * 7)
    assert_matches(grads[2], grads64[2], 5 * 6 * 7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_conv_transpose3d_accumulates_in_float32(dtype):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 4, 3, dtype=dtype, requires_grad=True)
    weight = torch.randn(2, 5, 3, 4, 4, 4, dtype=dtype, requires_grad=True)
    bias = torch.randn(2, 3, dtype=dtype, requires_grad=True)
    y, y64, grads, grads64 = run_against_reference(per_sample_conv_transpose3d, per_sample_conv_transpose3d_reference, x, weight, bias, 2, 1)
    assert y.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert_matches(y, y64, 5 * 8)
    assert_matches(grads[0], grads64[0], 3 * 64)
    assert_matches(grads[1], grads64[1], 3 * 4 * 3)
    assert_matches(grads[2], grads64[2], 6 * 8 * 6)


def test_input_without_gradient_still_gets_weight_and_bias_gradients():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 5, 4, 3)
    weight = torch.randn(2, 4, 1, 3, 3, 3, requires_grad=True)
    bias = torch.randn(2, 4, requires_grad=True)
    y, y64, grads, grads64 = run_against_reference(per_sample_conv3d, per_sample_conv3d_reference, x, weight, bias, 1, 1)
    assert_matches(y, y64, 27)
    assert_matches(grads[0], grads64[0], 60)
    assert_matches(grads[1], grads64[1], 60)


def test_channels_last_input_gives_the_same_result():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 6, 7)
    weight = torch.randn(2, 4, 3, 3, 3, 3)
    y = per_sample_conv3d(x, weight, None, 1, 1)
    y_cl = per_sample_conv3d(x.contiguous(memory_format=torch.channels_last_3d), weight, None, 1, 1)
    torch.testing.assert_close(y_cl, y, rtol=0, atol=0)
    assert_matches(y, per_sample_conv3d_reference(x.double(), weight.double(), None, 1, 1), 81)


def test_under_autocast_the_conv_computes_in_the_autocast_dtype():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 6, 7, requires_grad=True)
    weight = torch.randn(2, 4, 3, 3, 3, 3, requires_grad=True)
    bias = torch.randn(2, 4, requires_grad=True)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = per_sample_conv3d(x, weight, bias, 2, 1)
    grad_y = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, weight, bias), grad_y)

    as64 = [t.detach().bfloat16().double().requires_grad_() for t in (x, weight, bias)]
    y64 = per_sample_conv3d_reference(*as64, 2, 1)
    grads64 = torch.autograd.grad(y64, as64, grad_y.double())

    assert y.dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in grads)
    assert_matches(y, y64, 81)
    for grad, grad64 in zip(grads, grads64):
        torch.testing.assert_close(grad.double(), grad64, rtol=2e-2, atol=2e-2 * math.sqrt(108))
