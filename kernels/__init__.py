"""Per-sample convolution and hyper-head ops (`hypersort_core.kernels`)."""

from .hyper_head import HEAD_SCALE, hyper_head, hyper_head_reference
from .per_sample_conv3d import (
    per_sample_conv3d,
    per_sample_conv3d_reference,
    per_sample_conv_transpose3d,
    per_sample_conv_transpose3d_reference,
)

__all__ = [
    "HEAD_SCALE",
    "hyper_head",
    "hyper_head_reference",
    "per_sample_conv3d",
    "per_sample_conv3d_reference",
    "per_sample_conv_transpose3d",
    "per_sample_conv_transpose3d_reference",
]
