"""The paper's public formulation has the reference's checkpoint structure, and our single head computes
exactly its function once its per-tensor heads are stacked."""

import json
import math
from pathlib import Path

import torch

from hypersort_core.model import (
    HyperNetwork,
    ModelConfig,
    flatten_state_dict,
    parameter_count,
    parameter_layout,
    unet_forward,
)
from hypersort_core.reference import (
    ReferenceHyperNetwork,
    ReferenceTraining,
    head_key,
    reference_to_single_head,
)

FIXTURES = Path(__file__).parent / "fixtures"
TINY = ModelConfig(in_channels=2, out_channels=3, levels=2, convs_per_level=2, base_channels=4)


def single_head_from(ref: ReferenceHyperNetwork) -> HyperNetwork:
    mlp_state, weight, bias = reference_to_single_head(ref)
    ours = HyperNetwork(ref.config, torch.zeros(parameter_count(ref.config))).to(weight.dtype)
    ours.load_state_dict({**{f"mlp.{key}": value for key, value in mlp_state.items()}, "head.weight": weight, "head.bias": bias})
    return ours


def test_state_dict_has_the_reference_implementations_keys_and_shapes():
    unet_tensors = json.loads((FIXTURES / "reference_unet_layout.json").read_text())["state_dict"]
    with torch.device("meta"):
        state = ReferenceHyperNetwork(ModelConfig()).state_dict()
    mlp = [(f"hypernetwork.{i}.0.{p}", shape) for i, (a, b) in enumerate([(2, 50), (50, 50), (50, 50)]) for p, shape in [("weight", [b, a]), ("bias", [b])]]
    heads = [
        (f"heads.{name.replace('.', ';')}.{p}", shape)
        for name, tensor_shape in unet_tensors
        for p, shape in [("weight", [math.prod(tensor_shape), 50]), ("bias", [math.prod(tensor_shape)])]
    ]
    assert [(key, list(tensor.shape)) for key, tensor in state.items()] == mlp + heads


def test_heads_start_at_the_unets_own_initial_parameters_under_5_tanh():
    torch.manual_seed(0)
    ref = ReferenceHyperNetwork(TINY)
    with torch.no_grad():
        for head in ref.heads.values():
            head.weight.zero_()
        theta = flatten_state_dict(ref.unet_parameters(torch.randn(1, TINY.latent_dim)), TINY)
        bias = torch.cat([ref.heads[head_key(slot.name)].bias for slot in parameter_layout(TINY)])
    torch.testing.assert_close(theta, 5 * torch.tanh(bias))


def test_our_hypernetwork_from_converted_weights_gives_the_reference_theta_output_and_gradients():
    torch.manual_seed(0)
    ref = ReferenceHyperNetwork(TINY).double()
    ours = single_head_from(ref)
    latents = torch.randn(3, TINY.latent_dim, dtype=torch.float64)
    x = torch.randn(3, TINY.in_channels, 8, 8, 8, dtype=torch.float64)

    theta = ours(latents)
    theta_ref = torch.stack([flatten_state_dict(ref.unet_parameters(latents[i : i + 1]), TINY) for i in range(3)])
    torch.testing.assert_close(theta, theta_ref, rtol=0, atol=1e-5)

    output, output_ref = unet_forward(x, theta, TINY), ref(x, latents)
    assert output.abs().max() > 1  # a real signal, not two zeros
    torch.testing.assert_close(output, output_ref, rtol=0, atol=1e-5)

    (output**2).mean().backward()
    (output_ref**2).mean().backward()
    heads = [ref.heads[head_key(slot.name)] for slot in parameter_layout(TINY)]
    torch.testing.assert_close(ours.head.weight.grad, torch.cat([head.weight.grad for head in heads]), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ours.mlp[0].weight.grad, ref.hypernetwork[0][0].weight.grad, rtol=1e-9, atol=1e-12)


def test_in_float32_the_single_head_theta_is_within_1e_5_of_the_reference():
    torch.manual_seed(1)
    ref = ReferenceHyperNetwork(TINY)
    ours = single_head_from(ref)
    latents = torch.randn(4, TINY.latent_dim)
    with torch.no_grad():
        theta_ref = torch.stack([flatten_state_dict(ref.unet_parameters(latents[i : i + 1]), TINY) for i in range(4)])
        torch.testing.assert_close(ours(latents), theta_ref, rtol=0, atol=1e-5)


def test_reference_training_steps_both_optimizers_after_every_case():
    torch.manual_seed(0)
    training = ReferenceTraining(TINY, cases=3, lr=1e-3, latent_lr=1e-2, latent_betas=(0.7, 0.9), l1_weight=1.0, device=torch.device("cpu"))
    before = [latent.detach().clone() for latent in training.latents]
    images = torch.randn(2, TINY.in_channels, 8, 8, 8)
    labels = torch.randint(0, TINY.out_channels, (2, 8, 8, 8))
    training.step(images, labels, [2, 0])
    first_parameter = next(training.model.parameters())
    assert training.optimizer.state[first_parameter]["step"] == 2  # batch size 1: one step per case
    latent_steps = [int(optimizer.state.get(latent, {}).get("step", 0)) for optimizer, latent in zip(training.latent_optimizers, training.latents)]
    assert latent_steps == [1, 0, 1]
    assert [not torch.equal(a, b.detach()) for a, b in zip(before, training.latents)] == [True, False, True]
