"""The pictures and pages of `hsort analyze`: slices with both contours, and self-contained HTML in
which hostile case ids and file names stay text."""

import base64
import hashlib
import html
import io
import json
import re
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import to_rgb
from matplotlib.image import imread

from hypersort_core.analysis import Analysis, find_clusters
from hypersort_core.report import (
    LABEL_COLOUR,
    PREDICTION_COLOUR,
    case_picture,
    case_view,
    latent_map_page,
    plot_cluster_map,
    report_page,
    slice_centre,
)

HOSTILE_IDS = ["<img src=x onerror=alert(1)>", "</script><script>alert(2)</script>", "a&b \"q\" 'x'", "price $\\frac$ 5", "plain"]
SHAPE = (12, 10, 8)
SPACING = np.array([1.0, 1.0, 2.5])


def box(start: tuple[int, int, int], size: int = 4) -> np.ndarray:
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[start[0] : start[0] + size, start[1] : start[1] + size, start[2] : start[2] + size] = 1
    return mask


def picture(label: np.ndarray, prediction: np.ndarray) -> bytes:
    image = np.indices(SHAPE).sum(axis=0).astype(np.float32)
    return case_picture(image, label, prediction, SPACING, ("axial", "coronal", "sagittal"))


def analysis_of(case_ids: list[str], run_dir: Path) -> Analysis:
    rng = np.random.default_rng(0)
    latents = rng.normal(0, 1, (len(case_ids), 2))
    pictures = [picture(box((1 + i % 4, 2, 1)), box((2, 2, 1))) for i in range(len(case_ids))]
    return Analysis(
        run_dir=run_dir,
        data=run_dir.parent / "data <&>",
        case_ids=case_ids,
        label_files=[f"/data/labels/{case}.nii.gz" for case in case_ids],
        latents=latents,
        clustering=find_clusters(latents),
        loss_lambda0=rng.uniform(size=len(case_ids)),
        dice=rng.uniform(size=len(case_ids)),
        pictures=pictures,
        gallery=2,
    )


def embedded_data(page: str) -> dict:
    return json.loads(re.search(r'<script type="application/json" id="map-data">(.*?)</script>', page, re.DOTALL).group(1))


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> Analysis:
    return analysis_of(HOSTILE_IDS, tmp_path_factory.mktemp("report") / "run <b>")


@pytest.mark.parametrize("render, scripts", [(latent_map_page, 2), (report_page, 5)])
def test_case_ids_and_file_names_reach_the_page_only_escaped(hostile, render, scripts):
    page = render(hostile)

    for case in HOSTILE_IDS[:3]:
        assert case not in page
        assert f"/data/labels/{case}" not in page
    assert "run <b>" not in page and "data <&>" not in page
    assert page.count("</script>") == scripts  # the map's JSON and its own; report.html: the views' JSON, the slice viewer and the gallery's
    data = embedded_data(page)
    assert [case["id"] for case in data["cases"]] == HOSTILE_IDS
    assert [case["label"] for case in data["cases"]] == hostile.label_files


def test_the_report_gallery_shows_the_flagged_cases_worst_first(hostile):
    page = report_page(hostile)
    figures = re.findall(r"<figure>.*?</figure>", page, re.DOTALL)

    assert len(figures) == hostile.gallery
    for figure, i in zip(figures, hostile.ranking):
        assert f"<b>{html.escape(hostile.case_ids[i])}</b>" in figure
        assert base64.b64encode(hostile.pictures[i]).decode() in figure
        assert f"{hostile.dice[i]:.3f}" in figure
    assert "<figure>" not in report_page(replace(hostile, gallery=0))


def test_the_map_data_has_one_point_per_case_with_its_rank_and_scores(hostile):
    data = embedded_data(latent_map_page(hostile))
    assert [case["rank"] for case in data["cases"]] == [int(np.flatnonzero(hostile.ranking == i)[0]) + 1 for i in range(len(HOSTILE_IDS))]
    assert [column["name"] for column in data["columns"]] == ["norm", "mean_dist", "nll", "loss_lambda0", "dice_lambda0"]
    assert [case["values"] for case in data["cases"]] == pytest.approx(np.column_stack(list(hostile.columns.values())))
    assert [case["picture"] for case in data["cases"]] == ["data:image/png;base64," + base64.b64encode(p).decode() for p in hostile.pictures]


@pytest.mark.parametrize("render", [latent_map_page, report_page])
def test_the_pages_load_nothing_from_outside_and_allow_only_their_own_script(hostile, render):
    page = render(hostile)

    for link in re.findall(r'(?:src|href)="([^"]*)"', page):
        assert link.startswith(("data:image/png;base64,", "#case=")), link
    policy = re.search(r'http-equiv="Content-Security-Policy" content="([^"]*)"', page).group(1)
    assert "default-src 'none'" in policy
    script = re.search(r"<script>(.*?)</script>", page, re.DOTALL).group(1)
    allowed = "sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"script-src '{allowed}'" in policy  # a stale hash would block the map in every browser


def test_slices_go_through_the_label_centre_else_the_prediction_else_the_middle():
    assert slice_centre(box((2, 3, 1), 3) > 0, box((6, 6, 4), 3) > 0) == (3, 4, 2)
    nothing = np.zeros(SHAPE, dtype=bool)
    assert slice_centre(nothing, box((6, 6, 4), 3) > 0) == (7, 7, 5)
    assert slice_centre(nothing, nothing) == (6, 5, 4)


def colour_pixels(png: bytes, colour: str) -> int:
    rgb = imread(io.BytesIO(png))[..., :3]
    return int((np.abs(rgb - to_rgb(colour)).max(axis=-1) < 0.08).sum())


def test_the_picture_draws_each_contour_in_its_own_colour():
    label, prediction, empty = box((1, 1, 1)), box((2, 2, 2)), np.zeros(SHAPE, dtype=np.uint8)
    legend_only, label_only, both = picture(empty, empty), picture(label, empty), picture(label, prediction)
    assert both.startswith(b"\x89PNG")
    assert colour_pixels(label_only, LABEL_COLOUR) > colour_pixels(legend_only, LABEL_COLOUR) + 20
    assert colour_pixels(label_only, PREDICTION_COLOUR) == colour_pixels(legend_only, PREDICTION_COLOUR)
    assert colour_pixels(both, PREDICTION_COLOUR) > colour_pixels(legend_only, PREDICTION_COLOUR) + 20


def test_the_latent_map_png_names_cases_whatever_characters_they_hold(hostile, tmp_path):
    """A case id like 'price $\\frac$ 5' is not read as a broken formula."""
    plot_cluster_map(hostile, tmp_path / "latent_map.png")
    assert (tmp_path / "latent_map.png").read_bytes().startswith(b"\x89PNG")


def test_the_grey_window_is_set_around_the_labelled_organ_not_the_whole_volume():
    from hypersort_core.report import around_foreground

    label = np.zeros((20, 20, 20), bool)
    label[8:12, 9:11, 5:15] = True
    region = around_foreground(label, np.zeros_like(label))
    assert region[label].all() and region[6, 10, 10] and not region[5, 10, 10] and not region[0, 0, 0]
    assert around_foreground(np.zeros_like(label), np.zeros_like(label)).all()


@pytest.mark.parametrize("shape, step", [((12, 10, 8), 1), ((200, 96, 40), 3)])
def test_a_case_view_holds_every_voxel_or_every_step_th_of_a_large_volume(shape, step):
    rng = np.random.default_rng(0)
    image = rng.normal(size=shape).astype(np.float32)
    label, prediction = rng.uniform(size=shape) > 0.7, rng.uniform(size=shape) > 0.5
    view = case_view(image, label, prediction, np.array([0.8, 0.8, 3.0]), ("axial", "coronal", "sagittal"))

    sampled = (slice(None, None, step),) * 3
    assert view["shape"] == list(image[sampled].shape) and max(view["shape"]) <= 96
    assert view["spacing"] == [0.8 * step, 0.8 * step, 3.0 * step]
    masks = np.frombuffer(zlib.decompress(base64.b64decode(view["masks"])), dtype=np.uint8).reshape(view["shape"])
    np.testing.assert_array_equal(masks & 1, label[sampled])
    np.testing.assert_array_equal(masks >> 1, prediction[sampled])
    grey = np.frombuffer(zlib.decompress(base64.b64decode(view["image"])), dtype=np.uint8).reshape(view["shape"])
    order = np.argsort(image[sampled], axis=None)
    assert np.all(np.diff(grey.reshape(-1)[order].astype(int)) >= 0)  # brighter stays brighter (a window, clipped)


@pytest.mark.parametrize("misfit, ranked_by", [(None, "latent norm ‖λ‖"), (np.linspace(1, 0, 4), "misfit (λ = 0 and own loss)")])
def test_the_pages_name_the_score_the_ranking_is_by(tmp_path, misfit, ranked_by):
    """The pages once said 'ranked by latent norm' whatever ranked the cases."""
    analysis = replace(analysis_of(["a", "b", "c", "d"], tmp_path / "run"), misfit=misfit)

    for render in (latent_map_page, report_page):
        assert f"cases ranked by {html.escape(ranked_by)};" in render(analysis)
