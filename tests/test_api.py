"""The Python API: the README's example runs as written, and it returns what the CLI writes."""

from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import hypersort_core as hs
from hypersort_core.config import ConfigError
from hypersort_core.data import DataError, make_synthetic_dataset
from hypersort_core.latents import read_latents_csv
from hypersort_core.report import analyze_run

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.DOTALL)


@pytest.mark.slow
def test_the_readme_python_example_runs_as_written(tmp_path, monkeypatch, capsys):
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 2 and any("hs.fit(" in block for block in blocks)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    printed = capsys.readouterr().out
    assert "styles; the main one holds" in printed and "voxels of organ" in printed
    assert (tmp_path / "example/run/ranking.csv").is_file() and (tmp_path / "example/main_style.json").is_file()


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def as_csv_text(records: list[dict]) -> list[dict[str, str]]:
    return [{key: f"{value:.6g}" if isinstance(value, float) else str(value) for key, value in record.items()} for record in records]


@pytest.fixture(scope="module")
def analyzed_run(trained_run, tmp_path_factory) -> Path:
    run_dir = Path(shutil.copytree(trained_run, tmp_path_factory.mktemp("api") / "run"))
    analyze_run(run_dir, progress=False)
    return run_dir


def test_find_label_issues_on_the_latent_table_reproduces_the_ranking_and_clusters(analyzed_run):
    """From latents.csv (and the misfit and losses in ranking.csv), without the run: the same files, value for value."""
    case_ids, latents = read_latents_csv(analyzed_run / "latents.csv")
    ranking = read_rows(analyzed_run / "ranking.csv")
    by_case = {row["case"]: row for row in ranking}
    scores = {name: np.array([float(by_case[case][name]) for case in case_ids]) for name in ("misfit", "loss_lambda0", "loss_own")}
    issues = hs.find_label_issues(latents, case_ids, **scores)
    expected = [{key: value for key, value in row.items() if key not in ("label", "dice_lambda0")} for row in ranking]
    assert as_csv_text(issues.ranking_records()) == expected
    clusters = [{key: value for key, value in row.items() if key != "dice_lambda0_mean"} for row in read_rows(analyzed_run / "clusters.csv")]
    found = as_csv_text(issues.cluster_records())
    assert [record.keys() for record in found] == [record.keys() for record in clusters]
    for record, written in zip(found, clusters):  # means of the CSV's 6-digit scores may differ in the 6th digit
        assert {key: as_number(value) for key, value in record.items()} == {key: as_number(value, rel=1e-5) for key, value in written.items()}


def as_number(text: str, rel: float | None = None):
    """A CSV field as a number (approximately, given rel), or the text it is."""
    try:
        number = float(text)
    except ValueError:
        return text
    return number if rel is None else pytest.approx(number, rel=rel)


def test_the_two_losses_alone_give_the_misfit_ranking():
    latents = np.array([[0.0, 0.1], [3.0, 0.0], [0.1, 0.0], [0.0, -1.0]])
    issues = hs.find_label_issues(latents, loss_lambda0=np.array([0.2, 0.9, 0.1, 0.4]), loss_own=np.array([0.2, 0.1, 0.4, 0.4]))
    assert issues.ranked_by == "misfit"
    assert issues.misfit == pytest.approx([0.2, 0.3, 0.2, 0.4])
    assert [record["case"] for record in issues.ranking_records()] == ["3", "1", "0", "2"]


def test_without_losses_the_ranking_is_by_latent_norm():
    latents = np.array([[0.0, 0.1], [3.0, 0.0], [0.1, 0.0], [0.0, -1.0]])
    issues = hs.find_label_issues(latents)
    assert [record["case"] for record in issues.ranking_records()] == ["1", "3", "0", "2"]
    assert issues.ranked_by == "norm" and {"norm", "mean_dist", "nll"} <= set(issues.ranking_records()[0])


def test_find_label_issues_refuses_a_table_that_is_not_one():
    with pytest.raises(ConfigError, match="table"):
        hs.find_label_issues(np.zeros(5))
    with pytest.raises(ConfigError, match="case ids"):
        hs.find_label_issues(np.zeros((3, 2)), ["a", "b"])


def test_a_loaded_run_gives_scores_clusters_and_segmentations_as_data(analyzed_run, synthetic_dataset, tmp_path):
    run = hs.load_run(analyzed_run, device="cpu")
    scores = run.scores()
    assert [row["case"] for row in scores] == [row["case"] for row in read_rows(analyzed_run / "ranking.csv")]
    assert run.latents.shape == (len(run.case_ids), 2)
    assert len(run.clusters()) == len(read_rows(analyzed_run / "clusters.csv"))
    image_path = next((synthetic_dataset / "imagesTr").iterdir())
    labels, affine = run.segment(image_path)
    source = nib.load(image_path)
    assert labels.shape == source.shape and labels.dtype == np.uint8 and np.allclose(affine, source.affine)
    from_array, _ = run.segment(np.asarray(source.dataobj, dtype=np.float32), source.affine, latent=[0.0, 0.0])
    assert np.array_equal(from_array, labels)  # λ = 0 given as coordinates is the default style
    description = run.export(tmp_path / "unet.safetensors", case=run.case_ids[0])
    assert description.is_file() and hs.UNet.from_file(tmp_path / "unet.safetensors") is not None
    with pytest.raises(ConfigError, match="only one"):
        run.segment(image_path, cluster=0, case=run.case_ids[0])


def test_fit_checks_the_dataset_first_as_the_cli_does(tmp_path):
    data = make_synthetic_dataset(tmp_path / "data", cases=3, size=16, seed=0)
    (data / "labelsTr" / "synth_001.nii.gz").unlink()
    with pytest.raises(DataError, match="synth_001"):
        hs.fit(data, tmp_path / "run", preset="small", epochs=1, roi=16, progress=False)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
