"""The paper's public formulation of HyperSORT, rebuilt so that it can be compared with ours and its
checkpoints imported.

The public code (ImFusionGmbH/HyperSORT, `models.py` and `train.py`) differs from `model.py` in how the
same function is computed, not in the function:

* the hyper-network has one `Linear(hidden, numel)` head per UNet tensor, in an `nn.ModuleDict` keyed by
  the tensor's name with "." replaced by ";", each followed by 5*tanh, where we have one head for all of
  theta (`reference_to_single_head` maps the one onto the other exactly);
* the heads' biases start at the UNet's own initial parameters (ours start at atanh(theta/5), so that
  5*tanh gives them back);
* it runs cases one at a time, each through a plain UNet holding that case's parameters, and trains with
  batch size 1: one Adam for the hyper-network and one Adam per latent (betas 0.7/0.9), both stepped
  after every case (`ReferenceTraining`).

The state_dict of `ReferenceHyperNetwork` has the reference's keys (`hypernetwork.0.0.weight`,
`heads.conv_init;weight.weight`, ...); a checkpoint saved by the public code holds one more,
`model.dummy_param`, a placeholder without any role in the computation.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn
from torch.func import functional_call

from hypersort_core.loss import hypersort_loss
from hypersort_core.model import ModelConfig, parameter_layout, plain_unet
from hypersort_core.unet import UNet

HEAD_KEY_SEPARATOR = ";"


def head_key(tensor_name: str) -> str:
    """The reference's ModuleDict key for a UNet tensor: ModuleDict keys may not contain dots."""
    return tensor_name.replace(".", HEAD_KEY_SEPARATOR)


@functools.lru_cache(maxsize=8)
def _unet_skeleton(config: ModelConfig) -> UNet:
    """A UNet without storage: `functional_call` supplies every tensor it uses (it has no buffers)."""
    with torch.device("meta"):
        return plain_unet(config)


class ReferenceHyperNetwork(nn.Module):
    """Latent -> MLP (50, 50, 50, ReLU) -> one Linear + 5*tanh per UNet tensor; one case at a time."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        widths = (config.latent_dim, *config.hidden)
        self.hypernetwork = nn.Sequential(*[nn.Sequential(nn.Linear(a, b), nn.ReLU()) for a, b in zip(widths, widths[1:])])
        initial = plain_unet(config).state_dict()
        self.heads = nn.ModuleDict({head_key(slot.name): nn.Linear(widths[-1], slot.numel) for slot in parameter_layout(config)})
        with torch.no_grad():
            for slot in parameter_layout(config):
                self.heads[head_key(slot.name)].bias.copy_(initial[slot.name].reshape(-1))

    def head_outputs(self, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        """5*tanh(head(hidden)) of every head, flat ([N, numel]), by UNet tensor name in theta's order."""
        scale = self.config.head_scale
        return {slot.name: scale * torch.tanh(self.heads[head_key(slot.name)](hidden)) for slot in parameter_layout(self.config)}

    def unet_parameters(self, latent: torch.Tensor) -> dict[str, torch.Tensor]:
        """One case's UNet tensors, by state_dict name, for its latent [1, latent_dim]."""
        shapes = {slot.name: slot.shape for slot in parameter_layout(self.config)}
        return {name: flat.reshape(shapes[name]) for name, flat in self.head_outputs(self.hypernetwork(latent)).items()}

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """Logits for x [B, in, D, H, W]: case i through a plain UNet holding the parameters of latents[i]."""
        unet = _unet_skeleton(self.config)
        return torch.cat([functional_call(unet, self.unet_parameters(latents[i : i + 1]), (x[i : i + 1],)) for i in range(len(x))])


def reference_to_single_head(ref: ReferenceHyperNetwork) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """(state of `HyperNetwork.mlp`, head weight [P, hidden], head bias [P]) computing the same function as ref.

    The per-tensor heads are stacked in `parameter_layout` order, which is theta's order; the reference's
    MLP blocks Sequential(Linear, ReLU) become positions 0, 2, 4, ... of our flat Linear/ReLU Sequential.
    """
    mlp_state = {}
    for index, block in enumerate(ref.hypernetwork):
        linear = block[0]
        mlp_state[f"{2 * index}.weight"] = linear.weight.detach().clone()
        mlp_state[f"{2 * index}.bias"] = linear.bias.detach().clone()
    heads = [ref.heads[head_key(slot.name)] for slot in parameter_layout(ref.config)]
    weight = torch.cat([head.weight.detach() for head in heads])
    bias = torch.cat([head.bias.detach() for head in heads])
    return mlp_state, weight, bias


class ReferenceTraining:
    """The reference's training loop for a fixed set of cases: batch size 1, an Adam step after every case.

    One Adam over the hyper-network, and one Adam per case over that case's latent (betas from the
    configuration, 0.7/0.9 in the reference); latents start N(0, latent_init_std) as there.
    """

    def __init__(
        self, config: ModelConfig, cases: int, lr: float, latent_lr: float, latent_betas: tuple[float, float], l1_weight: float, device: torch.device
    ) -> None:
        with device:
            self.model = ReferenceHyperNetwork(config)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr)
        self.latents = [(torch.randn(1, config.latent_dim, device=device) * config.latent_init_std).requires_grad_() for _ in range(cases)]
        self.latent_optimizers = [torch.optim.Adam([latent], lr=latent_lr, betas=latent_betas) for latent in self.latents]
        self.l1_weight = l1_weight

    def step(
        self, images: torch.Tensor, labels: torch.Tensor, indices: list[int], autocast: contextlib.AbstractContextManager = contextlib.nullcontext()
    ) -> None:
        """Train on each case of the batch in turn, as the reference's batch-1 loop would."""
        for image, label, index in zip(images, labels, indices):
            latent, latent_optimizer = self.latents[index], self.latent_optimizers[index]
            self.optimizer.zero_grad(set_to_none=True)
            latent_optimizer.zero_grad(set_to_none=True)
            with autocast:
                logits = self.model(image[None], latent)
            hypersort_loss(logits, label[None], latent, self.l1_weight).total.backward()
            latent_optimizer.step()
            self.optimizer.step()
