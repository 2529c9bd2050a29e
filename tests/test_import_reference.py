"""`hsort import-reference`: a checkpoint in the public code's format becomes a run that computes the same function."""

import json

import pytest
import torch
from cli_checks import assert_one_line_error
from click.testing import CliRunner
from dataset_writers import write_manifest, write_reference_checkout

from hypersort_core.cli.predict import import_reference
from hypersort_core.model import ModelConfig, flatten_state_dict
from hypersort_core.reference import ReferenceHyperNetwork
from hypersort_core.run import load_run

# hidden widths unlike the paper's, so that the architecture really is read off the checkpoint
REFERENCE = ModelConfig(levels=2, convs_per_level=1, base_channels=4, latent_dim=3, hidden=(8, 6))
SMALL_GRID = ["--roi", "16", "--spacing", "2"]


def reversed_manifest(root):
    """A data list whose row order is not the sorted order of its case ids (row 0 is scan_002)."""
    manifest = write_manifest(root, n_cases=3)
    header, *rows = manifest.read_text().splitlines()
    manifest.write_text("\n".join([header, *reversed(rows)]) + "\n")
    return manifest


@pytest.fixture
def reference_checkpoint(tmp_path):
    """model_w.pt (with the placeholder tensor), latent_dict.pt for rows 0..2, and the TSV data list."""
    torch.manual_seed(0)
    reference = ReferenceHyperNetwork(REFERENCE)
    torch.save({**reference.state_dict(), "model.dummy_param": torch.zeros(1)}, tmp_path / "model_w.pt")
    latents = {row: torch.randn(1, REFERENCE.latent_dim) for row in range(3)}
    torch.save(latents, tmp_path / "latent_dict.pt")
    return reference, latents, reversed_manifest(tmp_path / "data")


def run_import(tmp_path, *args):
    files = [tmp_path / "model_w.pt", tmp_path / "latent_dict.pt", tmp_path / "data" / "data.tsv"]
    return CliRunner().invoke(import_reference, [*map(str, files), "--out", str(tmp_path / "run"), *map(str, args)])


def test_imported_run_computes_the_reference_function(reference_checkpoint, tmp_path):
    reference, latents, manifest = reference_checkpoint
    result = run_import(tmp_path, *SMALL_GRID)
    assert result.exit_code == 0, result.output

    run = load_run(tmp_path / "run", "cpu")
    assert run.config.model == REFERENCE
    assert run.case_ids == ["scan_000", "scan_001", "scan_002"]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["data"], config["layout"]) == (str(manifest), "manifest")
    for row, case in enumerate(["scan_002", "scan_001", "scan_000"]):
        latent = latents[row]
        torch.testing.assert_close(torch.from_numpy(run.latent_of(case)), latent[0], rtol=0, atol=0)
        with torch.no_grad():
            theta, expected = run.model.theta(latent)[0], flatten_state_dict(reference.unet_parameters(latent), REFERENCE)
        assert (theta - expected).abs().max() <= 1e-5 * expected.abs().max()

    x = torch.randn(3, 1, 16, 16, 16)
    all_latents = torch.cat([latents[row] for row in range(3)])
    with torch.no_grad():
        output, expected = run.model(x, all_latents), reference(x, all_latents)
    assert (output - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert [case.case_id for case in run.prepared().cases] == run.case_ids


def test_rows_without_a_latent_stop_the_import_unless_allowed(reference_checkpoint, tmp_path):
    _, latents, _ = reference_checkpoint
    del latents[1]
    torch.save(latents, tmp_path / "latent_dict.pt")
    result = run_import(tmp_path, *SMALL_GRID)
    assert_one_line_error(result, tmp_path / "latent_dict.pt")
    assert "scan_001 (row 1)" in result.stderr

    result = run_import(tmp_path, *SMALL_GRID, "--allow-missing")
    assert result.exit_code == 0, result.output
    run = load_run(tmp_path / "run", "cpu")
    assert run.case_ids == ["scan_000", "scan_002"]
    assert [case.case_id for case in run.prepared().cases] == run.case_ids


def without_a_head(state):
    return {key: value for key, value in state.items() if not key.startswith("heads.conv_1_0;weight")}


def with_a_wrong_shape(state):
    return {**state, "heads.norm_init;bias.bias": torch.zeros(7)}


@pytest.mark.parametrize("break_it", [without_a_head, with_a_wrong_shape, lambda state: [1, 2, 3]], ids=["missing head", "wrong shape", "not a state_dict"])
def test_malformed_checkpoint_is_one_line(reference_checkpoint, tmp_path, break_it):
    torch.save(break_it(torch.load(tmp_path / "model_w.pt", weights_only=True)), tmp_path / "model_w.pt")
    assert_one_line_error(run_import(tmp_path), tmp_path / "model_w.pt")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_a_file_that_is_not_a_checkpoint_is_one_line(reference_checkpoint, tmp_path):
    (tmp_path / "latent_dict.pt").write_bytes(b"not a checkpoint")
    assert_one_line_error(run_import(tmp_path), tmp_path / "latent_dict.pt")


def test_the_reference_checkouts_own_data_list_is_imported_as_it_is(reference_checkpoint, tmp_path):
    """data_files/data_list_TS.txt (tabs, CRLF, paths relative to the checkout's root): latent_dict's row i
    is the list's row i, whatever the working directory of the import."""
    _, latents, _ = reference_checkpoint
    data_list = write_reference_checkout(tmp_path / "HyperSORT", n_cases=3)
    files = [tmp_path / "model_w.pt", tmp_path / "latent_dict.pt", data_list]
    result = CliRunner().invoke(import_reference, [*map(str, files), "--out", str(tmp_path / "run"), *SMALL_GRID])
    assert result.exit_code == 0, result.output

    run = load_run(tmp_path / "run", "cpu")
    assert run.case_ids == ["0", "1", "2"]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"] == str(data_list)
    for row in range(3):
        torch.testing.assert_close(torch.from_numpy(run.latent_of(str(row))), latents[row][0], rtol=0, atol=0)
    assert [case.case_id for case in run.prepared().cases] == run.case_ids


def test_a_data_list_whose_images_are_not_found_is_one_line_naming_it_and_the_path(reference_checkpoint, tmp_path):
    data_list = write_reference_checkout(tmp_path / "HyperSORT", n_cases=3)
    moved = data_list.rename(tmp_path / "data_list_TS.txt")  # out of the checkout: nothing above it holds the data
    files = [tmp_path / "model_w.pt", tmp_path / "latent_dict.pt", moved]
    result = CliRunner().invoke(import_reference, [*map(str, files), "--out", str(tmp_path / "run"), *SMALL_GRID])
    assert_one_line_error(result, moved)
    assert "path_TS_dataset/images/0.nii.gz (row 2) is not found" in result.stderr
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
