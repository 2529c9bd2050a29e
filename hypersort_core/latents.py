"""latents.csv and latent_map.png: the learned map of the training set.

The two scores are the paper's (Section 4.2): `norm`, the L2 norm of a case's
latent (the main style sits at 0 because of the L1 penalty), and `mean_dist`,
its mean Euclidean distance to the other cases' latents (isolation).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from scipy.spatial.distance import cdist

from hypersort_core.atomic import atomic_savefig, atomic_write_csv
from hypersort_core.run_folder import LATENT_MAP_NAME, LATENTS_NAME

LABELLED_OUTLIERS = 5
DISTANCE_BLOCK = 512  # cases per block of the distance matrix: memory grows with N, not N²


def latent_scores(latents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(norm, mean_dist) per case for latents [N, d]; mean_dist excludes the case itself."""
    norm = np.linalg.norm(latents, axis=1)
    n = len(latents)
    blocks = [cdist(latents[start : start + DISTANCE_BLOCK], latents).sum(axis=1) for start in range(0, n, DISTANCE_BLOCK)]
    return norm, np.concatenate(blocks) / max(n - 1, 1)


def write_latents_csv(run_dir: Path, case_ids: list[str], latents: np.ndarray) -> None:
    norm, mean_dist = latent_scores(latents)
    header = ["case", *[f"z{i}" for i in range(latents.shape[1])], "norm", "mean_dist"]
    rows = [[case, *[f"{v:.9g}" for v in z], f"{n:.6g}", f"{d:.6g}"] for case, z, n, d in zip(case_ids, latents, norm, mean_dist)]  # 9 digits: float32 exactly
    atomic_write_csv(Path(run_dir) / LATENTS_NAME, [header, *rows])


def read_latents_csv(path: Path) -> tuple[list[str], np.ndarray]:
    """Case ids and latents [N, d] (float32, as trained) from a latents.csv."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    dims = sorted((k for k in rows[0] if k[0] == "z" and k[1:].isdigit()), key=lambda k: int(k[1:]))
    return [row["case"] for row in rows], np.array([[float(row[k]) for k in dims] for row in rows], dtype=np.float32)


def map_plane(latents: np.ndarray) -> np.ndarray:
    """The map's two axes: z0 and z1 (z0 and 0 for one-dimensional latents)."""
    return latents[:, :2] if latents.shape[1] >= 2 else np.column_stack([latents[:, 0], np.zeros(len(latents))])


def plot_latent_map(run_dir: Path, case_ids: list[str], latents: np.ndarray, epoch: int) -> None:
    """The first two latent axes, coloured by norm, with the most distant cases named."""
    norm = np.linalg.norm(latents, axis=1)
    xy = map_plane(latents)
    figure = Figure(figsize=(5.5, 5))
    axis = figure.subplots()
    points = axis.scatter(xy[:, 0], xy[:, 1], c=norm, cmap="viridis", s=22, edgecolors="k", linewidths=0.3)
    axis.scatter([0], [0], marker="+", color="red", s=120, label="λ = 0 (main style)")
    for i in np.argsort(-norm)[:LABELLED_OUTLIERS]:
        axis.annotate(drawable(case_ids[i]), xy[i], fontsize=7, xytext=(3, 3), textcoords="offset points", parse_math=False)
    figure.colorbar(points, ax=axis, label="||λ||₂")
    axis.margins(0.18)  # room for the case names at the edges
    axis.set(xlabel="z0", ylabel="z1", title=f"latent map, epoch {epoch}", aspect="equal")
    axis.legend(loc="best", fontsize=8)
    atomic_savefig(Path(run_dir) / LATENT_MAP_NAME, figure)


def drawable(text: str) -> str:
    """A case id as matplotlib can draw it: control characters (a tab, a newline) have no glyph, so they
    become spaces (matplotlib would warn of a missing glyph for each)."""
    return "".join(" " if not character.isprintable() else character for character in text)
