"""Which latent a trained run segments with: the style a user asks for.

The main style is λ = 0 (the L1 penalty pulls the majority of cases there), so it is the default.
A cluster's style is the centroid of that cluster's latents in `clusters.csv` (written by
`hsort analyze`); a case's style is that case's own latent; any point of the map can be given
as coordinates.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hypersort_core.analysis import find_clusters
from hypersort_core.config import ConfigError
from hypersort_core.data import DataError
from hypersort_core.run import Run
from hypersort_core.run_folder import CLUSTERS_NAME


@dataclass
class Style:
    """One annotation style: a cluster of latents, and the latent whose UNet draws that style."""

    cluster: int
    size: int
    latent: np.ndarray


@dataclass(frozen=True)
class NamedLatent:
    """A latent and the name its outputs are filed under (e.g. cluster_2)."""

    name: str
    latent: np.ndarray


def choose_latent(run: Run, latent: str | None = None, cluster: int | None = None, case: str | None = None) -> NamedLatent:
    """The latent of `--latent x,y`, `--cluster K` or `--case ID`; λ = 0 when none is given."""
    given = [option for option, value in (("--latent", latent), ("--cluster", cluster), ("--case", case)) if value is not None]
    if len(given) > 1:
        raise ConfigError(f"give only one of --latent, --cluster and --case (got {', '.join(given)})")
    if latent is not None:
        return NamedLatent(f"latent_{latent.replace(',', '_')}", parse_latent(latent, run.config.model.latent_dim))
    if cluster is not None:
        return cluster_latent(run, cluster)
    if case is not None:
        return NamedLatent(f"case_{case}", case_latent(run, case))
    return NamedLatent("lambda0", np.zeros(run.config.model.latent_dim, dtype=np.float32))


def parse_latent(text: str, latent_dim: int) -> np.ndarray:
    """'0.5,-1.2' -> a latent of the run's dimension."""
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"--latent {text!r} is not a comma-separated list of numbers") from None
    if len(values) != latent_dim:
        raise ConfigError(f"--latent {text!r} has {len(values)} values; this run's latents have {latent_dim}")
    if not np.all(np.isfinite(values)):
        raise ConfigError(f"--latent {text!r} holds a value that is not finite")
    return np.array(values, dtype=np.float32)


def case_latent(run: Run, case: str) -> np.ndarray:
    if case not in run.case_ids:
        raise ConfigError(f"--case {case!r} is not a training case of {run.run_dir}")
    return run.latent_of(case)


def cluster_latents(run: Run) -> list[NamedLatent]:
    """One latent per cluster of the run's clusters.csv: the cluster's centroid."""
    path = run.run_dir / CLUSTERS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run hsort analyze first")
    clusters = read_clusters_csv(path)
    latent_dim = run.config.model.latent_dim
    for cluster in clusters:
        if len(cluster.latent) != latent_dim:
            raise ConfigError(f"{path}: cluster {cluster.cluster} has a {len(cluster.latent)}-D centroid; this run's latents have {latent_dim}")
    return [NamedLatent(cluster_name(cluster.cluster), cluster.latent.astype(np.float32)) for cluster in clusters]


def cluster_latent(run: Run, cluster: int) -> NamedLatent:
    latents = {named.name: named for named in cluster_latents(run)}
    if cluster_name(cluster) not in latents:
        known = ", ".join(name.removeprefix("cluster_") for name in latents)
        raise ConfigError(f"--cluster {cluster} is not one of the run's clusters ({known}); see {run.run_dir / CLUSTERS_NAME}")
    return latents[cluster_name(cluster)]


def cluster_name(cluster: int) -> str:
    """The name of a cluster's outputs, e.g. the folder cluster_2/ of `hsort predict --all-clusters`."""
    return f"cluster_{cluster}"


def read_clusters_csv(path: Path) -> list[Style]:
    """The clusters `hsort analyze` found: columns cluster, size and the centroid z0..z{d-1}."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"cluster", "size", "z0"} <= set(rows[0]):
        raise DataError(path, "needs a row per cluster with columns cluster, size and z0..z{d-1}")
    dims = sorted((key for key in rows[0] if key[:1] == "z" and key[1:].isdigit()), key=lambda key: int(key[1:]))
    return [Style(int(row["cluster"]), int(row["size"]), np.array([float(row[key]) for key in dims])) for row in rows]


def fit_styles(latents: np.ndarray) -> list[Style]:
    """The clusters `hsort analyze` would find (its mixture); the centroids are the styles."""
    clustering = find_clusters(latents)
    return [Style(k, int(size), centroid) for k, (size, centroid) in enumerate(zip(clustering.sizes, clustering.centroids))]


def run_styles(run: Run) -> list[Style]:
    """The run's clusters.csv when `hsort analyze` wrote one, else a mixture fitted here."""
    clusters = run.run_dir / CLUSTERS_NAME
    if not clusters.is_file():
        return fit_styles(run.latents)
    styles = read_clusters_csv(clusters)
    if any(len(style.latent) != run.config.model.latent_dim for style in styles):
        raise DataError(clusters, f"holds centroids of another dimension than this run's {run.config.model.latent_dim}-D latents")
    return styles
