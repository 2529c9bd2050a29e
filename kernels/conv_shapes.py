"""Output sizes of the per-sample convolutions: shared by the PyTorch reference, the Triton kernels and
`hsort bench --static`, so that none of them imports another for a size."""

from __future__ import annotations

Triple = tuple[int, int, int]


def conv_output_size(size: Triple, kernel_size: Triple, stride: Triple, padding: Triple) -> Triple:
    """Spatial size of a conv's output."""
    return tuple((n + 2 * p - k) // s + 1 for n, k, s, p in zip(size, kernel_size, stride, padding))


def conv_transpose_output_size(size: Triple, kernel_size: Triple, stride: Triple, padding: Triple) -> Triple:
    """Spatial size of a transposed conv's output (no output padding)."""
    return tuple((n - 1) * s - 2 * p + k for n, k, s, p in zip(size, kernel_size, stride, padding))
