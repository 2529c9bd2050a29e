"""`nn.Module` forms of the per-sample ops, for projects that import them.

Their forward takes the per-sample weights as arguments, because in a
hyper-network the weights are activations, not parameters of the module.
"""

from __future__ import annotations

import torch
from torch import nn

from hypersort_core.kernels import (
    HEAD_SCALE,
    hyper_head,
    per_sample_conv3d,
    per_sample_conv_transpose3d,
)


class PerSampleConv3d(nn.Module):
    """Conv3d where sample b uses weight[b] ([B, Cout, Cin, k, k, k]) and bias[b] ([B, Cout])."""

    def __init__(self, stride: int | tuple[int, int, int] = 1, padding: int | tuple[int, int, int] = 0) -> None:
        super().__init__()
        self.stride, self.padding = stride, padding

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return per_sample_conv3d(x, weight, bias, self.stride, self.padding)

    def extra_repr(self) -> str:
        return f"stride={self.stride}, padding={self.padding}"


class PerSampleConvTranspose3d(PerSampleConv3d):
    """ConvTranspose3d where sample b uses weight[b] ([B, Cin, Cout, k, k, k]) and bias[b] ([B, Cout])."""

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return per_sample_conv_transpose3d(x, weight, bias, self.stride, self.padding)


class HyperHead(nn.Linear):
    """Linear(hidden, P) followed by scale*tanh: the one head that predicts all UNet parameters."""

    def __init__(self, in_features: int, out_features: int, scale: float = HEAD_SCALE) -> None:
        super().__init__(in_features, out_features)
        self.scale = scale

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return hyper_head(h, self.weight, self.bias, self.scale)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.scale}"
