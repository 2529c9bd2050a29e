"""Score, cluster and rank the training cases of a run, most suspicious first (`hsort analyze`; report.py
writes what it finds).

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

- `misfit` (misfit.py): how badly the given label is fitted, the geometric mean of two losses
  (cross-entropy + soft Dice, training's loss without its latent term) on the case's scored ROI:
  `loss_lambda0`, under the λ = 0 UNet, which the L1 penalty leaves to the main style's cases, so
  that labels drawn too tight, too loose or cut short stand out; and `loss_own`, under the UNet of
  the case's own latent, where what the hyper-network cannot draw for any latent stays unfitted (a
  leak, a neighbouring structure, holes, a misaligned label).  Each is the running mean over the
  training epochs that `hsort fit` keeps (a run without one: its final UNet's); the columns
  `loss_lambda0` and `loss_own` are the final UNet's.
Beside them stands `dice_lambda0`, the foreground Dice between the given label and the λ = 0 UNet's
prediction (low: look here).

The ranking orders the cases by RANKED_BY, the best detector of wrong labels on the curation benchmark
(bench/curation.py; the figures are in the README): `misfit`.  The paper's scores stay beside it.

Clusters: a Gaussian mixture (full covariances, floored at RESOLUTION of the map's spread) with a
Dirichlet-process prior on its weights, fitted by variational inference with up to min(6, N-1, distinct
latents) components, which keeps as many as the latents support; `clusters` fixes the number instead (a
plain mixture by EM); k-means (the other method) takes the same number.  We chose the prior over the
lowest BIC, which chose the number before: wrong labels scattered around the main style make one broad
Gaussian cheap, and BIC paid for it with a second style that stood apart in plain sight (on the curation
benchmark's maps, bench/README.md).  The map's spread is a robust one (the median absolute deviation),
the spread of its bulk: far-out wrong labels inflate the variance, and a prior that broad drew a style
beside the main one into it.  A prior that narrow also cuts lumps off the main style's edge, so a cluster
that leaves no gap between itself and the main style, seen along the line between their centroids, goes
back into it (lumps_merged_into_main).  The cluster whose component
gives λ = 0 the highest posterior (k-means: the nearest centroid) is the main style, cluster 0; the
others follow by size, largest first, and are named "style 1", "style 2", ...

Files in the run folder (written by report.py): clusters.csv, ranking.csv, a `cluster` column added to
latents.csv, and latent_map.png, latent_map.html and report.html.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
from scipy.special import logsumexp
from scipy.stats import median_abs_deviation
from sklearn.cluster import KMeans
from sklearn.mixture import BayesianGaussianMixture, GaussianMixture

from hypersort_core.config import ConfigError
from hypersort_core.data import PreparedCase, read_dataset
from hypersort_core.latents import latent_scores
from hypersort_core.main_style import main_style_fit, run_misfit
from hypersort_core.misfit import misfit as label_misfit
from hypersort_core.run import Run
from hypersort_core.run_folder import ANALYSIS_NAMES

METHODS = ("gmm", "kmeans")
MAX_CLUSTERS = 6
RANDOM_STATE = 0  # the same latents give the same clusters on every call
# A mixture component narrower than this fraction of the map's spread (map_spread) is not
# resolved: without such a floor a component on a single case has unbounded likelihood. With 0.05, BIC
# (the rule before the prior) split 7 cases of pure noise into 3 to 5 clusters; with 0.2 it mostly kept one.
RESOLUTION = 0.2
# The prior's guess at a component's covariance: this fraction of the map's spread squared, the same along
# every axis.  sklearn's default, the map's own covariance, is long along the line between two styles, and
# drew two styles of 4 and 3 cases ten standard deviations apart into one cluster; with the spread along
# every axis they stay apart, pure noise stays one cluster at least as often as under BIC (of 30 draws, with
# the lumps merged back: 7 cases 22, 30 cases 30, 60 cases 30), and the style recovery on the curation
# benchmark's stored maps was the best of the priors and rules we tried (bench/README.md); half of it split
# noise more often.
COV_PRIOR = 1.0
# On a small map of two styles the MAD measures the larger one alone: 4 and 3 cases ten standard deviations
# apart had the 4 split in 4 draws of 30 with the MAD alone, in none with this floor (0.6 or 0.7; on the
# curation benchmark's stored maps 0.4 to 0.7 gave nearly the same style F1, bench/README.md).
SPREAD_FLOOR = 0.6
MIN_SHARE = 1e-6  # cases: a component holding less once a case has left it is gone
GALLERY = 12
RANKED_BY = "misfit"
DESCRIPTIONS = {  # column headings of the pages
    "norm": "latent norm ‖λ‖",
    "mean_dist": "mean distance",
    "nll": "held-out −log-likelihood",
    "centroid_dist": "held-out centroid distance",
    "misfit": "misfit (λ = 0 and own loss)",
    "loss_lambda0": "loss under the λ = 0 UNet",
    "loss_own": "loss under its own latent's UNet",
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
    chosen_by: str  # how the number of clusters was chosen: "prior" (the Dirichlet process) or "fixed"

    @property
    def sizes(self) -> np.ndarray:
        return np.bincount(self.members, minlength=len(self.centroids))


@dataclass
class LabelIssues:
    """Scores, clusters and ranking of a latent table: what `find_label_issues` returns, and what every
    analysis of a run holds.  Without the misfit (latents from elsewhere) the ranking is by norm."""

    case_ids: list[str]
    latents: np.ndarray  # [N, d]
    clustering: Clustering
    misfit: np.ndarray | None = None  # [N] misfit.py: the ranking's score
    loss_lambda0: np.ndarray | None = None  # [N] segmentation loss of the given label under the λ = 0 UNet
    loss_own: np.ndarray | None = None  # [N] ... under the UNet of the case's own latent
    dice: np.ndarray | None = None  # [N] given label vs λ = 0 prediction

    @cached_property
    def columns(self) -> dict[str, np.ndarray]:
        """Every per-case number, scores first: what the CSVs, the map and the report show."""
        norm, mean_dist = latent_scores(self.latents)
        columns = {"norm": norm, "mean_dist": mean_dist, self.clustering.density_name: self.clustering.density}
        for name in ("misfit", "loss_lambda0", "loss_own"):
            if getattr(self, name) is not None:
                columns[name] = getattr(self, name)
        if self.dice is not None:
            columns["dice_lambda0"] = self.dice
        return columns

    @property
    def ranked_by(self) -> str:
        return RANKED_BY if RANKED_BY in self.columns else "norm"

    @cached_property
    def ranking(self) -> np.ndarray:
        """Case indices, most suspicious first."""
        return rank_cases(self.columns[self.ranked_by])

    def style(self, cluster: int) -> str:
        return "main" if cluster == 0 else f"style {cluster}"

    def describe(self, column: str) -> str:
        return DESCRIPTIONS[column]

    def ranking_records(self) -> list[dict]:
        """Every case, most suspicious first: rank, case, cluster, style and every per-case column (ranking.csv)."""
        records = []
        for rank, i in enumerate(self.ranking, start=1):
            cluster = int(self.clustering.members[i])
            scores = {name: float(values[i]) for name, values in self.columns.items()}
            records.append({"rank": rank, "case": self.case_ids[i], "cluster": cluster, "style": self.style(cluster), **scores})
        return records

    def cluster_records(self) -> list[dict]:
        """Every cluster, the main style first: its size, centroid and the mean of every per-case column (clusters.csv)."""
        records = []
        for cluster, (size, centroid) in enumerate(zip(self.clustering.sizes, self.clustering.centroids)):
            members = self.clustering.members == cluster
            record = {"cluster": cluster, "style": self.style(cluster), "main": int(cluster == 0), "size": int(size)}
            record.update({f"z{axis}": float(value) for axis, value in enumerate(centroid)})
            record.update({f"{name}_mean": float(values[members].mean()) for name, values in self.columns.items()})
            records.append(record)
        return records


@dataclass(kw_only=True)
class Analysis(LabelIssues):
    """A run's analysis: the label issues of its latents, with the λ = 0 losses, and what the report shows."""

    run_dir: Path
    data: Path
    label_files: list[str]  # where each given label lives: the file a curator would fix
    pictures: list[bytes | None]  # [N] PNG: slices with the given label's and the λ = 0 prediction's contours (None: not drawn)
    gallery: int  # cases shown in report.html, worst first
    views: dict[int, dict] = field(default_factory=dict)  # the gallery's cases as volumes for report.html's slice viewer

    @property
    def files(self) -> dict[str, Path]:
        return {name: self.run_dir / name for name in ANALYSIS_NAMES}


def rank_cases(score: np.ndarray) -> np.ndarray:
    """Case indices by score, largest first (ties keep the case order): most suspicious first."""
    return np.argsort(-np.asarray(score), kind="stable")


def find_label_issues(
    latents: np.ndarray,
    case_ids: list[str] | None = None,
    method: str = "gmm",
    clusters: int | None = None,
    loss_lambda0: np.ndarray | None = None,
    loss_own: np.ndarray | None = None,
    misfit: np.ndarray | None = None,
) -> LabelIssues:
    """Score, cluster and rank any latent table [N, d], whatever produced it; nothing is read or written.

    case_ids default to "0", "1", ...  The losses of each label under the λ = 0 UNet and under its
    own latent's (a run's ranking.csv has them) give the misfit, unless `misfit` is given itself, and
    make the ranking the one `hsort analyze` writes; without them it is by latent norm."""
    latents = np.asarray(latents)
    if latents.ndim != 2:
        raise ConfigError(f"latents must be a table [cases, dimensions]; got an array of shape {latents.shape}")
    case_ids = [str(i) for i in range(len(latents))] if case_ids is None else list(case_ids)
    scores = {
        name: None if values is None else np.asarray(values, dtype=float)
        for name, values in (("misfit", misfit), ("loss_lambda0", loss_lambda0), ("loss_own", loss_own))
    }
    if len(case_ids) != len(latents) or any(values is not None and len(values) != len(latents) for values in scores.values()):
        raise ConfigError(f"{len(latents)} latents need as many case ids and losses (got {len(case_ids)} ids)")
    if scores["misfit"] is None and scores["loss_lambda0"] is not None and scores["loss_own"] is not None:
        scores["misfit"] = label_misfit(scores["loss_lambda0"], scores["loss_own"])
    return LabelIssues(case_ids, latents, find_clusters(latents, clusters, method), **scores)


def analyze(
    run: Run, prepared: dict[str, PreparedCase], clusters: int | None = None, method: str = "gmm", gallery: int = GALLERY, progress: bool = False
) -> Analysis:
    """Score, cluster and rank the training cases of a loaded run (no file is written: report.py does that)."""
    latents = run.latents
    clustering = find_clusters(latents, clusters, method)  # before the predictions: a bad --clusters fails at once
    fit = main_style_fit(run, prepared, progress)
    return Analysis(
        run_dir=run.run_dir,
        data=run.data,
        case_ids=run.case_ids,
        label_files=label_files(run),
        latents=latents,
        clustering=clustering,
        misfit=run_misfit(run, fit),
        loss_lambda0=fit.loss_lambda0,
        loss_own=fit.loss_own,
        dice=fit.dice,
        pictures=[None] * len(run.case_ids),
        gallery=gallery,
    )


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
    chosen_by = "prior" if clusters is None else "fixed"
    mixture = fit_mixture(latents, clusters, most=max(1, min(MAX_CLUSTERS, len(latents) - 1, distinct)))
    origin = np.zeros((1, latents.shape[1]))
    members = mixture.predict(latents)
    main = main_component(mixture.predict_proba(origin)[0], members)
    if clusters is None:
        members = lumps_merged_into_main(latents, members, main, mixture.reg_covar)
    if method == "gmm":
        return numbered(method, members, member_means(latents, members, mixture.means_), main, "nll", held_out_nll(mixture, latents), chosen_by)
    kmeans = KMeans(len(np.unique(members)), n_init=10, random_state=RANDOM_STATE).fit(latents)
    members, centroids = kmeans.labels_, kmeans.cluster_centers_
    main = main_component(-np.linalg.norm(centroids, axis=1), members)
    return numbered(method, members, centroids, main, "centroid_dist", held_out_centroid_distance(latents, members, centroids), chosen_by)


def fit_mixture(latents: np.ndarray, clusters: int | None, most: int) -> GaussianMixture | BayesianGaussianMixture:
    """`clusters` Gaussians by EM, or (None) at most `most` under the Dirichlet-process prior."""
    variance = map_spread(latents) ** 2
    floor = max(RESOLUTION**2 * variance, 1e-12)
    if clusters is not None:
        return GaussianMixture(clusters, reg_covar=floor, n_init=3, random_state=RANDOM_STATE).fit(latents)
    prior = BayesianGaussianMixture(
        n_components=most,
        weight_concentration_prior_type="dirichlet_process",
        covariance_prior=max(COV_PRIOR * variance, 1e-12) * np.eye(latents.shape[1]),
        reg_covar=floor,
        n_init=3,
        max_iter=1000,
        random_state=RANDOM_STATE,
    )
    return prior.fit(latents)


def lumps_merged_into_main(latents: np.ndarray, members: np.ndarray, main: int, floor: float) -> np.ndarray:
    """Clusters that are only a lump at the edge of the main style go back into it.  Seen along the line between
    the two centroids, a style beside the main one leaves a gap and a lump does not: a cluster stays apart only
    where two Gaussians describe that projection of its cases and the main style's better than one (BIC)."""
    members = members.copy()
    centre = latents[members == main].mean(axis=0)
    for cluster in np.unique(members[members != main]):
        pair = (members == main) | (members == cluster)
        direction = latents[members == cluster].mean(axis=0) - centre
        if not np.any(direction):  # the same place as the main style: no gap to find
            members[members == cluster] = main
            continue
        projection = (latents[pair] @ (direction / np.linalg.norm(direction)))[:, None]
        one, two = (GaussianMixture(k, reg_covar=floor, n_init=3, random_state=RANDOM_STATE).fit(projection).bic(projection) for k in (1, 2))
        if one <= two:
            members[members == cluster] = main
    return members


def map_spread(latents: np.ndarray) -> float:
    """The standard deviation of the map's bulk: the median absolute deviation along each axis (scaled to a
    Gaussian's standard deviation), their root mean square.  With wrong labels scattered far out, the
    variance measures them, not the main style; on a single Gaussian cloud the two agree.  It is kept
    above SPREAD_FLOOR of the plain standard deviation, which also covers half the latents at one point."""
    robust = float(np.sqrt(np.mean(median_abs_deviation(latents, axis=0, scale="normal") ** 2)))
    return max(robust, SPREAD_FLOOR * float(np.sqrt(latents.var(axis=0).mean())))


def member_means(latents: np.ndarray, members: np.ndarray, means: np.ndarray) -> np.ndarray:
    """Each component's centroid, the mean of its cases: the prior pulls the mixture's own means towards the
    map's mean (a style of 6 cases by a seventh of its distance), and a centroid is the latent of a style's UNet."""
    centroids = np.array(means, dtype=np.float64)
    for component in np.unique(members):
        centroids[component] = latents[members == component].mean(axis=0)
    return centroids


def held_out_nll(mixture: GaussianMixture | BayesianGaussianMixture, latents: np.ndarray) -> np.ndarray:
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


def numbered(method: str, members: np.ndarray, centroids: np.ndarray, main: int, density_name: str, density: np.ndarray, chosen_by: str) -> Clustering:
    """Renumber clusters: the main style 0, then the others by size, largest first; empty components go."""
    sizes = np.bincount(members, minlength=len(centroids))
    others = sorted((k for k in np.unique(members) if k != main), key=lambda k: (-sizes[k], np.linalg.norm(centroids[k])))
    order = [main, *others]
    new_number = np.empty(len(centroids), dtype=int)
    new_number[order] = np.arange(len(order))
    return Clustering(method, new_number[members], np.asarray(centroids)[order], density_name, density, chosen_by)


# ---------------------------------------------------------------------------------------------
# Where each case's label lives


def label_files(run: Run) -> list[str]:
    """The given label of each training case (a TotalSegmentator case: its segmentations folder)."""
    cases = {case.case_id: case.label for case in read_dataset(run.data, run.config.layout, split=run.config.split).cases}
    return [str(next(iter(label.values())).parent if isinstance(label, dict) else label) for label in map(cases.get, run.case_ids)]
