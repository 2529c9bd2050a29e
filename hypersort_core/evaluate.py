"""How well the latent map finds wrong labels: the paper's experiments on known label changes.

`hsort fit` prints `perturbation_summary` for a dataset from `hsort synth` (Section 4.1: eroded and
dilated labels should sit far from 0 and on opposite sides of the clean cases).

`hsort evaluate` runs Section 4.2 on any dataset with a second, corrected label set. The ground
truth is how many voxels of each training label the reference label changes, or for a dataset from
`hsort synth` the `voxels_changed` of its perturbations.csv. Voxels are counted on each label
file's own grid (original space): that is where a corrected label is drawn and where `hsort synth`
counts. Each score, HyperSORT's and the two baselines' (baselines.py), is judged by its Spearman
correlation with that count and by its AUROC for "changed by more than min_change voxels".
With a test set, each style's UNet (the hyper-network at its cluster's centroid) segments every
test case on its prepared ROI; the best-of-K Dice and the spread across styles show what the styles
are worth on unseen data.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from hypersort_core.atomic import atomic_write_text
from hypersort_core.baselines import held_out_dice_scores, training_loss_scores
from hypersort_core.data import (
    Case,
    DataError,
    LabelSelection,
    read_dataset,
    scored_roi,
    select_labels,
)
from hypersort_core.data.layouts import nifti_files_by_case
from hypersort_core.data.synth import MAIN_STYLE, PERTURBATIONS_NAME
from hypersort_core.data.volumes import read_case
from hypersort_core.latents import latent_scores
from hypersort_core.main_style import main_style_fit, prepared_training_cases, run_misfit
from hypersort_core.metrics import foreground_dice
from hypersort_core.run import Run
from hypersort_core.run_folder import EVALUATION_NAME, LOG_NAME
from hypersort_core.styles import Style, run_styles

SCORE_LABELS = {
    "misfit": "HyperSORT misfit",
    "loss_lambda0": "HyperSORT loss at λ = 0",
    "loss_own": "HyperSORT loss at its own λ",
    "latent_norm": "HyperSORT latent norm",
    "mean_distance": "HyperSORT mean distance",
    "training_loss": "plain-UNet training loss",
    "test_dice": "Test-Dice",
}


@dataclass
class PerturbationSummary:
    """How well scores separate a synthetic dataset's wrong labels from its clean cases of the main style
    (cases of another style are neither)."""

    auroc: dict[str, float]  # score name -> AUROC, all wrong labels vs clean
    auroc_by_kind: dict[str, dict[str, float]]  # score name -> error kind -> AUROC, that kind vs clean
    direction_cosine: float | None  # cosine between (eroded mean - clean mean) and (dilated mean - clean mean); < 0 = opposite sides
    counts: dict[str, int]  # cases per kind, and per other style


def read_perturbation_rows(path: Path, columns: tuple[str, ...] = ("case", "kind")) -> list[dict[str, str]]:
    """The rows of a perturbations.csv, after checking it holds the columns asked for."""
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    missing = [column for column in columns if column not in (reader.fieldnames or [])]
    if missing:
        raise DataError(path, f"lacks the column(s) {', '.join(missing)} (hsort synth writes case,kind,style,severity,parameters,voxels_changed)")
    return rows


def perturbation_summary(case_ids: list[str], latents: np.ndarray, scores: dict[str, np.ndarray], perturbations_csv: Path) -> PerturbationSummary:
    """AUROC of each score (higher = more suspicious) for wrong-vs-clean, overall and per error kind, and
    whether erosion and dilation move the latents to opposite sides (the paper's Section 4.1)."""
    rows = {row["case"]: row for row in read_perturbation_rows(perturbations_csv)}
    kind = np.array([rows[case]["kind"] if case in rows else "unknown" for case in case_ids])
    style = np.array([rows.get(case, {}).get("style") or MAIN_STYLE for case in case_ids])
    clean = (kind == "clean") & (style == MAIN_STYLE)
    wrong = ~np.isin(kind, ["clean", "unknown"])
    kinds = sorted(set(kind[wrong]))
    counts = {"clean": int(clean.sum()), **{k: int((kind == k).sum()) for k in kinds}}
    counts |= {f"style {name}": int((style == name).sum()) for name in sorted(set(style) - {MAIN_STYLE})}
    return PerturbationSummary(
        auroc={name: _auroc(wrong, clean, score) for name, score in scores.items()},
        auroc_by_kind={name: {k: _auroc(kind == k, clean, score) for k in kinds} for name, score in scores.items()},
        direction_cosine=_opposite_sides(latents, kind, clean),
        counts=counts,
    )


def _auroc(positive: np.ndarray, negative: np.ndarray, score: np.ndarray) -> float:
    """AUROC of `score` for the positive cases against the negative ones (NaN when either is missing)."""
    keep = positive | negative
    if not positive.any() or not negative.any():
        return float("nan")
    return float(roc_auc_score(positive[keep], np.asarray(score)[keep]))


def _opposite_sides(latents: np.ndarray, kind: np.ndarray, clean: np.ndarray) -> float | None:
    if not clean.any() or not all((kind == k).any() for k in ("eroded", "dilated")):
        return None
    clean_mean = latents[clean].mean(axis=0)
    eroded, dilated = (latents[kind == k].mean(axis=0) - clean_mean for k in ("eroded", "dilated"))
    return float(eroded @ dilated / (np.linalg.norm(eroded) * np.linalg.norm(dilated) + 1e-12))


def format_perturbation_summary(summary: PerturbationSummary, descriptions: dict[str, str]) -> str:
    """Two lines for `hsort fit` on a dataset from `hsort synth`: AUROC per score, and per kind for the first score."""
    counts = ", ".join(f"{name} {count}" for name, count in summary.counts.items())
    aurocs = ", ".join(f"{descriptions[name]} {value:.3f}" for name, value in summary.auroc.items())
    lines = [f"known label errors ({counts}): AUROC of {aurocs}"]
    first = next(iter(summary.auroc_by_kind))
    if len(summary.auroc_by_kind[first]) > 1:
        lines.append(f"  by kind, {descriptions[first]}: " + ", ".join(f"{k} {v:.3f}" for k, v in summary.auroc_by_kind[first].items()))
    if summary.direction_cosine is not None:
        lines.append(f"  eroded vs dilated direction cosine {summary.direction_cosine:+.2f} (negative = opposite sides)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The ground truth: voxels changed per training case


def perturbation_changes(path: Path) -> dict[str, int]:
    """voxels_changed per case from a perturbations.csv."""
    changes = {}
    for row in read_perturbation_rows(path, ("case", "voxels_changed")):
        try:
            changes[row["case"]] = int(row["voxels_changed"])
        except ValueError:
            raise DataError(path, f"voxels_changed {row['voxels_changed']!r} of case {row['case']!r} is not a whole number") from None
    return changes


def reference_labels(reference: Path) -> dict[str, Path | dict[str, Path]]:
    """Case id -> reference label: the folder's own {case}.nii.gz files (a labelsTr-like folder),
    or else the labels of the dataset it holds, in any layout."""
    if reference.is_dir():
        files = nifti_files_by_case(reference)
        if files:
            return files
    try:
        return {case.case_id: case.label for case in read_dataset(reference).cases}
    except DataError as error:
        raise DataError(reference, f"holds no {{case}}.nii.gz label files and is no dataset ({error.problem})") from None


def changed_voxels(case: Case, reference_label: Path | dict[str, Path], selection: LabelSelection, declared_values: set[int] | None) -> int:
    """Voxels whose class differs between a case's training label and its reference label.

    Both labels are read and checked as training reads a case, so the reference must lie on the
    training image's grid and hold the same label values.
    """
    given = read_case(case, selection, declared_values).label
    corrected = read_case(replace(case, label=reference_label), selection, declared_values).label
    return int(np.count_nonzero(given != corrected))


def reference_label_changes(run: Run, reference: Path) -> dict[str, int]:
    """Voxels changed per training case that has a reference label."""
    dataset = read_dataset(run.data, run.config.layout, split=run.config.split)
    selection = select_labels(dataset, run.config.label)
    corrected = reference_labels(Path(reference))
    training = set(run.case_ids)
    return {
        case.case_id: changed_voxels(case, corrected[case.case_id], selection, dataset.declared_values)
        for case in dataset.cases
        if case.case_id in training and case.case_id in corrected
    }


def reference_changes(run: Run, reference: Path | None) -> tuple[dict[str, int], str]:
    """Voxels changed per training case, and their source: the reference labels, else the dataset's perturbations.csv."""
    if reference is not None:
        source, changes = Path(reference), reference_label_changes(run, reference)
    else:
        source = Path(run.data) / PERTURBATIONS_NAME
        if not source.is_file():
            raise DataError(run.data, f"has no {PERTURBATIONS_NAME}, so reference labels are needed (--reference-labels DIR)")
        changes = perturbation_changes(source)
    if not set(changes) & set(run.case_ids):
        raise DataError(source, f"covers none of the run's {len(run.case_ids)} training cases (such as {run.case_ids[0]!r})")
    return changes, str(source)


# ---------------------------------------------------------------------------------------------
# Scores and how well each one finds the changed labels


def hypersort_scores(run: Run) -> dict[str, dict[str, float]]:
    """The score `hsort analyze` ranks by, the misfit (misfit.py), the final UNet's losses under λ = 0 and
    the case's own latent (main_style.py), and the paper's two latent scores (latents.py), per case."""
    norm, mean_distance = latent_scores(run.latents)
    fit = main_style_fit(run, prepared_training_cases(run))
    return {
        "misfit": dict(zip(run.case_ids, map(float, run_misfit(run, fit)))),
        "loss_lambda0": dict(zip(run.case_ids, map(float, fit.loss_lambda0))),
        "loss_own": dict(zip(run.case_ids, map(float, fit.loss_own))),
        "latent_norm": dict(zip(run.case_ids, map(float, norm))),
        "mean_distance": dict(zip(run.case_ids, map(float, mean_distance))),
    }


def trained_epochs(run: Run) -> int:
    """How long the run trained: the last epoch of its log.csv (a time budget may stop it early), else its setting."""
    log = run.run_dir / LOG_NAME
    if log.is_file():
        with open(log, newline="") as handle:
            rows = list(csv.DictReader(handle))
        if rows:
            return int(rows[-1]["epoch"])
    return run.config.epochs


def baseline_scores(run: Run, epochs: int, folds: int, progress: bool = False) -> dict[str, dict[str, float]]:
    """Both baselines per training case, trained on the run's prepared training cases."""
    prepared = run.prepared()
    training = set(run.case_ids)
    prepared = replace(prepared, cases=[case for case in prepared.cases if case.case_id in training])
    case_ids = [case.case_id for case in prepared.cases]
    losses = training_loss_scores(prepared, run.config, epochs, run.device, progress)
    held_out = held_out_dice_scores(prepared, run.config, epochs, folds, run.device, progress)
    return {
        "training_loss": dict(zip(case_ids, map(float, losses))),
        "test_dice": dict(zip(case_ids, map(float, held_out))),
    }


def score_metrics(score: np.ndarray, change: np.ndarray, min_change: int) -> dict[str, float | None]:
    """Spearman's rho (and its p-value) of a score with the voxels changed, and the AUROC for
    'changed by more than min_change'; None where undefined (a constant, or only one kind of case)."""
    changed = change > min_change
    metrics: dict[str, float | None] = {"spearman": None, "spearman_p": None, "auroc": None}
    if np.ptp(score) > 0 and np.ptp(change) > 0:
        rho, p_value = spearmanr(score, change)
        metrics.update(spearman=float(rho), spearman_p=float(p_value))
    if 0 < changed.sum() < len(changed):
        metrics["auroc"] = float(roc_auc_score(changed, score))
    return metrics


# ---------------------------------------------------------------------------------------------
# The styles' UNets on a test set


def style_dice_on_test_set(run: Run, test: Path, styles: list[Style]) -> dict:
    """Dice of each style's UNet on each test case (prepared as in training), best-of-K and the spread across styles."""
    prepared = run.prepared(test)
    case_ids, rows = [], []
    for case in prepared.cases:
        image, label = scored_roi(case, run.config.preprocess)
        case_ids.append(case.case_id)
        rows.append([foreground_dice(run.segment_prepared(image, style.latent), label, run.config.model.out_channels) for style in styles])
    dice = np.array(rows)  # [test cases, styles]
    return {
        "data": str(test),
        "clusters": [
            {
                "cluster": style.cluster,
                "size": style.size,
                "latent": style.latent.tolist(),
                "dice_mean": float(dice[:, k].mean()),
                "dice_std": float(dice[:, k].std()),
            }
            for k, style in enumerate(styles)
        ],
        "cases": [{"case": case_id, "dice": row.tolist(), "best_of_k": float(row.max()), "std": float(row.std())} for case_id, row in zip(case_ids, dice)],
        "best_of_k_mean": float(dice.max(axis=1).mean()),
        "best_of_k_std": float(dice.max(axis=1).std()),
        "mean_case_std": float(dice.std(axis=1).mean()),
        "skipped_bad_cases": [str(error) for error in prepared.bad],
    }


# ---------------------------------------------------------------------------------------------
# The whole experiment


def evaluate_run(
    run: Run,
    reference: Path | None = None,
    test: Path | None = None,
    min_change: int = 0,
    folds: int = 5,
    baseline_epochs: int | None = None,
    baselines: bool = True,
    progress: bool = False,
) -> dict:
    """Score every training case, judge each score against the voxels changed, optionally segment a
    test set with each style, and write it all to evaluation.json in the run folder (returned too)."""
    changes, source = reference_changes(run, reference)
    scores = hypersort_scores(run)
    epochs = baseline_epochs or trained_epochs(run)
    if baselines:
        scores |= baseline_scores(run, epochs, folds, progress)
    cases = [case for case in run.case_ids if case in changes]
    change = np.array([changes[case] for case in cases])
    evaluation = {
        "run": str(run.run_dir),
        "reference": source,
        "voxels_counted_on": "each label file's own grid (original space)",
        "min_change": min_change,
        "baselines": {"epochs": epochs, "folds": folds} if baselines else None,
        "metrics": {name: score_metrics(np.array([score[case] for case in cases]), change, min_change) for name, score in scores.items()},
        "cases": [
            {"case": case, "voxels_changed": changes[case], "changed": changes[case] > min_change, **{name: score[case] for name, score in scores.items()}}
            for case in cases
        ],
        "cases_without_reference": [case for case in run.case_ids if case not in changes],
        "test": style_dice_on_test_set(run, Path(test), run_styles(run)) if test is not None else None,
    }
    atomic_write_text(run.run_dir / EVALUATION_NAME, json.dumps(evaluation, indent=2) + "\n")
    return evaluation


def format_evaluation(evaluation: dict) -> str:
    """The scores side by side (Spearman, AUROC), then the test-set Dice of the styles."""
    lines = [f"{'score':<28}{'Spearman':>10}{'AUROC':>8}"]
    for name, label in SCORE_LABELS.items():
        metrics = evaluation["metrics"].get(name)
        if metrics is None:
            lines.append(f"{label:<28}{'(skipped)':>10}")
        else:
            lines.append(f"{label:<28}{_number(metrics['spearman']):>10}{_number(metrics['auroc']):>8}")
    cases = evaluation["cases"]
    changed = sum(case["changed"] for case in cases)
    lines.append(f"{len(cases)} cases, {changed} changed by more than {evaluation['min_change']} voxels; reference: {evaluation['reference']}")
    if evaluation["cases_without_reference"]:
        lines.append(f"left out, no reference label: {', '.join(evaluation['cases_without_reference'])}")
    test = evaluation["test"]
    if test is not None:
        lines += [
            "",
            f"test set {test['data']} ({len(test['cases'])} cases): Dice of each style's UNet",
            f"{'cluster':<9}{'size':>6}  {'Dice mean (std)':<18}latent",
        ]
        for cluster in test["clusters"]:
            latent = ", ".join(f"{value:.3g}" for value in cluster["latent"])
            dice = f"{cluster['dice_mean']:.3f} ({cluster['dice_std']:.3f})"
            lines.append(f"{cluster['cluster']:<9}{cluster['size']:>6}  {dice:<18}({latent})")
        lines.append(f"best-of-K Dice {test['best_of_k_mean']:.3f} ({test['best_of_k_std']:.3f}); mean per-case std across styles {test['mean_case_std']:.3f}")
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
