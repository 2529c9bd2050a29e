"""The fused head kernels agree with a float64 reference: y = 5 tanh(h W^T + b) and dh, dW, db.

Every fresh tensor is filled with NaN, so a kernel that leaves an output element unwritten fails.
"""

import pytest
import torch
from kernel_checks import DEVICE, assert_matches, needs_triton

from hypersort_core.kernels import HEAD_SCALE, hyper_head, hyper_head_reference

pytestmark = [needs_triton, pytest.mark.usefixtures("triton_kernels")]


def gradients_and_float64_reference(y, h, weight, bias):
    """(dh, dW, db) of the head output y for a random upstream gradient, and the float64 reference's y and gradients."""
    grad_y = torch.randn_like(y)
    grads = torch.autograd.grad(y, (h, weight, bias), grad_y)
    as64 = [t.detach().double().requires_grad_() for t in (h, weight, bias)]
    y64 = hyper_head_reference(*as64)
    return grads, y64, torch.autograd.grad(y64, as64, grad_y.double())


@pytest.mark.parametrize(
    "batch, hidden, params, dtype, weight_scale",
    [
        (2, 50, 1000, torch.float32, 0.2),
        (3, 7, 33, torch.float32, 0.5),
        (1, 50, 300, torch.bfloat16, 0.2),
        (2, 20, 130, torch.float16, 0.2),
        (2, 50, 200, torch.float32, 20.0),  # saturated tanh: y at +-5, gradients near 0
    ],
)
def test_head_forward_and_gradients_match_reference(batch, hidden, params, dtype, weight_scale):
    torch.manual_seed(0)
    h = torch.randn(batch, hidden, dtype=dtype, requires_grad=True)
    weight = (torch.randn(params, hidden) * weight_scale).to(dtype).requires_grad_()
    bias = torch.randn(params, dtype=dtype, requires_grad=True)
    y = hyper_head(h, weight, bias)
    grads, y64, grads64 = gradients_and_float64_reference(y, h, weight, bias)

    assert y.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert y.abs().max() <= HEAD_SCALE
    assert_matches(y, y64, hidden)
    assert_matches(grads[0], grads64[0], params)
    assert_matches(grads[1], grads64[1], batch)
    assert_matches(grads[2], grads64[2], batch)


def test_under_autocast_the_head_reads_float32_weights_and_returns_the_autocast_dtype():
    torch.manual_seed(0)
    h = torch.randn(2, 50, requires_grad=True)
    weight = (torch.randn(300, 50) * 0.2).requires_grad_()
    bias = torch.randn(300, requires_grad=True)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = hyper_head(h, weight, bias)
    grads, y64, grads64 = gradients_and_float64_reference(y, h, weight, bias)

    assert y.dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in grads)
    assert_matches(y, y64, 50)
    for grad, grad64, reduction in zip(grads, grads64, (300, 2, 2)):
        assert_matches(grad, grad64, reduction)  # float32 accuracy: nothing was rounded to bfloat16
