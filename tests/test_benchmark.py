"""`hsort bench` times the UNet's own layers, counts their work right, and reports every section it runs."""

import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch.utils.flop_counter import FlopCounterMode

from hypersort_core.benchmark import BACKWARD_COST, LayerShape, unet_layer_shapes
from hypersort_core.cli.main import main
from hypersort_core.config import PRESETS
from hypersort_core.model import ModelConfig, parameter_layout, plain_unet

PAPER = ModelConfig()


def test_paper_layer_shapes_and_how_many_layers_share_each():
    shapes = unet_layer_shapes(PAPER, 168)
    found = {(s.transposed, s.c_in, s.c_out, s.stride, s.size, s.out_size): s.count for s in shapes}
    assert found == {
        (False, 1, 16, 1, 168, 168): 1,
        (False, 16, 16, 1, 168, 168): 5,
        (False, 16, 32, 2, 168, 84): 1,
        (False, 32, 32, 1, 84, 84): 5,
        (False, 32, 64, 2, 84, 42): 1,
        (False, 64, 64, 1, 42, 42): 5,
        (False, 64, 128, 2, 42, 21): 1,
        (False, 128, 128, 1, 21, 21): 3,
        (True, 128, 64, 2, 21, 42): 1,
        (False, 128, 64, 1, 42, 42): 1,
        (True, 64, 32, 2, 42, 84): 1,
        (False, 64, 32, 1, 84, 84): 1,
        (True, 32, 16, 2, 84, 168): 1,
        (False, 32, 16, 1, 168, 168): 1,
        (False, 16, 2, 1, 168, 168): 1,
    }


@pytest.mark.parametrize("config", [PAPER, PRESETS["small"]["model"], ModelConfig(levels=1, convs_per_level=4, base_channels=3)])
def test_every_conv_of_the_parameter_layout_is_counted_once(config):
    conv_weights = [slot for slot in parameter_layout(config) if len(slot.shape) == 5]
    assert sum(shape.count for shape in unet_layer_shapes(config, 4 * config.size_multiple)) == len(conv_weights)


def test_layer_flops_add_up_to_the_whole_paper_unet():
    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        plain_unet(PAPER)(torch.empty(1, 1, 168, 168, 168))
    total = sum(shape.count * shape.forward_flops(1) for shape in unet_layer_shapes(PAPER, 168))
    assert total == counter.get_total_flops()
    assert 930e9 < total < 940e9  # the planning notes' 936 GFLOP per sample


@pytest.mark.parametrize(
    "shape, op",
    [
        (LayerShape(False, 3, 5, 3, 1, 1, 6), F.conv3d),
        (LayerShape(False, 4, 6, 3, 2, 1, 8), F.conv3d),
        (LayerShape(True, 6, 4, 4, 2, 1, 5), F.conv_transpose3d),
    ],
)
def test_flops_forward_and_backward_match_torch_flop_counter(shape, op):
    batch = 2
    with torch.device("meta"):
        x = torch.empty(batch, shape.c_in, shape.size, shape.size, shape.size, requires_grad=True)
        weight = torch.empty(shape.weight_shape(1)[1:], requires_grad=True)
        with FlopCounterMode(display=False) as forward:
            y = op(x, weight, stride=shape.stride, padding=shape.padding)
        with FlopCounterMode(display=False) as backward:
            torch.autograd.grad(y, (x, weight), torch.empty_like(y))
    assert y.shape[2] == shape.out_size
    assert forward.get_total_flops() == shape.forward_flops(batch)
    assert backward.get_total_flops() == BACKWARD_COST * shape.forward_flops(batch)


def test_quick_bench_writes_every_section_and_prints_one_table(tmp_path, one_torch_thread):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["bench", "--quick", "--size", "16", "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert report["sections_done"] == ["layers", "head", "step", "block"]
    assert [row for row in rows if row["error"]] == []
    variants = {section: {(row["variant"], row["mode"]) for row in rows if row["section"] == section} for section in report["sections_done"]}
    assert variants["layers"] == {(v, m) for v in ("ours", "grouped", "loop", "dense") for m in ("forward", "fwd+bwd")}
    assert variants["head"] == {(v, m) for v in ("ours", "per-tensor") for m in ("forward", "fwd+bwd")}
    assert variants["step"] == {("ours", "step"), ("reference", "step")}
    assert variants["block"] == {(v, m) for v in ("ours", "shared") for m in ("forward", "fwd+bwd")}
    assert all(row["median_s"] > 0 and row["p20_s"] <= row["median_s"] <= row["p80_s"] for row in rows)
    assert all(row["samples_per_second"] > 0 for row in rows if row["section"] == "step")
    assert {entry["name"] for entry in report["summary"]} == {"layers", "head", "step"}
    assert report["environment"]["torch"] == torch.__version__

    table = result.stdout
    assert table.startswith("hsort bench on CPU")
    assert table.count("section  case") == 1
    assert all(row["case"] in table for row in rows)
    assert all(entry["text"] in table for entry in report["summary"])


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--preset", "paper", "--size", "20"], "--size 20: the paper UNet (3 levels) needs a multiple of 8"),
        (["--only", "layers,heads"], "unknown section heads"),
        (["--dtype", "float64"], "unknown dtype float64"),
    ],
)
def test_impossible_settings_are_one_line_and_exit_code_2(arguments, message, tmp_path):
    result = CliRunner().invoke(main, ["bench", "--device", "cpu", "--out", str(tmp_path / "b.json"), *arguments])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"hsort: error: {message}") and result.stderr.count("\n") == 1
    assert not (tmp_path / "b.json").exists()
