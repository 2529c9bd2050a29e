"""bench/curation.py: the curation benchmark's metrics, and one tiny end-to-end run of it."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).parents[1] / "bench" / "curation.py"


@pytest.fixture(scope="module")
def curation():
    spec = importlib.util.spec_from_file_location("curation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["curation"] = module  # as importlib's own recipe does: a dataclass looks its module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules["curation"]


def test_best_cluster_f1(curation):
    subset = np.array([False, False, False, True, True, True])
    assert curation.best_cluster_f1(np.array([0, 0, 0, 1, 1, 1]), subset) == 1.0
    assert curation.best_cluster_f1(np.array([0, 0, 0, 0, 0, 0]), subset) == pytest.approx(2 * 3 / 9)
    assert curation.best_cluster_f1(np.array([0, 0, 1, 1, 1, 2]), subset) == pytest.approx(2 * 2 / 6)


def test_error_aurocs_compare_each_kind_with_the_clean_cases_of_the_main_style(curation):
    result = {
        "kind": ["clean", "clean", "clean", "eroded", "shift", "clean"],
        "style": ["main", "main", "main", "main", "main", "neighbour"],
        "cluster": [0, 0, 0, 1, 0, 1],
        # the style case scores highest, yet it is no wrong label: it stays out of every AUROC
        "scores": {"norm": [0.1, 0.2, 0.3, 0.5, 0.25, 0.9]},
    }
    metrics = curation.run_metrics(result)
    assert metrics["norm"]["eroded"] == 1.0
    assert metrics["norm"]["shift"] == pytest.approx(2 / 3)
    assert metrics["norm"]["overall"] == pytest.approx((3 + 2) / 6)
    assert metrics["norm"]["holes"] is None
    assert metrics["style_f1"] == pytest.approx(2 * 1 / 3)


def test_the_style_f1_over_cluster_counts_tells_a_map_that_holds_the_style_from_one_that_does_not(curation):
    rng = np.random.default_rng(0)
    main = rng.normal(0, 0.05, (27, 2))
    subset = np.r_[np.zeros(27, bool), np.ones(5, bool)]
    apart = np.r_[main, rng.normal([0.3, 0.0], 0.01, (5, 2))]  # the style's five cases together, off to one side
    mixed = np.r_[main, rng.normal(0, 0.05, (5, 2))]  # the style's cases among the main ones
    assert curation.best_f1_over_cluster_counts(apart, subset) == 1.0
    assert curation.best_f1_over_cluster_counts(mixed, subset) < 0.6
    metrics = curation.run_metrics(
        {"kind": ["clean"] * 32, "style": ["main"] * 27 + ["neighbour"] * 5, "cluster": [0] * 32, "latents": apart.tolist(), "scores": {}}
    )
    assert metrics["style_f1"] == pytest.approx(2 * 5 / 37) and metrics["style_f1_any_count"] == 1.0


def test_a_style_alone_has_no_error_aurocs_but_its_style_f1(curation):
    """--perturbed 0: the style without wrong labels; the table says n/a where there is nothing to detect."""
    rng = np.random.default_rng(1)
    latents = np.r_[rng.normal(0, 0.05, (27, 2)), rng.normal([0.3, 0.0], 0.01, (5, 2))]
    result = {
        "dataset": "cases32_size24_seed0_coarse_perturbed0",
        "kind": ["clean"] * 32,
        "style": ["main"] * 27 + ["coarse"] * 5,
        "cluster": [0] * 27 + [1] * 5,
        "latents": latents.tolist(),
        "scores": {name: rng.random(32).tolist() for name in curation.HYPERSORT_SCORES},
    }
    summary = curation.summarize([result])
    assert all(value is None for row in summary["median"].values() for value in row.values())
    assert summary["style_f1"] == [1.0] and summary["style_f1_any_count"] == [1.0]
    table = curation.format_table(summary, {"tag": "coarse-alone", "minutes": 1.0})
    assert "no wrong labels" in table and "n/a" not in table and "F1 median 1.00" in table


def test_datasets_of_different_styles_never_share_a_folder(curation):
    names = {curation.Dataset(64, 24, 0, style, curation.PERTURBED).name for style in ("neighbour", "coarse", "vessel", curation.STYLE)}
    assert len(names) == 3
    assert curation.Dataset(64, 24, 0, curation.STYLE, 0.0).name != curation.Dataset(64, 24, 0, curation.STYLE, curation.PERTURBED).name


def test_a_larger_style_subset_is_a_dataset_of_its_own(curation):
    default = curation.Dataset(64, 24, 0, "vessel", curation.PERTURBED).name
    assert curation.Dataset(64, 24, 0, "vessel", curation.PERTURBED, curation.STYLE_FRACTION).name == default  # the stored datasets keep their names
    assert curation.Dataset(64, 24, 0, "vessel", curation.PERTURBED, 0.25).name == default + "_fraction0.25"


@pytest.mark.slow
def test_a_tiny_benchmark_writes_its_table_and_json(tmp_path, curation):
    command = [
        sys.executable,
        str(SCRIPT),
        "--cases",
        "24",
        "--seeds",
        "0",
        "--size",
        "16",
        "--epochs",
        "1",
        "--jobs",
        "1",
        "--out",
        str(tmp_path),
        "--tag",
        "tiny",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "tiny" / "results.json").read_text())
    run = report["runs"][0]
    assert set(run["scores"]) >= {"ranked", "norm", "mean_dist", "nll", "loss_lambda0", "training_loss", "test_dice"}
    assert len(run["kind"]) == len(run["scores"]["norm"]) == 24
    assert set(run["kind"]) - {"clean"} == set(report["datasets"]["kinds"])
    assert 0 <= report["summary"]["style_f1_median"] <= report["summary"]["style_f1_any_count_median"] <= 1
    assert "style subset as one cluster" in done.stdout and "training_loss" in done.stdout
    assert (tmp_path / "tiny" / "maps.png").read_bytes().startswith(b"\x89PNG")
    # a second variant of HyperSORT-only settings reuses the dataset and the baselines' scores
    baselines = sorted((tmp_path / "baselines").iterdir())
    stamps = [path.stat().st_mtime_ns for path in baselines]
    again = subprocess.run([*command[:-1], "other", "--set", "l1=0.05"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert sorted((tmp_path / "baselines").iterdir()) == baselines and [path.stat().st_mtime_ns for path in baselines] == stamps
    assert json.loads((tmp_path / "other" / "results.json").read_text())["settings"] == {"l1": 0.05}
    # --perturbed 0: a dataset of its own, with the style and no wrong label
    alone = subprocess.run([*command[:-1], "alone", "--perturbed", "0", "--no-baselines"], capture_output=True, text=True, timeout=600)
    assert alone.returncode == 0, alone.stderr
    report = json.loads((tmp_path / "alone" / "results.json").read_text())
    assert report["datasets"]["perturbed"] == 0 and report["runs"][0]["dataset"] == f"cases24_size16_seed0_{curation.STYLE}_perturbed0"
    assert set(report["runs"][0]["kind"]) == {"clean"} and curation.STYLE in report["runs"][0]["style"]
    assert (tmp_path / "alone" / "maps.png").is_file()  # a map with nothing to detect is drawn too
    # --style-fraction: a dataset of its own, with that share of the cases in the style
    larger = subprocess.run(
        [*command[:-1], "larger", "--perturbed", "0", "--style-fraction", "0.5", "--no-baselines"], capture_output=True, text=True, timeout=600
    )
    assert larger.returncode == 0, larger.stderr
    report = json.loads((tmp_path / "larger" / "results.json").read_text())
    assert report["datasets"]["style_fraction"] == 0.5 and report["runs"][0]["dataset"].endswith("_perturbed0_fraction0.5")
    assert report["runs"][0]["style"].count(curation.STYLE) == 12
