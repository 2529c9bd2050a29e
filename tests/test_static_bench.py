"""`hsort bench --static` compiles every launch of a training step for sm_90 and reads its machine code."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from hypersort_core.cli.main import main
from hypersort_core.static_bench import profile_sass

pytest.importorskip("triton")

# A loop of five instructions (0x30-0x70) after a prologue of two, in cuobjdump's format.
SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;                    /* 0x00000a0000017a02 */
        /*0010*/                   S2R R0, SR_TID.X ;                        /* 0x0000000000007919 */
        /*0020*/              @!P0 BRA 0x80 ;                                /* 0x0000001800448947 */
        /*0030*/                   IMAD R2, R0, 0x4, RZ ;                    /* 0x0000000400027824 */
        /*0040*/                   ISETP.GE.AND P1, PT, R2, 0x10, PT ;       /* 0x000000100200780c */
        /*0050*/                   LDG.E R4, desc[UR4][R2.64] ;              /* 0x0000000402047981 */
        /*0060*/                   HMMA.16816.F32.BF16 R8, R4, R6, R8 ;      /* 0x000000060408723c */
        /*0070*/              @!P1 BRA 0x30 ;                                /* 0xfffffffc00e49947 */
        /*0080*/                   EXIT ;                                    /* 0x000000000000794d */
        /*0090*/                   BRA 0x90;                                 /* 0xfffffffc00fc7947 */
"""


def test_the_main_loop_is_the_backward_branch_around_the_tensor_instructions():
    loop = profile_sass(SASS)
    assert (loop.instructions, loop.prologue, loop.total, loop.tensor_instruction) == (5, 2, 10, "HMMA")
    assert loop.categories == {"tensor": 1, "memory": 1, "integer": 1, "compare_select": 1, "conversion": 0, "other": 1}


# A TMA loop (0x10-0x50) whose barrier wait retries out of line (0x70) and jumps back into the loop (0x20):
# the branch at 0x90 spans more code around the same tensor instruction, but it is not the loop.
TMA_SASS = """
        /*0000*/                   S2R R0, SR_TID.X ;                                   /* 0x0000000000007919 */
        /*0010*/                   UIADD3 UR4, UR4, 0x1, URZ ;                          /* 0x0000000104047890 */
        /*0020*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR8+0x2600], R11 ; /* 0x0026000bff0075a7 */
        /*0030*/              @!P0 BRA 0x70 ;                                           /* 0x0000000c00388947 */
        /*0040*/                   HGMMA.64x16x16.F32.BF16 R32, R44, gdesc[UR8].tnspB, R32 ; /* 0x402000082c207df0 */
        /*0050*/               @P2 BRA 0x10 ;                                           /* 0xfffffff800282947 */
        /*0060*/                   EXIT ;                                               /* 0x000000000000794d */
        /*0070*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR8+0x2600], R11 ; /* 0x0026000bff0075a7 */
        /*0080*/              @!P0 BRA 0x70 ;                                           /* 0xfffffffc00f88947 */
        /*0090*/                   BRA 0x40 ;                                           /* 0xfffffff000bc7947 */
"""


def test_a_tma_waits_out_of_line_retry_is_not_taken_for_the_main_loop():
    loop = profile_sass(TMA_SASS)
    assert (loop.instructions, loop.tensor_instruction) == (5, "HGMMA")


def _static_run(tmp_path, *arguments):
    """The CLI in a process of its own: the test process interprets Triton (conftest), which compiles nothing."""
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "static.json"
    command = [sys.executable, "-m", "hypersort_core.cli", "bench", "--static", "--out", str(out), *arguments]
    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)
    return result, out


def test_static_report_of_one_layer_is_complete_and_nothing_spills(tmp_path):
    result, out = _static_run(tmp_path, "--preset", "small", "--size", "16", "--dtype", "bfloat16,float32", "--layers", "conv_0_0")
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    for dtype in ("bfloat16", "float32"):
        figures = report["dtypes"][dtype]
        assert figures["compile_seconds"] > 0 and figures["kernels_compiled"] == 3
        for device in ("H100 SXM5 80GB", "H200 SXM 141GB"):
            rows = figures["devices"][device]["rows"]
            assert [(r["layer"], r["role"]) for r in rows] == [("conv_0_0", "forward"), ("conv_0_0", "input-grad"), ("conv_0_0", "weight-grad")]
            for row in rows:
                assert all(value is not None for value in row.values()), row
                assert row["spill_bytes"] == 0 and row["registers"] > 0 and row["resident_blocks_per_sm"] > 0
                assert row["tensor_instruction"] in ("HGMMA", "HMMA") and row["tensor_per_iteration"] > 0
                assert 0 < row["loop_index_instructions"] < row["loop_instructions"] and row["trip_count"] >= 1
                assert row["issue_bound_s"] > 0 and row["floor_s"] == max(row["floor_compute_s"], row["floor_memory_s"]) > 0
            totals = figures["devices"][device]["totals"]
            assert totals["unet_issue_bound_s"] == pytest.approx(sum(r["issue_bound_s"] for r in rows))
    table = result.stdout
    assert table.startswith("hsort bench --static | sm_90 | triton ") and table.count("conv_0_0  ") == 6
    assert "compile: 3 kernels for 3 launches in" in table and f"every launch: {out}" in table


def test_the_paper_unets_16_channel_layer_compiles_to_tma_kernels_on_wgmma_without_spills(tmp_path):
    """At 16 channels the stride-1 conv, its input gradient and its weight gradient (the bias gradient with it) read
    their tiles by TMA descriptors; the input gradient, a conv with the flipped kernel, reuses the forward's kernel.
    (At 32³ each split of the weight gradient has several boxes; with one box a split, its loop is unrolled, and
    under Triton 3.9 the bias gradient's dot then spills 8 bytes.)  In float32 the weight gradient's first run of taps,
    which sums the bias gradient, is a launch of its own, and the two launches share the role's floor out."""
    result, out = _static_run(tmp_path, "--preset", "paper", "--size", "32", "--dtype", "bfloat16,float32", "--layers", "conv_0_0")
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    figures = report["dtypes"]["bfloat16"]
    rows = figures["devices"]["H100 SXM5 80GB"]["rows"]
    kernels = [(r["role"], r["kernel"]) for r in rows]
    assert kernels == [
        ("forward", "_per_sample_conv3d_tma_forward_kernel"),
        ("input-grad", "_per_sample_conv3d_tma_forward_kernel"),
        ("weight-grad", "_per_sample_conv3d_tma_weight_grad_kernel"),
    ]
    assert figures["kernels_compiled"] == 2 and "compile: 2 kernels for 3 launches" in result.stdout
    assert all(r["spill_bytes"] == 0 and r["tensor_instruction"] == "HGMMA" for r in rows)
    rows = report["dtypes"]["float32"]["devices"]["H100 SXM5 80GB"]["rows"]
    assert [r["role"] for r in rows] == ["forward", "input-grad", "weight-grad", "weight-grad"]
    # the weight gradient's floor is shared out between its two launches, not counted twice
    forward, weight_grads = rows[0], rows[2:]
    assert sum(r["floor_compute_s"] for r in weight_grads) == pytest.approx(forward["floor_compute_s"])


def _captured_in_a_process_of_its_own(script: str) -> str:
    """What `script` prints, run without TRITON_INTERPRET: the test process interprets Triton (conftest), whose
    launches are not recorded."""
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_an_a100_gets_the_gathering_kernels_and_a_hopper_the_tma_ones():
    script = (
        "from hypersort_core.config import ModelConfig\n"
        "from hypersort_core.static_bench import capture_training_step\n"
        "for arch in (80, 90):\n"
        "    print(sorted({l.kernel_name for l in capture_training_step(ModelConfig(), 16, 2, 'bfloat16', arch)}))\n"
    )
    a100, hopper = _captured_in_a_process_of_its_own(script).splitlines()
    assert "tma" not in a100 and "_per_sample_conv3d_weight_grad_kernel" in a100
    assert "_per_sample_conv3d_tma_forward_kernel" in hopper and "_per_sample_conv3d_tma_weight_grad_kernel" in hopper


def test_convs_with_the_same_output_channels_share_a_compiled_kernel_in_the_paper_unet():
    """The TMA kernels take x's channels (and the forward the volume's size) at run time, so that a first training step
    compiles fewer kernels: the decoder's first conv (twice the channels in) shares its level's weight-gradient kernel,
    and its forward at the 64-channel level; the 64 -> 128 input gradient shares the 128-channel level's forward.
    Specialisation keys only, without compiling."""
    script = (
        "import json\n"
        "from hypersort_core.config import PRESETS\n"
        "from hypersort_core.static_bench import capture_training_step, kernel_key\n"
        "launches = capture_training_step(PRESETS['paper']['model'], 168, 2, 'bfloat16', 90)\n"
        "print(json.dumps([[l.layer, l.role, kernel_key(l, 90)[0]] for l in launches]))\n"
    )
    launches = json.loads(_captured_in_a_process_of_its_own(script))
    key = {(layer, role): k for layer, role, k in launches}
    for level in range(3):
        assert key[(f"dec_conv_{level}_0", "weight-grad")] == key[(f"conv_{level}_0", "weight-grad")] != key[(f"conv_{level}_0", "forward")]
    assert key[("dec_conv_2_0", "forward")] == key[("conv_2_0", "forward")]
    assert key[("dec_conv_2_0", "input-grad")] == key[("conv_3_0", "forward")]
    assert (len(launches), len({k for _, _, k in launches})) == (88, 37)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--batch", "2,4"], "--static bounds one batch size at a time, got --batch 2,4"),
        (["--quick"], "--static compiles without running anything; --quick applies to timed runs only"),
        (["--preset", "small", "--size", "16", "--layers", "conv_9"], "unknown layer conv_9; the small UNet has head, conv_init,"),
        (["--preset", "small", "--size", "16"], "--static compiles the kernels for a GPU: run it without TRITON_INTERPRET=1"),
    ],
)
def test_impossible_static_settings_are_one_line_and_exit_code_2(arguments, message, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    result = CliRunner().invoke(main, ["bench", "--static", "--out", str(tmp_path / "s.json"), *arguments])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"hsort: error: {message}") and result.stderr.count("\n") == 1
    assert not (tmp_path / "s.json").exists()


def _calibrate():
    spec = importlib.util.spec_from_file_location("calibrate", Path(__file__).parents[1] / "bench" / "calibrate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_measured_layer_is_printed_beside_the_bound_of_its_own_launches():
    shape = {"transposed": False, "c_in": 8, "c_out": 8, "kernel": 3, "stride": 1, "padding": 1, "in_size": 16}
    launches = [
        {"layer": layer, "role": role, "shape": shape, "issue_bound_s": seconds}
        for layer in ("conv_0_0", "conv_0_1")
        for role, seconds in [("forward", 1e-3), ("input-grad", 2e-3), ("weight-grad", 3e-3)]
    ]
    static = {
        "settings": {"batch": 2, "layers": None},
        "dtypes": {"bfloat16": {"devices": {"H100": {"rows": launches, "totals": {"step_issue_bound_s": 0.05}}}}},
    }
    bench = {
        "layer_shapes": [{"name": "conv 8→8 k3 s1 @16 (×2)", **{k: v for k, v in shape.items() if k != "in_size"}, "size": 16}],
        "rows": [
            {"section": "layers", "case": "conv 8→8 k3 s1 @16 (×2)", "dtype": "bfloat16", "batch": 2, "mode": mode, "variant": variant, "median_s": 0.012}
            for mode in ("forward", "fwd+bwd")
            for variant in ("ours", "grouped")
        ]
        + [
            {"section": "step", "case": "training step", "dtype": "bfloat16", "batch": 2, "mode": "step", "variant": "ours", "median_s": 0.1},
            {"section": "layers", "case": "conv 8→8 k3 s1 @16 (×2)", "dtype": "bfloat16", "batch": 4, "mode": "forward", "variant": "ours", "median_s": 0.02},
        ],
    }
    lines = _calibrate().bound_lines(static, bench)
    assert len(lines) == 3  # ours only, the static report's batch only
    assert "forward: measured 12 ms, static issue bound >= 1 ms on the H100 (measured / bound = 12.00)" in lines[0]
    assert "fwd+bwd: measured 12 ms, static issue bound >= 6 ms" in lines[1] and "(measured / bound = 2.00)" in lines[1]
    assert lines[2].startswith("step training step bfloat16 B=2 step: measured 100 ms, static issue bound >= 50 ms")
