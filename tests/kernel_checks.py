"""What the kernel tests share: the device they run on, tolerances by dtype, and the skip without Triton.

Triton is imported at the first kernel launch, inside the `triton_kernels` fixture (conftest.py):
importing it at module level would decide for compiled kernels before TRITON_INTERPRET is set.
"""

import importlib.util
import math

import pytest
import torch

# CI runs the kernels in the Triton interpreter on CPU tensors; on a GPU machine the same tests check the
# compiled kernels on CUDA tensors, with TF32 off as in the float64 reference.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RTOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, reduction: int) -> None:
    """Relative tolerance by dtype; absolute tolerance grows with the length of the summed axis."""
    rtol = RTOL[actual.dtype]
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=rtol * math.sqrt(reduction))
