"""`hsort analyze`: score, cluster and rank the training cases of a run, most suspicious first.

Scores per case, each one higher where a label deserves a look:
- `norm`: the L2 norm of the case's latent λ, the paper's primary score (Section 4.2). The L1 penalty
  pulls the main annotation style to λ = 0, so a case sits far from 0 when its label needs a UNet of
  its own.
- `mean_dist`: the mean Euclidean distance from its latent to the other cases' latents, the paper's
  second score: isolation from the rest of the dataset.
- `nll` (method gmm): the negative log-likelihood of its latent under the Gaussian mixture fitted to
  the latents, with the mixture's M-step redone without the case (its share leaves every component's
  weight, mean and covariance). A case cannot vouch for itself: one alone in its component, or in a
  pair, gets the density the other cases give its place, so isolated cases score high, while a case
  in a well-populated second style does not, as it does by norm.
- `centroid_dist` (method kmeans, which has no likelihood): the distance from its latent to the
  nearest cluster centroid once the case has left its own cluster, the k-means counterpart.

- `loss_lambda0`: the segmentation loss (cross-entropy + soft Dice, training's loss without its latent
  term) of the given label under the λ = 0 UNet, on the case's prepared ROI: how far the label is from
  what the main style would draw.  The λ = 0 UNet is trained by the main style's cases only in effect:
  a wrong label's case is fitted through its own latent, away from 0, so unlike a plain UNet trained
  on every case this one has not learned the wrong labels.
Beside them stands `dice_lambda0`, the foreground Dice between the given label and the λ = 0 UNet's
prediction (low: look here).

The ranking orders the cases by RANKED_BY, the best detector of wrong labels on the curation benchmark
(bench/curation.py; the figures are in the README): `loss_lambda0`.  The paper's scores stay beside it.

Clusters: a Gaussian mixture (full covariances, floored at RESOLUTION of the map's spread) whose number
of components minimises BIC over 1..min(6, N-1, distinct latents), unless `clusters` fixes it; k-means
(the other method) takes the same number. The cluster whose component
gives λ = 0 the highest posterior (k-means: the nearest centroid) is the main style, cluster 0; the
others follow by size, largest first, and are named "style 1", "style 2", ...

Files in the run folder: clusters.csv, ranking.csv, a `cluster` column added to latents.csv, and
latent_map.png, latent_map.html and report.html (drawn by report.py).
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
from scipy.special import logsumexp
from sklearn.cluster import KMeans
from sklearn.mixture import GaussianMixture
from tqdm import tqdm

from hypersort_core.atomic import atomic_write_text
from hypersort_core.baselines import scored_roi
from hypersort_core.config import ConfigError
from hypersort_core.data import DataError, PreparedCase, read_dataset
from hypersort_core.data.volumes import voxel_sizes
from hypersort_core.evaluate import CLUSTERS_NAME
from hypersort_core.latents import latent_scores, write_latents_csv
from hypersort_core.main_style import main_style, main_style_fit, prepared_training_cases
from hypersort_core.report import case_picture, case_view, plot_cluster_map, write_pages
from hypersort_core.run import Run, load_run

METHODS = ("gmm", "kmeans")
MAX_CLUSTERS = 6
RANDOM_STATE = 0  # the same latents give the same clusters on every call
# A mixture component narrower than this fraction of the map's spread (its standard deviation) is not
# resolved: without such a floor a component on a single case has unbounded likelihood, which BIC cannot
# hold back. With 0.05, BIC split 7 cases of pure noise into 3 to 5 clusters; with 0.2 it mostly keeps
# one, still separates two styles of 4 and 3 cases, and still gives a far outlier its own cluster.
RESOLUTION = 0.2
MIN_SHARE = 1e-6  # cases: a component holding less once a case has left it is gone
GALLERY = 12
# Slice pictures drawn, most suspicious first: each takes about 0.2 s on a CPU and 20 kB in the pages,
# so drawing every case of a dataset of thousands would take minutes for pictures nobody scrolls to.
PICTURES = 200
PRINTED_CASES = 10
RANKED_BY = "loss_lambda0"
RANKING_NAME = "ranking.csv"
LATENTS_NAME = "latents.csv"
DESCRIPTIONS = {  # column headings of the pages
    "norm": "latent norm ‖λ‖",
    "mean_dist": "mean distance",
    "nll": "held-out −log-likelihood",
    "centroid_dist": "held-out centroid distance",
    "loss_lambda0": "loss under the λ = 0 UNet",
    "dice_lambda0": "Dice to λ = 0 prediction",
}


@dataclass
class Clustering:
    """Clusters of the latents; cluster 0 is the main style (the one that holds λ = 0)."""

    method: str
    members: np.ndarray  # [N] cluster of each case
    centroids: np.ndarray  # [K, d]
    density_name: str  # nll or centroid_dist
    density: np.ndarray  # [N]
    bic: dict[int, float]  # BIC of each number of components tried

    @property
    def sizes(self) -> np.ndarray:
        return np.bincount(self.members, minlength=len(self.centroids))


@dataclass
class Analysis:
    run_dir: Path
    data: Path
    case_ids: list[str]
    label_files: list[str]  # where each given label lives: the file a curator would fix
    latents: np.ndarray  # [N, d]
    clustering: Clustering
    loss_lambda0: np.ndarray  # [N] segmentation loss of the given label under the λ = 0 UNet
    dice: np.ndarray  # [N] given label vs λ = 0 prediction
    pictures: list[bytes | None]  # [N] PNG: slices with the given label's and the λ = 0 prediction's contours (None: not drawn)
    gallery: int  # cases shown in report.html, worst first
    views: dict[int, dict] = field(default_factory=dict)  # the gallery's cases as volumes, for report.html's slice viewer

    @cached_property
    def columns(self) -> dict[str, np.ndarray]:
        """Every per-case number, scores first: what the CSVs, the map and the report show."""
        norm, mean_dist = latent_scores(self.latents)
        return {"norm": norm, "mean_dist": mean_dist, self.clustering.density_name: self.clustering.density, "loss_lambda0": self.loss_lambda0, "dice_lambda0": self.dice}

    @cached_property
    def ranking(self) -> np.ndarray:
        return rank_cases(self.columns[RANKED_BY])

    @property
    def files(self) -> dict[str, Path]:
        names = (RANKING_NAME, CLUSTERS_NAME, LATENTS_NAME, "latent_map.png", "latent_map.html", "report.html")
        return {name: self.run_dir / name for name in names}

    def style(self, cluster: int) -> str:
        return "main" if cluster == 0 else f"style {cluster}"

    def describe(self, column: str) -> str:
        return DESCRIPTIONS[column]


def rank_cases(score: np.ndarray) -> np.ndarray:
    """Case indices by score, largest first (ties keep the case order): most suspicious first."""
    return np.argsort(-np.asarray(score), kind="stable")


def analyze_run(
    run_dir: Path | str,
    clusters: int | None = None,
    method: str = "gmm",
    gallery: int = GALLERY,
    device: str = "auto",
    progress: bool = True,
    pictures: int = PICTURES,
) -> Analysis:
    """Score, cluster and rank the cases of a run folder and write every analysis file into it.

    This is the whole of `hsort analyze`, and what `fit` calls when training ends.  The `pictures`
    most suspicious cases (and at least the gallery's) get a slice picture."""
    run = load_run(run_dir, device)
    latents = run.latents()
    clustering = find_clusters(latents, clusters, method)  # before the predictions: a bad --clusters fails at once
    prepared = prepared_training_cases(run, progress)
    loss, dice = main_style_fit(run, prepared, progress)
    analysis = Analysis(
        run_dir=run.run_dir,
        data=run.data,
        case_ids=run.case_ids,
        label_files=label_files(run),
        latents=latents,
        clustering=clustering,
        loss_lambda0=loss,
        dice=dice,
        pictures=[None] * len(run.case_ids),
        gallery=gallery,
    )
    drawn = analysis.ranking[: max(pictures, gallery)]
    drawings, analysis.views = draw_cases(run, prepared, drawn, progress, viewed=set(analysis.ranking[:gallery].tolist()))
    for index, picture in zip(drawn, drawings):
        analysis.pictures[index] = picture
    write_analysis(analysis)
    return analysis


# ---------------------------------------------------------------------------------------------
# Clusters


def find_clusters(latents: np.ndarray, clusters: int | None = None, method: str = "gmm") -> Clustering:
    """Clusters of latents [N, d] by `method`, numbered so that 0 is the main style."""
    if method not in METHODS:
        raise ConfigError(f"unknown clustering method {method!r}; choose one of {', '.join(METHODS)}")
    if len(latents) < 2:
        raise ConfigError(f"the analysis compares cases with each other, so it needs 2 cases at least; this run has {len(latents)}")
    latents = np.asarray(latents, dtype=np.float64)
    distinct = len(np.unique(latents, axis=0))
    if clusters is not None and not 1 <= clusters <= distinct:
        raise ConfigError(f"--clusters {clusters}: this run's {len(latents)} latents lie at {distinct} distinct points, so choose 1 to {distinct}")
    candidates = [clusters] if clusters is not None else range(1, max(1, min(MAX_CLUSTERS, len(latents) - 1, distinct)) + 1)
    mixtures = {k: fit_mixture(latents, k) for k in candidates}
    bic = {k: float(mixture.bic(latents)) for k, mixture in mixtures.items()}
    mixture = mixtures[min(bic, key=bic.get)]
    origin = np.zeros((1, latents.shape[1]))
    if method == "gmm":
        members = mixture.predict(latents)
        main = main_component(mixture.predict_proba(origin)[0], members)
        return numbered(method, members, mixture.means_, main, "nll", held_out_nll(mixture, latents), bic)
    kmeans = KMeans(mixture.n_components, n_init=10, random_state=RANDOM_STATE).fit(latents)
    members, centroids = kmeans.labels_, kmeans.cluster_centers_
    main = main_component(-np.linalg.norm(centroids, axis=1), members)
    return numbered(method, members, centroids, main, "centroid_dist", held_out_centroid_distance(latents, members, centroids), bic)


def fit_mixture(latents: np.ndarray, components: int) -> GaussianMixture:
    floor = max(RESOLUTION**2 * float(latents.var(axis=0).mean()), 1e-12)
    return GaussianMixture(components, reg_covar=floor, n_init=3, random_state=RANDOM_STATE).fit(latents)


def held_out_nll(mixture: GaussianMixture, latents: np.ndarray) -> np.ndarray:
    """-log p(case) under the mixture whose M-step is redone without the case: its responsibilities
    leave every component's weight, mean and covariance; a component left with (almost) no case drops out."""
    responsibility = mixture.predict_proba(latents)  # [N, K]
    rest = responsibility.sum(axis=0) - responsibility  # [N, K]: each component's share of the other cases
    kept = rest > MIN_SHARE
    share = np.where(kept, rest, 1.0)[..., None]  # a dropped component's moments are never used
    offsets = latents[:, None] - mixture.means_[None]  # [N, K, d]: moments about the fitted means, for precision
    first = np.einsum("nk,nkd->kd", responsibility, offsets)
    second = np.einsum("nk,nkd,nke->kde", responsibility, offsets, offsets)
    mean = (first - responsibility[..., None] * offsets) / share
    covariance = (second - responsibility[..., None, None] * _outer(offsets)) / share[..., None] - _outer(mean) + mixture.reg_covar * np.eye(latents.shape[1])
    covariance[~kept] = np.eye(latents.shape[1])  # any valid one: its weight is 0
    residual = offsets - mean
    mahalanobis = np.einsum("nkd,nkd->nk", residual, np.linalg.solve(covariance, residual[..., None])[..., 0])
    log_density = -0.5 * (latents.shape[1] * np.log(2 * np.pi) + np.linalg.slogdet(covariance)[1] + mahalanobis)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_weight = np.where(kept, np.log(rest / (len(latents) - 1)), -np.inf)
    return -logsumexp(log_weight + log_density, axis=1)


def _outer(vectors: np.ndarray) -> np.ndarray:
    return vectors[..., :, None] * vectors[..., None, :]


def held_out_centroid_distance(latents: np.ndarray, members: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Distance to the nearest centroid once the case has left its cluster (whose centroid then moves
    away from it by the factor n / (n - 1); a cluster of one is gone)."""
    distances = np.linalg.norm(latents[:, None] - centroids[None], axis=2)  # [N, K]
    size = np.bincount(members, minlength=len(centroids))[members]
    own = distances[np.arange(len(latents)), members]
    with np.errstate(divide="ignore", invalid="ignore"):
        distances[np.arange(len(latents)), members] = np.where(size > 1, own * size / (size - 1), np.inf)
    return distances.min(axis=1)


def main_component(closeness_to_origin: np.ndarray, members: np.ndarray) -> int:
    """The component closest to λ = 0 among those that hold a case."""
    held = np.unique(members)
    return int(held[np.argmax(closeness_to_origin[held])])


def numbered(method: str, members: np.ndarray, centroids: np.ndarray, main: int, density_name: str, density: np.ndarray, bic: dict[int, float]) -> Clustering:
    """Renumber clusters: the main style 0, then the others by size, largest first; empty components go."""
    sizes = np.bincount(members, minlength=len(centroids))
    others = sorted((k for k in np.unique(members) if k != main), key=lambda k: (-sizes[k], np.linalg.norm(centroids[k])))
    order = [main, *others]
    new_number = np.empty(len(centroids), dtype=int)
    new_number[order] = np.arange(len(order))
    return Clustering(method, new_number[members], np.asarray(centroids)[order], density_name, density, bic)


# ---------------------------------------------------------------------------------------------
# Each case against the main style


def draw_cases(run: Run, prepared: dict[str, PreparedCase], indices: np.ndarray, progress: bool = False, viewed: set[int] = frozenset()) -> tuple[list[bytes], dict[int, dict]]:
    """A PNG per case (indices) of slices with the given label's and the λ = 0 prediction's contours; for the
    `viewed` cases also the volumes report.html's slice viewer scrolls through."""
    plane_names = ("axial", "coronal", "sagittal") if run.config.preprocess.reorient else ("x–y", "x–z", "y–z")
    pictures, views = [], {}
    for index in tqdm(indices, desc="pictures", unit="case", disable=not progress):
        case = prepared[run.case_ids[index]]
        image, label = scored_roi(case, run.config.preprocess)
        prediction = run.segment(image, main_style(run))
        pictures.append(case_picture(image, label, prediction, voxel_sizes(case.affine), plane_names))
        if index in viewed:
            views[int(index)] = case_view(image, label, prediction, voxel_sizes(case.affine), plane_names)
    return pictures, views


def label_files(run: Run) -> list[str]:
    """The given label of each training case (a TotalSegmentator case: its segmentations folder)."""
    cases = {case.case_id: case.label for case in read_dataset(run.data, run.config.layout, split=run.config.split).cases}
    return [str(next(iter(label.values())).parent if isinstance(label, dict) else label) for label in map(cases.get, run.case_ids)]


# ---------------------------------------------------------------------------------------------
# Files


def write_analysis(analysis: Analysis) -> None:
    files = analysis.files
    write_clusters_csv(analysis, files[CLUSTERS_NAME])
    write_ranking_csv(analysis, files[RANKING_NAME])
    add_cluster_column(analysis, files[LATENTS_NAME])
    plot_cluster_map(analysis, files["latent_map.png"])
    write_pages(analysis, files["latent_map.html"], files["report.html"])


def write_clusters_csv(analysis: Analysis, path: Path) -> None:
    """cluster, style, main, size, centroid z0.., then the mean of every per-case column."""
    clustering, columns = analysis.clustering, analysis.columns
    rows = [["cluster", "style", "main", "size", *[f"z{i}" for i in range(analysis.latents.shape[1])], *[f"{name}_mean" for name in columns]]]
    for cluster, (size, centroid) in enumerate(zip(clustering.sizes, clustering.centroids)):
        members = clustering.members == cluster
        means = [values[members].mean() for values in columns.values()]
        rows.append([cluster, analysis.style(cluster), int(cluster == 0), size, *map(_number, centroid), *map(_number, means)])
    _write_csv(path, rows)


def write_ranking_csv(analysis: Analysis, path: Path) -> None:
    """Every case, most suspicious first: its scores, its cluster and where its label lives."""
    columns = analysis.columns
    rows = [["rank", "case", "cluster", "style", *columns, "label"]]
    for rank, i in enumerate(analysis.ranking, start=1):
        cluster = int(analysis.clustering.members[i])
        rows.append([rank, analysis.case_ids[i], cluster, analysis.style(cluster), *[_number(values[i]) for values in columns.values()], analysis.label_files[i]])
    _write_csv(path, rows)


def add_cluster_column(analysis: Analysis, path: Path) -> None:
    """latents.csv with a `cluster` column (replaced if present), every other column kept."""
    if not path.is_file():
        write_latents_csv(analysis.run_dir, analysis.case_ids, analysis.latents)
    with open(path, newline="") as handle:
        header, *rows = list(csv.reader(handle))
    if "case" not in header:
        raise DataError(path, "has no 'case' column")
    case, kept = header.index("case"), [i for i, name in enumerate(header) if name != "cluster"]
    cluster_of = dict(zip(analysis.case_ids, analysis.clustering.members.tolist()))
    _write_csv(path, [[header[i] for i in kept] + ["cluster"], *[[row[i] for i in kept] + [cluster_of.get(row[case], "")] for row in rows]])


def _write_csv(path: Path, rows: list[list]) -> None:
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def _number(value: float) -> str:
    return f"{value:.6g}"


# ---------------------------------------------------------------------------------------------
# What `hsort analyze` prints


def format_summary(analysis: Analysis, cases: int = PRINTED_CASES) -> str:
    """The clusters, the most suspicious cases and the files written."""
    clustering, columns = analysis.clustering, analysis.columns
    tried = ", ".join(f"{k}: {bic:.1f}" for k, bic in clustering.bic.items())
    how = f"fixed by --clusters (BIC {tried})" if len(clustering.bic) == 1 else f"chosen by BIC ({tried})"
    lines = [f"{len(clustering.centroids)} clusters ({clustering.method}), {how}", f"  {'style':<9}{'size':>5}  {'centroid':<20}" + "".join(f"{name:>14}" for name in columns)]
    for cluster, (size, centroid) in enumerate(zip(clustering.sizes, clustering.centroids)):
        members = clustering.members == cluster
        centre = "(" + ", ".join(f"{value:.3g}" for value in centroid) + ")"
        lines.append(f"  {analysis.style(cluster):<9}{size:>5}  {centre:<20}" + "".join(f"{values[members].mean():>14.4g}" for values in columns.values()))
    lines += ["", f"most suspicious cases (by {DESCRIPTIONS[RANKED_BY]}; all {len(analysis.case_ids)} in {RANKING_NAME}):", f"  {'rank':>4}  {'case':<24}{'style':<9}" + "".join(f"{name:>14}" for name in columns)]
    for rank, i in enumerate(analysis.ranking[:cases], start=1):
        style = analysis.style(int(clustering.members[i]))
        lines.append(f"  {rank:>4}  {analysis.case_ids[i]:<24}{style:<9}" + "".join(f"{values[i]:>14.4g}" for values in columns.values()))
    lines += ["", "files:", *[f"  {path}" for path in analysis.files.values()]]
    return "\n".join(lines)
