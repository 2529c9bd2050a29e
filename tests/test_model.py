"""The per-sample UNet is the paper's UNet, once per sample, and the hyper-network drives all of it."""

import json
from pathlib import Path

import pytest
import torch
from torch.func import functional_call

from hypersort_core import (
    HyperSORT,
    ModelConfig,
    PerSampleConv3d,
    PerSampleConvTranspose3d,
    UNet,
    parameter_count,
    unet_forward,
)
from hypersort_core.model import (
    flatten_state_dict,
    parameter_layout,
    plain_unet,
    unpack_theta,
)

FIXTURES = Path(__file__).parent / "fixtures"
TINY = ModelConfig(in_channels=2, out_channels=3, levels=2, convs_per_level=2, base_channels=4)


def sample_parameters(theta: torch.Tensor, config: ModelConfig, b: int) -> dict[str, torch.Tensor]:
    return {name: tensor[b] for name, tensor in unpack_theta(theta, config).items()}


def test_theta_layout_is_the_reference_state_dict():
    reference = json.loads((FIXTURES / "reference_unet_layout.json").read_text())
    layout = [[slot.name, list(slot.shape)] for slot in parameter_layout(ModelConfig())]
    assert layout == reference["state_dict"]
    assert parameter_count(ModelConfig()) == 3_327_122


def test_a_reference_state_dict_loads_into_the_plain_unet_one_to_one():
    reference = json.loads((FIXTURES / "reference_unet_layout.json").read_text())
    state = {name: torch.randn(shape) for name, shape in reference["state_dict"]}
    unet = plain_unet(ModelConfig())
    unet.load_state_dict(state)  # strict: same names, same shapes
    theta = flatten_state_dict(state, ModelConfig())
    views = unpack_theta(theta[None], ModelConfig())
    assert all(torch.equal(views[name][0], state[name]) for name in state)


def test_layer_weights_are_views_into_theta():
    theta = torch.randn(3, parameter_count(TINY))
    start, end = theta.data_ptr(), theta.data_ptr() + theta.numel() * theta.element_size()
    for tensor in unpack_theta(theta, TINY).values():
        assert tensor._base is theta
        assert start <= tensor.data_ptr() < end


def per_sample_and_plain_outputs(config: ModelConfig, size: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The batched per-sample UNet's output, and each sample's output from a plain UNet loaded with its theta."""
    torch.manual_seed(0)
    model = HyperSORT(config, ["a", "b", "c"]).to(dtype)
    x = torch.randn(3, config.in_channels, size, size, size, dtype=dtype)
    with torch.no_grad():
        theta = model.theta(torch.randn(3, config.latent_dim, dtype=dtype))
        unet = plain_unet(config).to(dtype)
        singles = []
        for b in range(3):
            unet.load_state_dict(sample_parameters(theta, config, b))
            singles.append(unet(x[b : b + 1])[0])
        return unet_forward(x, theta, config), torch.stack(singles)


def relative_errors(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.stack([(a[i] - b[i]).norm() / b[i].norm() for i in range(len(a))])


@pytest.mark.parametrize("config", [TINY, ModelConfig(levels=2, convs_per_level=2, base_channels=8)])
def test_each_sample_equals_a_plain_unet_with_its_own_parameters(config):
    batched, plain = per_sample_and_plain_outputs(config, 12, torch.float32)
    assert relative_errors(batched, plain).max() < 1e-5


def test_paper_unet_per_sample_is_exact_in_float64_and_as_accurate_as_plain_in_float32():
    """The paper's 31-layer UNet amplifies float32 rounding to ~1e-4 by itself (InstanceNorm over 2^3 voxels
    at the bottom), so float32 is held to the plain UNet's own float32 error, float64 to 1e-10."""
    batched64, plain64 = per_sample_and_plain_outputs(ModelConfig(), 16, torch.float64)
    assert relative_errors(batched64, plain64).max() < 1e-10
    batched32, plain32 = per_sample_and_plain_outputs(ModelConfig(), 16, torch.float32)
    plain_own_error = relative_errors(plain32.double(), plain64).max()
    assert relative_errors(batched32.double(), plain64).max() < 3 * plain_own_error


def test_gradients_match_a_per_sample_loop_in_float64():
    torch.manual_seed(1)
    model = HyperSORT(TINY, [str(i) for i in range(3)]).double()
    x = torch.randn(3, TINY.in_channels, 8, 8, 8, dtype=torch.float64)
    latent = torch.randn(3, TINY.latent_dim, dtype=torch.float64, requires_grad=True)

    theta = model.theta(latent)
    theta.retain_grad()
    (unet_forward(x, theta, TINY) ** 2).mean(dim=(1, 2, 3, 4)).sum().backward()
    batched_latent_grad, batched_theta_grad = latent.grad.clone(), theta.grad.clone()

    latent.grad = None
    unet = plain_unet(TINY).double()
    for b in range(3):
        theta_b = model.theta(latent[b : b + 1])
        theta_b.retain_grad()
        out = functional_call(unet, sample_parameters(theta_b, TINY, 0), (x[b : b + 1],))
        (out**2).mean().backward()
        torch.testing.assert_close(theta_b.grad[0], batched_theta_grad[b], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(latent.grad, batched_latent_grad, rtol=1e-9, atol=1e-12)


def test_without_the_latent_term_theta_is_a_normally_initialised_unet():
    model = HyperSORT(TINY, ["a"])
    head = model.hypernet.head
    default_bound = 1 / TINY.hidden[-1] ** 0.5  # PyTorch's own Linear init keeps the latents' influence large
    assert head.weight.abs().max() <= default_bound and head.weight.std() > default_bound / 3
    with torch.no_grad():
        head.weight.zero_()
        theta = unpack_theta(model.theta(torch.randn(1, TINY.latent_dim)), TINY)
    for name, tensor in theta.items():
        if name.startswith(("norm", "down_norm", "up_norm", "dec_norm")):
            expected = torch.ones_like(tensor) if name.endswith("weight") else torch.zeros_like(tensor)
            torch.testing.assert_close(tensor, expected, rtol=0, atol=1e-3)
        elif name.endswith("weight"):  # PyTorch's conv init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = dim 1 x kernel
            bound = 1 / (tensor.shape[2] * tensor[0, 0, 0].numel()) ** 0.5
            assert tensor.abs().max() <= bound * 1.001 and tensor.abs().max() > bound * 0.8


def test_theta_is_capped_by_the_head_activation():
    model = HyperSORT(TINY, ["a", "b"])
    theta = model.theta(torch.full((2, TINY.latent_dim), 1e4))
    assert theta.abs().max() <= TINY.head_scale


def test_latents_start_small_and_belong_to_case_ids():
    model = HyperSORT(TINY, [f"case{i}" for i in range(500)])
    assert model.case_ids[7] == "case7"
    assert 0.04 < model.latents.weight.std() < 0.06


def test_per_sample_modules_match_torch_convolutions_per_sample():
    torch.manual_seed(3)
    x = torch.randn(2, 3, 7, 6, 5)
    weight, bias = torch.randn(2, 4, 3, 3, 3, 3), torch.randn(2, 4)
    y = PerSampleConv3d(stride=2, padding=1)(x, weight, bias)
    for b in range(2):
        torch.testing.assert_close(y[b], torch.nn.functional.conv3d(x[b : b + 1], weight[b], bias[b], stride=2, padding=1)[0])
    tweight = torch.randn(2, 3, 5, 4, 4, 4)
    y = PerSampleConvTranspose3d(stride=2, padding=1)(x, tweight, bias.new_ones(2, 5))
    for b in range(2):
        expected = torch.nn.functional.conv_transpose3d(x[b : b + 1], tweight[b], torch.ones(5), stride=2, padding=1)[0]
        torch.testing.assert_close(y[b], expected)


def test_plain_unet_is_an_ordinary_module():
    unet = UNet(1, 2, 2, 1, 4)
    assert unet(torch.randn(1, 1, 8, 8, 8)).shape == (1, 2, 8, 8, 8)


def test_model_training_step_and_benchmarks_import_without_nibabel():
    """The GPU machines' image has no nibabel: everything but reading and writing NIfTI must import."""
    import subprocess
    import sys

    code = "import sys; sys.modules['nibabel'] = None; import hypersort_core.train, hypersort_core.benchmark, hypersort_core.cli.main"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
