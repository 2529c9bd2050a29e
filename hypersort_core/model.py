"""HyperSORT: a hyper-network predicts every weight of a 3D UNet from a per-case latent.

Read top to bottom: the configuration; the layout of the flat parameter vector
theta; the UNet forward in which every batch element has its own theta; the
hyper-network; and the model that ties the latent table, hyper-network and UNet
together.  Loss and training live in `loss.py` and `train.py`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from hypersort_core.kernels import per_sample_conv3d, per_sample_conv_transpose3d
from hypersort_core.layers import HyperHead
from hypersort_core.unet import UNet

INSTANCE_NORM_EPS = 1e-5


@dataclass(frozen=True)
class ModelConfig:
    """The UNet's architecture and the hyper-network around it (defaults: the paper's)."""

    in_channels: int = 1
    out_channels: int = 2
    levels: int = 3
    convs_per_level: int = 3
    base_channels: int = 16
    latent_dim: int = 2
    hidden: tuple[int, ...] = field(default=(50, 50, 50))
    head_scale: float = 5.0
    latent_init_std: float = 0.05

    @property
    def size_multiple(self) -> int:
        """Each side of an input must divide by this, so that skips and upsampled maps align."""
        return 2**self.levels

    def to_dict(self) -> dict:
        return {**asdict(self), "hidden": list(self.hidden)}

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        return cls(**{**values, "hidden": tuple(values["hidden"])})


# ---------------------------------------------------------------------------------------------
# theta: all of one sample's UNet parameters in one flat vector, in the reference state_dict order


@dataclass(frozen=True)
class ParamSlot:
    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def plain_unet(config: ModelConfig) -> UNet:
    """The ordinary UNet this configuration describes (one shared set of weights)."""
    return UNet(config.in_channels, config.out_channels, config.levels, config.convs_per_level, config.base_channels)


@functools.lru_cache(maxsize=8)
def parameter_layout(config: ModelConfig) -> tuple[ParamSlot, ...]:
    """Where each UNet tensor lives in theta: the plain UNet's state_dict order and shapes."""
    with torch.device("meta"):
        state = plain_unet(config).state_dict()
    slots, offset = [], 0
    for name, tensor in state.items():
        slots.append(ParamSlot(name, tuple(tensor.shape), offset))
        offset += tensor.numel()
    return tuple(slots)


def parameter_count(config: ModelConfig) -> int:
    last = parameter_layout(config)[-1]
    return last.offset + last.numel


def unpack_theta(theta: torch.Tensor, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Per-tensor views [B, *shape] into theta [B, P]; no copies."""
    batch = theta.shape[0]
    return {s.name: theta[:, s.offset : s.offset + s.numel].view(batch, *s.shape) for s in parameter_layout(config)}


def flatten_state_dict(state: dict[str, torch.Tensor], config: ModelConfig) -> torch.Tensor:
    """The inverse of unpack_theta for one plain UNet: its state_dict as one theta vector [P]."""
    return torch.cat([state[s.name].reshape(-1) for s in parameter_layout(config)])


# ---------------------------------------------------------------------------------------------
# The UNet forward with per-sample weights


def _instance_norm(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """InstanceNorm with a per-sample affine (gamma, beta: [B, C])."""
    x = F.instance_norm(x, eps=INSTANCE_NORM_EPS)
    shape = (*gamma.shape, 1, 1, 1)
    return x * gamma.view(shape) + beta.view(shape)


def conv_block(x: torch.Tensor, p: dict[str, torch.Tensor], conv: str, norm: str, stride: int = 1) -> torch.Tensor:
    """conv3x3x3 -> ReLU -> InstanceNorm(affine), as in the paper."""
    x = per_sample_conv3d(x, p[f"{conv}.weight"], p[f"{conv}.bias"], stride=stride, padding=1)
    return _instance_norm(F.relu(x), p[f"{norm}.weight"], p[f"{norm}.bias"])


def up_block(x: torch.Tensor, p: dict[str, torch.Tensor], level: int) -> torch.Tensor:
    """Transposed conv k4 s2 p1 (doubles each side) -> ReLU -> InstanceNorm(affine)."""
    x = per_sample_conv_transpose3d(x, p[f"up_{level}.weight"], p[f"up_{level}.bias"], stride=2, padding=1)
    return _instance_norm(F.relu(x), p[f"up_norm_{level}.weight"], p[f"up_norm_{level}.bias"])


def unet_forward(x: torch.Tensor, theta: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """Logits [B, out, D, H, W] of the UNet for x [B, in, D, H, W], sample b using theta[b]."""
    p = unpack_theta(theta, config)
    x = conv_block(x, p, "conv_init", "norm_init")
    for i in range(config.convs_per_level):
        x = conv_block(x, p, f"conv_0_{i}", f"norm_0_{i}")
    skips = [x]
    for level in range(config.levels):
        x = conv_block(x, p, f"down_{level}", f"down_norm_{level}", stride=2)
        for i in range(config.convs_per_level):
            x = conv_block(x, p, f"conv_{level + 1}_{i}", f"norm_{level + 1}_{i}")
        skips.append(x)
    for level in reversed(range(config.levels)):
        x = torch.cat([up_block(x, p, level), skips[level]], dim=1)
        for i in range(config.convs_per_level):
            x = conv_block(x, p, f"dec_conv_{level}_{i}", f"dec_norm_{level}_{i}")
    return per_sample_conv3d(x, p["conv_final.weight"], p["conv_final.bias"], padding=1)


# ---------------------------------------------------------------------------------------------
# The hyper-network: latent -> MLP -> one head for all of theta


class HyperNetwork(nn.Module):
    """MLP latent -> 50 -> 50 -> 50 (ReLU), then ONE Linear(50, P) followed by 5*tanh."""

    def __init__(self, config: ModelConfig, initial_theta: torch.Tensor) -> None:
        super().__init__()
        widths = (config.latent_dim, *config.hidden)
        self.mlp = nn.Sequential(*[m for a, b in zip(widths, widths[1:]) for m in (nn.Linear(a, b), nn.ReLU())])
        self.head = HyperHead(widths[-1], initial_theta.numel(), scale=config.head_scale)
        with torch.no_grad():
            # 5*tanh(bias) = the UNet's own initial parameters: lambda's contribution starts from a normal UNet.
            self.head.bias.copy_(torch.atanh((initial_theta / config.head_scale).clamp(-0.999, 0.999)))

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.head(self.mlp(latent))


class HyperSORT(nn.Module):
    """Latent table (one learned vector per training case) + hyper-network + per-sample UNet."""

    def __init__(self, config: ModelConfig, case_ids: list[str]) -> None:
        super().__init__()
        self.config = config
        self.case_ids = list(case_ids)
        self.latents = nn.Embedding(len(self.case_ids), config.latent_dim, sparse=True)
        nn.init.normal_(self.latents.weight, std=config.latent_init_std)
        initial_theta = flatten_state_dict(plain_unet(config).state_dict(), config)
        self.hypernet = HyperNetwork(config, initial_theta)

    def theta(self, latent: torch.Tensor) -> torch.Tensor:
        """UNet parameters [B, P] for latents [B, latent_dim]."""
        return self.hypernet(latent)

    def forward(self, image: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """Logits for each image segmented by the UNet of its own latent."""
        return self.segment(image, self.theta(latent))

    def segment(self, image: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """Logits for each image segmented by the UNet of its own parameters theta [B, P]."""
        return unet_forward(image, theta.to(image.dtype), self.config)
