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
    # stride 1 with rows of 16 channels: the TMA descriptor kernel, boxes reaching past every face
    (2, 16, 5, (5, 6, 7), 3, 1, 1, True),
    (1, 16, 32, (3, 9, 10), 3, 1, 0, True),  # its input gradient too (32 channels), padded by 2
    (1, 32, 16, (4, 3, 5), 1, 1, 0, False),
    (1, 48, 16, (3, 4, 3), 3, 1, 1, True),  # three chunks of 16 channels per tap
    (1, 5, 16, (5, 6, 7), 3, 2, 1, True),  # its input gradient: the TMA transposed conv, by output phase
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
    # rows of 16 channels: the TMA kernel, one output phase per program
    (2, 16, 5, (3, 4, 5), 4, 2, 1, True),
    (1, 32, 16, (3, 2, 3), 2, 2, 0, False),
    (1, 16, 3, (3, 4, 3), 3, 2, 1, True),  # k3 s2: phases with a tap past the kernel
    (1, 16, 32, (3, 4, 5), 3, 1, 0, True),  # stride 1: a conv with the flipped kernel and padding k - 1 - p = 2, a bias
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


def test_stride_1_convs_with_whole_16_channel_rows_run_the_tma_kernels(monkeypatch):
    """The descriptor kernels take the stride-1 convs and every transposed conv (so every input gradient) whose
    input has whole 16-channel rows, and the stride-1 weight gradients whose input has them; the others keep the
    gathering kernels (the cases above check both against the reference)."""
    from hypersort_core.kernels import per_sample_conv3d_triton as kernels

    launches = []
    for name in ("_launch_tma_forward", "_launch_tma_weight_grad"):
        launch = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *args, _name=name, _launch=launch, **kwargs: launches.append(_name[12:]) or _launch(*args, **kwargs))

    def forward_and_backward(c_in, c_out, stride):
        launches.clear()
        x = torch.randn(1, c_in, 4, 5, 6, requires_grad=True)
        weight = torch.randn(1, c_out, c_in, 3, 3, 3, requires_grad=True)
        per_sample_conv3d(x, weight, None, stride, 1).sum().backward()
        return sorted(launches)

    assert forward_and_backward(16, 32, 1) == ["forward", "forward", "weight_grad"]  # the conv, its input gradient (a transposed conv)
    assert forward_and_backward(16, 32, 2) == ["forward"]  # stride 2: only the input gradient, a transposed conv
    assert forward_and_backward(5, 16, 1) == ["forward"]  # only the input gradient, read from the 16-channel grad_y
    assert forward_and_backward(16, 5, 1) == ["forward", "weight_grad"]  # the 5-channel grad_y by masked loads


def test_bfloat16_tma_conv_accumulates_in_float32():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 5, 6, 9, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(2, 16, 16, 3, 3, 3, dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(2, 16, dtype=torch.bfloat16, requires_grad=True)
    y, y64, grads, grads64 = run_against_reference(per_sample_conv3d, per_sample_conv3d_reference, x, weight, bias, 1, 1)
    assert_matches(y, y64, 16 * 27)
    assert_matches(grads[0], grads64[0], 16 * 27)
    assert_matches(grads[1], grads64[1], 5 * 6 * 9)
    assert_matches(grads[2], grads64[2], 5 * 6 * 9)  # summed by a dot with ones, on the tensor cores


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


@pytest.mark.slow  # a few minutes in the interpreter
def test_the_paper_unet_through_the_kernels_matches_the_reference_forward_and_backward(monkeypatch):
    """The whole paper UNet (16 channels at the top level, where the TMA kernels run, InstanceNorm between the
    convs), output and gradient of every parameter: the kernels' float32 error is the reference's own."""
    from hypersort_core import HyperSORT, ModelConfig, unet_forward

    config = ModelConfig()
    torch.manual_seed(0)
    theta64 = HyperSORT(config, ["a", "b"]).double().theta(0.1 * torch.randn(2, config.latent_dim, dtype=torch.float64)).detach()
    x64 = torch.randn(2, config.in_channels, 16, 16, 16, dtype=torch.float64)

    def output_and_gradient(dtype, backend):
        monkeypatch.setenv("HSORT_KERNELS", backend)
        theta = theta64.to(dtype).requires_grad_()
        y = unet_forward(x64.to(dtype), theta, config)
        (grad,) = torch.autograd.grad(y.square().mean(), theta)
        return y.double(), grad.double()

    def relative_error(actual, expected):
        return ((actual - expected).norm() / expected.norm()).item()

    y64, grad64 = output_and_gradient(torch.float64, "torch")
    y_ref, grad_ref = output_and_gradient(torch.float32, "torch")
    y_kernels, grad_kernels = output_and_gradient(torch.float32, "triton")
    assert relative_error(y_kernels, y64) < 3 * relative_error(y_ref, y64) + 1e-6
    assert relative_error(grad_kernels, grad64) < 3 * relative_error(grad_ref, grad64) + 1e-6
