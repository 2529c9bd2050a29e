"""`hsort analyze`: scores, clusters and the worst-first ranking, on latents with a known answer and
on a trained run."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_checks import assert_one_line_error
from click.testing import CliRunner

from hypersort_core.analysis import find_clusters
from hypersort_core.checkpoint import checkpoint_paths
from hypersort_core.cli.analyze import analyze
from hypersort_core.config import ConfigError
from hypersort_core.data import scored_roi
from hypersort_core.latents import latent_scores
from hypersort_core.loss import segmentation_loss
from hypersort_core.main_style import main_style_fit, prepared_training_cases, run_misfit
from hypersort_core.report import analyze_run
from hypersort_core.run import load_run
from hypersort_core.styles import read_clusters_csv

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def two_styles_and_two_outliers() -> np.ndarray:
    """A small main style at 0, a larger second style at (1, 0), and two isolated cases (the last two)."""
    rng = np.random.default_rng(1)
    return np.vstack([rng.normal(0, 0.05, (12, 2)), rng.normal((1, 0), 0.1, (20, 2)), [[0, 1.5], [-1, -1]]])


@pytest.mark.parametrize("method", ["gmm", "kmeans"])
def test_the_mixture_finds_the_styles_and_the_main_one_holds_zero(method):
    latents = two_styles_and_two_outliers()
    clustering = find_clusters(latents, method=method)

    assert clustering.chosen_by == "prior"
    assert clustering.sizes.tolist() == [12, 20, 1, 1]  # the main style first, though smaller; then by size
    assert len(set(clustering.members[:12])) == 1 and clustering.members[0] == 0
    assert set(clustering.members[12:32]) == {1}
    assert np.linalg.norm(clustering.centroids[0]) < 0.05
    assert clustering.centroids[1] == pytest.approx([1, 0], abs=0.1)


@pytest.mark.parametrize("method", ["gmm", "kmeans"])
def test_the_density_score_flags_cases_that_sit_alone(method):
    """Each isolated case is its own cluster, yet scores higher than every case of a style."""
    clustering = find_clusters(two_styles_and_two_outliers(), method=method)
    assert clustering.density_name == {"gmm": "nll", "kmeans": "centroid_dist"}[method]
    assert set(np.argsort(-clustering.density)[:2]) == {32, 33}


@pytest.mark.parametrize("cases", [30, 60])
def test_cases_of_one_style_form_one_cluster(cases):
    """The mixture seldom splits a single Gaussian cloud (BIC, before it, never did at these sizes): of 30
    draws it kept 25 or 26 whole with the map's variance as the spread, and all 30 now."""
    kept_whole = [len(find_clusters(np.random.default_rng(seed).normal(size=(cases, 2))).centroids) == 1 for seed in range(30)]
    assert sum(kept_whole) >= 27


def test_two_small_styles_far_apart_stay_apart():
    for seed in range(10):
        rng = np.random.default_rng(seed)
        latents = np.vstack([rng.normal(0, 0.1, (4, 2)), rng.normal((1, 0), 0.1, (3, 2))])
        assert find_clusters(latents).sizes.tolist() == [4, 3]


def read_latent_map(fixture: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A stored latent map with its truth: the latents, each case's error kind, and whether it is in the style."""
    with open(Path(__file__).parent / "fixtures" / fixture, newline="") as handle:
        rows = list(csv.DictReader(handle))
    latents = np.array([[float(row["z0"]), float(row["z1"])] for row in rows])
    return latents, np.array([row["kind"] for row in rows]), np.array([row["style"] != "main" for row in rows])


@pytest.mark.parametrize("fixture, cases", [("latent_map_coarse_style.csv", 64), ("latent_map_vessel_style.csv", 96)])
def test_a_second_style_beside_scattered_wrong_labels_gets_its_own_cluster(fixture, cases):
    """Latent maps of the curation benchmark (120 epochs; bench/README.md), where the style's cases stand
    apart to one side and wrong labels scatter around the main style.  The `coarse` map (64 cases): BIC,
    which chose the number of clusters before, kept one cluster for all of them (style F1 0.27).  The
    `vessel` map (96 cases, 14 in the style): with the map's variance as its spread, which the far-out
    wrong labels inflate, the mixture kept the style in the main cluster (F1 0.29)."""
    latents, kinds, style = read_latent_map(fixture)
    assert len(latents) == cases

    members = find_clusters(latents).members
    best = max(2 * np.sum(style & (members == cluster)) / (np.sum(members == cluster) + style.sum()) for cluster in set(members))
    assert best >= 0.9
    assert 0 not in members[style] and np.sum(members == 0) > cases / 2  # the main style is its own, the largest


def test_a_lump_at_the_edge_of_the_main_style_is_not_a_style():
    """The demo's map (60 cases, eroded and dilated labels, no second style): 11 clean cases bunch at one end of
    the main style, and the mixture under the robust spread gave them a cluster of their own; seen along the line
    between the two centroids they leave no gap, so they go back into the main style."""
    latents, kinds, _ = read_latent_map("latent_map_demo.csv")
    members = find_clusters(latents).members

    assert set(members[kinds == "clean"]) == {0}
    assert {frozenset(kinds[members == cluster]) for cluster in set(members) - {0}} == {frozenset({"eroded"}), frozenset({"dilated"})}


def test_a_centroid_is_the_mean_of_its_cases():
    """Not the mixture's mean, which its prior pulls towards the middle of the map: a centroid is the latent of a style's UNet."""
    latents = two_styles_and_two_outliers()
    clustering = find_clusters(latents)
    for cluster, centroid in enumerate(clustering.centroids):
        assert centroid == pytest.approx(latents[clustering.members == cluster].mean(axis=0))


def test_clusters_are_the_same_on_every_call_and_can_be_fixed():
    latents = two_styles_and_two_outliers()
    first, second = find_clusters(latents), find_clusters(latents)
    assert np.array_equal(first.members, second.members) and np.array_equal(first.density, second.density)

    fixed = find_clusters(latents, clusters=2)
    assert fixed.chosen_by == "fixed" and len(fixed.centroids) == 2
    assert fixed.members[0] == 0


@pytest.mark.parametrize(
    "latents, clusters, message",
    [
        (np.zeros((1, 2)), None, "2 cases at least"),
        (two_styles_and_two_outliers(), 40, "choose 1 to 34"),
        (np.zeros((5, 2)), 2, "5 latents lie at 1 distinct points"),
    ],
)
def test_impossible_clusterings_are_refused_with_the_reason(latents, clusters, message):
    with pytest.raises(ConfigError, match=message):
        find_clusters(latents, clusters)


def test_latents_collapsed_to_one_point_form_one_main_style():
    clustering = find_clusters(np.zeros((5, 2)))
    assert clustering.sizes.tolist() == [5] and np.all(np.isfinite(clustering.density))


# ---------------------------------------------------------------------------------------------
# On a trained run


@pytest.fixture(scope="module")
def analyzed(trained_run, tmp_path_factory):
    run_dir = Path(shutil.copytree(trained_run, tmp_path_factory.mktemp("analysis") / "run"))
    return analyze_run(run_dir, gallery=3, progress=False)


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_ranking_lists_every_case_once_by_the_misfit_with_its_scores(analyzed, trained_run):
    run = load_run(trained_run)
    rows = read_rows(analyzed.run_dir / "ranking.csv")

    assert sorted(row["case"] for row in rows) == sorted(run.case_ids)
    assert [int(row["rank"]) for row in rows] == list(range(1, len(rows) + 1))
    norm, mean_dist = latent_scores(run.latents)
    by_case = dict(zip(run.case_ids, zip(norm, mean_dist)))
    assert [float(row["misfit"]) for row in rows] == pytest.approx(sorted(analyzed.misfit, reverse=True), rel=1e-5)
    for row in rows:
        assert float(row["norm"]) == pytest.approx(by_case[row["case"]][0], rel=1e-5)
        assert float(row["mean_dist"]) == pytest.approx(by_case[row["case"]][1], rel=1e-5)
        assert float(row["nll"]) == pytest.approx(analyzed.columns["nll"][run.case_ids.index(row["case"])], rel=1e-5)
        assert 0 <= float(row["dice_lambda0"]) <= 1
        assert row["style"] == ("main" if row["cluster"] == "0" else f"style {row['cluster']}")
        assert Path(row["label"]).is_file() and row["case"] in Path(row["label"]).name


def test_loss_and_dice_compare_the_given_label_with_the_main_style_prediction(analyzed, trained_run):
    run = load_run(trained_run)
    case = run.prepared().cases[0]
    image, label = scored_roi(case, run.config.preprocess)
    main_style = np.zeros(run.config.model.latent_dim)
    prediction = run.segment_prepared(image, main_style) > 0
    given = np.asarray(label) > 0
    dice = 2 * (prediction & given).sum() / (prediction.sum() + given.sum())
    assert analyzed.dice[run.case_ids.index(case.case_id)] == pytest.approx(dice)
    logits = run.logits(torch.from_numpy(np.array(image, dtype=np.float32))[None, None], main_style)
    loss = segmentation_loss(logits, torch.from_numpy(np.array(label, dtype=np.int64))[None])
    assert analyzed.loss_lambda0[run.case_ids.index(case.case_id)] == pytest.approx(float(loss[0]), rel=1e-5)


def test_the_own_loss_judges_the_label_by_the_unet_of_the_case_s_own_latent(analyzed, trained_run):
    run = load_run(trained_run)
    case = run.prepared().cases[1]
    image, label = scored_roi(case, run.config.preprocess)
    logits = run.logits(torch.from_numpy(np.array(image, dtype=np.float32))[None, None], run.latent_of(case.case_id))
    loss = segmentation_loss(logits, torch.from_numpy(np.array(label, dtype=np.int64))[None])
    assert analyzed.loss_own[run.case_ids.index(case.case_id)] == pytest.approx(float(loss[0]), rel=1e-5)


def test_the_misfit_is_the_geometric_mean_of_the_running_losses_training_kept(analyzed, trained_run):
    running = load_run(trained_run).running_losses
    assert not np.isnan(running["loss_lambda0"]).any() and not np.isnan(running["loss_own"]).any()
    assert analyzed.misfit == pytest.approx(np.sqrt(running["loss_lambda0"] * running["loss_own"]), rel=1e-6)
    assert analyzed.ranked_by == "misfit"


def test_a_run_without_running_losses_is_judged_by_its_final_unets(trained_run, tmp_path):
    """Runs of earlier versions, and runs imported from the reference code, kept no running means."""
    run_dir = Path(shutil.copytree(trained_run, tmp_path / "run"))
    for path in checkpoint_paths(run_dir):
        payload = torch.load(path, weights_only=True)
        del payload["state"]["running_losses"], payload["state"]["scorings"]
        torch.save(payload, path)
    run = load_run(run_dir)
    fit = main_style_fit(run, prepared_training_cases(run))
    assert np.isnan(run.running_losses["loss_lambda0"]).all()
    assert run_misfit(run, fit) == pytest.approx(np.sqrt(fit.loss_lambda0 * fit.loss_own), rel=1e-6)


def test_the_most_suspicious_cases_have_pictures(analyzed):
    drawn = {index for index, picture in enumerate(analyzed.pictures) if picture is not None}
    assert set(analyzed.ranking[: analyzed.gallery].tolist()) <= drawn


def test_clusters_csv_names_the_main_style_and_is_what_predict_reads(analyzed):
    rows = read_rows(analyzed.run_dir / "clusters.csv")
    styles = read_clusters_csv(analyzed.run_dir / "clusters.csv")

    assert [row["style"] for row in rows] == ["main", *[f"style {k}" for k in range(1, len(rows))]]
    assert [row["main"] for row in rows] == ["1"] + ["0"] * (len(rows) - 1)
    assert sum(style.size for style in styles) == len(analyzed.case_ids)
    assert np.allclose([style.latent for style in styles], analyzed.clustering.centroids, rtol=1e-5)
    for cluster, row in enumerate(rows):
        members = analyzed.clustering.members == cluster
        assert float(row["norm_mean"]) == pytest.approx(analyzed.columns["norm"][members].mean(), rel=1e-5)


def test_latents_csv_gains_a_cluster_column_and_keeps_the_rest(analyzed, trained_run):
    before = read_rows(trained_run / "latents.csv")
    after = read_rows(analyzed.run_dir / "latents.csv")
    assert [{k: v for k, v in row.items() if k != "cluster"} for row in after] == before
    cluster_of = dict(zip(analyzed.case_ids, analyzed.clustering.members))
    assert [int(row["cluster"]) for row in after] == [cluster_of[row["case"]] for row in after]


def test_cli_prints_the_clusters_the_worst_cases_and_every_file(trained_run, tmp_path):
    run_dir = Path(shutil.copytree(trained_run, tmp_path / "run"))
    analyze_run(run_dir, clusters=1, gallery=0, progress=False)  # the command replaces an earlier analysis
    result = CliRunner().invoke(analyze, [str(run_dir), "--method", "kmeans", "--clusters", "2", "--gallery", "2", "--quiet"])

    assert result.exit_code == 0, result.output
    assert "2 clusters (kmeans), fixed by --clusters" in result.output
    assert "main" in result.output and "centroid_dist" in result.output
    top = read_rows(run_dir / "ranking.csv")[0]
    assert any(line.split()[:2] == ["1", top["case"]] for line in result.output.splitlines())
    for name in ("ranking.csv", "clusters.csv", "latent_map.png", "latent_map.html", "report.html"):
        assert str(run_dir / name) in result.output and (run_dir / name).stat().st_size > 0
    latents = read_rows(run_dir / "latents.csv")
    assert list(latents[0]).count("cluster") == 1 and {row["cluster"] for row in latents} == {"0", "1"}


def test_cli_refuses_bad_input_in_one_line(trained_run, tmp_path):
    run_dir = Path(shutil.copytree(trained_run, tmp_path / "run"))
    runner = CliRunner()
    assert_one_line_error(runner.invoke(analyze, [str(run_dir), "--clusters", "99", "--quiet"]), "--clusters 99")
    assert_one_line_error(runner.invoke(analyze, [str(tmp_path), "--quiet"]), tmp_path)
    assert not (run_dir / "ranking.csv").exists()


def test_only_the_most_suspicious_cases_get_a_slice_picture(trained_run, tmp_path):
    """Thousands of cases would take minutes to draw: the map says why a case has no picture."""
    run_dir = Path(shutil.copytree(trained_run, tmp_path / "run"))
    analysis = analyze_run(run_dir, gallery=1, pictures=2, progress=False)
    drawn = {i for i, picture in enumerate(analysis.pictures) if picture is not None}
    assert drawn == set(analysis.ranking[:2].tolist())
    page = (run_dir / "latent_map.html").read_text()
    data = json.loads(page.split('<script type="application/json" id="map-data">')[1].split("</script>")[0])
    assert sum(case["picture"] is None for case in data["cases"]) == len(analysis.case_ids) - 2
    assert "only the most suspicious cases get one" in page
