"""How well the latent map separates known label perturbations (a dataset from `hsort synth`).

The synthetic experiment of the paper (Section 4.1): eroded and dilated labels
should sit far from 0 and on opposite sides of the clean cases.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from hypersort_core.latents import latent_scores, read_latents_csv

PERTURBATIONS_NAME = "perturbations.csv"


@dataclass
class PerturbationSummary:
    auroc_norm: float  # latent norm, perturbed vs clean
    auroc_mean_dist: float
    direction_cosine: float  # cosine between (eroded mean - clean mean) and (dilated mean - clean mean); < 0 = opposite sides
    counts: dict[str, int]


def read_perturbations(path: Path) -> dict[str, str]:
    with open(path, newline="") as handle:
        return {row["case"]: row["kind"] for row in csv.DictReader(handle)}


def perturbation_summary(latents_csv: Path, perturbations_csv: Path) -> PerturbationSummary:
    """AUROC of the paper's two scores for perturbed-vs-clean, and whether erosion and dilation split."""
    case_ids, latents = read_latents_csv(latents_csv)
    kinds = read_perturbations(perturbations_csv)
    kind = np.array([kinds.get(case, "unknown") for case in case_ids])
    norm, mean_dist = latent_scores(latents)
    perturbed = kind != "clean"
    clean_mean = latents[kind == "clean"].mean(axis=0)
    offsets = [latents[kind == k].mean(axis=0) - clean_mean for k in ("eroded", "dilated")]
    cosine = float(offsets[0] @ offsets[1] / (np.linalg.norm(offsets[0]) * np.linalg.norm(offsets[1]) + 1e-12))
    return PerturbationSummary(
        auroc_norm=float(roc_auc_score(perturbed, norm)),
        auroc_mean_dist=float(roc_auc_score(perturbed, mean_dist)),
        direction_cosine=cosine,
        counts={k: int((kind == k).sum()) for k in ("clean", "eroded", "dilated")},
    )
