"""`hsort export`: one style as a plain UNet, equal to the hyper-network's UNet at that latent."""

import json

import numpy as np
import pytest
import torch
from cli_checks import assert_one_line_error
from click.testing import CliRunner
from safetensors import safe_open

from hypersort_core import UNet
from hypersort_core.cli.predict import export
from hypersort_core.run import load_run


def run_export(*args):
    return CliRunner().invoke(export, list(map(str, args)))


@pytest.mark.parametrize("choice", ["case", "latent"])
def test_exported_unet_computes_the_hyper_networks_unet_at_that_latent(trained_run, tmp_path, choice):
    run = load_run(trained_run, "cpu")
    case = run.case_ids[3]
    latent = run.latent_of(case) if choice == "case" else np.array([0.4, -0.7], dtype=np.float32)
    option = ["--case", case] if choice == "case" else ["--latent", "0.4,-0.7"]
    result = run_export(trained_run, *option, "--out", tmp_path / "unet.safetensors")
    assert result.exit_code == 0, result.output

    unet = UNet.from_file(tmp_path / "unet.safetensors")
    assert type(unet) is UNet and not any("hyper" in name for name, _ in unet.named_modules())
    x = torch.randn(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = run.model(x, torch.from_numpy(latent).expand(2, -1))
        output = unet(x)
    assert (output - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_architecture_and_preprocessing_are_recorded(trained_run, tmp_path):
    assert run_export(trained_run, "--latent", "0,0", "--out", tmp_path / "main.safetensors").exit_code == 0
    description = json.loads((tmp_path / "main.json").read_text())
    config = load_run(trained_run).config
    assert description["architecture"] == {
        "in_channels": 1,
        "out_channels": 2,
        "levels": config.model.levels,
        "convs_per_level": config.model.convs_per_level,
        "base_channels": config.model.base_channels,
    }
    assert description["preprocess"] == config.preprocess.to_dict()
    with safe_open(tmp_path / "main.safetensors", "pt") as handle:
        assert json.loads(handle.metadata()["preprocess"]) == config.preprocess.to_dict()


def test_a_style_must_be_chosen(trained_run, tmp_path):
    assert_one_line_error(run_export(trained_run, "--out", tmp_path / "unet.safetensors"), "--latent")
