"""The curation benchmark: does a run find every kind of label error, and the second annotation style?

For each dataset size and seed, `hsort synth` writes a dataset with every error kind (label_errors.py)
and a subset annotated in another style; `hsort fit` trains on it (CPU-sized, a fixed number of epochs)
and `hsort analyze` scores it; the two plain-UNet baselines of `hsort evaluate` are trained on the same
cases with the same recipe.  Reported per error kind (its cases against the clean cases of the main
style): the AUROC of every score; overall (all wrong labels against the clean main-style cases); and
how well the style subset comes out as one cluster (the best F1 between a found cluster and the subset).
Style cases are not wrong labels, so they are in neither side of an error AUROC.

    python bench/curation.py                       # the full benchmark: 64 and 96 cases, seeds 0 and 1, 120 epochs
    python bench/curation.py --cases 48 --seeds 0  # one dataset
    python bench/curation.py --tag l1-0.05 --set l1=0.05    # a variant of the training settings
    python bench/curation.py --perturbed 0 --style coarse --no-baselines --tag coarse-alone  # the style alone

Jobs run in parallel processes (--jobs, one thread each).  Datasets are written once and reused; the
baselines are cached per dataset and training recipe, so variants of HyperSORT-only settings do not
retrain them.  Writes OUT/<tag>/results.json and prints one table (median over datasets).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import multiprocessing
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

KINDS = ("eroded", "dilated", "incomplete", "extra", "wrong_neighbour", "shift", "holes")
STYLE = "vessel"  # the vessel included; --style coarse for blocky contours, --style neighbour for a neighbour included
PERTURBED = 0.3
STYLE_FRACTION = 0.15
SIZE = 24  # voxels per side, and the ROI: what a 2-core CPU trains in minutes
BASELINE_FOLDS = 5
HYPERSORT_SCORES = ("ranked", "misfit", "loss_lambda0", "loss_own", "norm", "mean_dist", "nll")
BASELINE_SCORES = ("training_loss", "test_dice")
RECIPE_FIELDS = ("preprocess", "batch_size", "lr", "seed", "augment")  # what the baselines' training depends on


def main() -> None:
    args = parse_arguments()
    out = Path(args.out)
    settings = dict(parse_setting(text) for text in args.set)
    started = time.monotonic()
    datasets = [Dataset(cases, args.size, seed, args.style, args.perturbed, args.style_fraction) for cases in args.cases for seed in args.seeds]
    tasks = [(out, args.tag, dataset, args.epochs, settings, not args.no_baselines) for dataset in datasets]
    if args.jobs > 1:
        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            results = pool.starmap(run_job, tasks)
    else:
        results = [run_job(*task) for task in tasks]
    summary = summarize(results)
    report = {
        "tag": args.tag,
        "settings": settings,
        "epochs": args.epochs,
        "datasets": {
            "cases": args.cases,
            "seeds": args.seeds,
            "size": args.size,
            "kinds": KINDS,
            "perturbed": args.perturbed,
            "style": args.style,
            "style_fraction": args.style_fraction,
        },
        "minutes": round((time.monotonic() - started) / 60, 1),
        "summary": summary,
        "runs": results,
    }
    path = out / args.tag / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    plot_maps(report, path.with_name("maps.png"))
    print(format_table(summary, report))
    print(f"\nwrote {path} and {path.with_name('maps.png')}")


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=lambda text: [int(v) for v in text.split(",")], default=[64, 96])
    parser.add_argument("--seeds", type=lambda text: [int(v) for v in text.split(",")], default=[0, 1])
    parser.add_argument("--size", type=int, default=SIZE, help="Voxels per side of each phantom, and the ROI.")
    parser.add_argument("--epochs", type=int, default=120)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default="bench/out/curation")
    parser.add_argument("--tag", default="default")
    parser.add_argument("--set", action="append", default=[], help="A training setting NAME=VALUE (TrainConfig field), repeatable.")
    parser.add_argument("--no-baselines", action="store_true")
    parser.add_argument("--style", default=STYLE, help="The protocol of the style subset (label_errors.STYLES).")
    parser.add_argument("--perturbed", type=float, default=PERTURBED, help="The share of wrong labels; 0 shows what the style alone gives.")
    parser.add_argument("--style-fraction", type=float, default=STYLE_FRACTION, help="The share of cases annotated in the style.")
    return parser.parse_args()


def parse_setting(text: str) -> tuple[str, object]:
    name, _, value = text.partition("=")
    return name, json.loads(value) if value[:1] in "-0123456789[{tf" else value


@dataclass(frozen=True)
class Dataset:
    """One synthetic dataset of the benchmark: everything `hsort synth` writes it from."""

    cases: int
    size: int
    seed: int
    style: str = STYLE
    perturbed: float = PERTURBED
    style_fraction: float = STYLE_FRACTION

    @property
    def name(self) -> str:
        """Its folder under OUT/data, written once and reused: it names everything the dataset depends on, the
        style always, so that a dataset written under another default style is never taken for this one."""
        name = f"cases{self.cases}_size{self.size}_seed{self.seed}_{self.style}"
        name += "" if self.perturbed == PERTURBED else f"_perturbed{self.perturbed:g}"
        return name + ("" if self.style_fraction == STYLE_FRACTION else f"_fraction{self.style_fraction:g}")

    def write(self, folder: Path) -> None:
        from hypersort_core.data import make_synthetic_dataset

        make_synthetic_dataset(
            folder,
            cases=self.cases,
            size=self.size,
            perturbed=self.perturbed,
            seed=self.seed,
            kinds=KINDS,
            style=self.style,
            style_fraction=self.style_fraction,
        )


def run_job(out: Path, tag: str, dataset: Dataset, epochs: int, settings: dict, baselines: bool) -> dict:
    """One dataset: write it (once), train and analyze, score with the baselines (cached)."""
    import torch

    torch.set_num_threads(1)
    from hypersort_core.api import training_config
    from hypersort_core.report import analyze_run
    from hypersort_core.run import load_run
    from hypersort_core.train import fit

    name = dataset.name
    data = out / "data" / name
    if not (data / "perturbations.csv").is_file():
        dataset.write(data)
    config = training_config("small", epochs=epochs, **{"roi": dataset.size, **settings})
    run_dir = out / tag / name
    started = time.monotonic()
    if not finished_run(run_dir, config):
        fit(data, run_dir, config, progress=False, overwrite=True, cache_dir=out / "cache")
    train_seconds = time.monotonic() - started
    analysis = analyze_run(run_dir, progress=False, pictures=0, gallery=0)
    scores = {name: analysis.columns[name] for name in analysis.columns}
    scores["ranked"] = ranked_score(analysis)
    if baselines:
        scores |= cached_baselines(out, load_run(run_dir), name, epochs)
    truth = read_truth(data / "perturbations.csv", analysis.case_ids)
    return {
        "dataset": name,
        "cases": dataset.cases,
        "seed": dataset.seed,
        "train_minutes": round(train_seconds / 60, 2),
        "kind": truth["kind"],
        "style": truth["style"],
        "cluster": analysis.clustering.members.tolist(),
        "latents": analysis.latents.tolist(),
        "scores": {key: np.asarray(value, dtype=float).tolist() for key, value in scores.items()},
    }


def finished_run(run_dir: Path, config) -> bool:
    """A run folder of an earlier call that trained these settings to the end: reused, not retrained."""
    try:
        recorded = json.loads((run_dir / "config.json").read_text())
        with open(run_dir / "log.csv", newline="") as handle:
            last_epoch = int(list(csv.DictReader(handle))[-1]["epoch"])
    except (OSError, ValueError, IndexError, KeyError):
        return False
    settings = config.to_dict()
    return last_epoch == config.epochs and all(recorded.get(key) == value for key, value in settings.items())


def ranked_score(analysis) -> np.ndarray:
    """The score ranking.csv orders by: higher is more suspicious."""
    order = analysis.ranking
    score = np.empty(len(order))
    score[order] = np.arange(len(order), 0, -1)
    return score


def cached_baselines(out: Path, run, name: str, epochs: int) -> dict[str, np.ndarray]:
    """The plain-UNet scores of hsort evaluate, trained once per dataset and recipe."""
    from hypersort_core.evaluate import baseline_scores

    recipe = {key: value for key, value in run.config.to_dict().items() if key in RECIPE_FIELDS}
    key = hashlib.sha256(json.dumps([recipe, epochs, BASELINE_FOLDS], sort_keys=True).encode()).hexdigest()[:12]
    path = out / "baselines" / f"{name}_{key}.json"
    if not path.is_file():
        scores = baseline_scores(run, epochs, BASELINE_FOLDS)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(scores))
    scores = json.loads(path.read_text())
    return {score: np.array([values[case] for case in run.case_ids]) for score, values in scores.items()}


def read_truth(path: Path, case_ids: list[str]) -> dict[str, list[str]]:
    with open(path, newline="") as handle:
        rows = {row["case"]: row for row in csv.DictReader(handle)}
    return {"kind": [rows[case]["kind"] for case in case_ids], "style": [rows[case]["style"] for case in case_ids]}


# ---------------------------------------------------------------------------------------------
# Metrics


def auroc(positive: np.ndarray, score: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(positive, score)) if 0 < positive.sum() < len(positive) else None


def run_metrics(result: dict) -> dict:
    """Per score: AUROC per kind and overall (wrong labels vs clean main-style cases); the style F1."""
    kind, style = np.array(result["kind"]), np.array(result["style"])
    clean = (kind == "clean") & (style == "main")
    metrics = {}
    for score_name, values in result["scores"].items():
        values = np.array(values)
        row = {}
        for name in (*KINDS, "overall"):
            chosen = (kind != "clean") if name == "overall" else (kind == name)
            keep = chosen | clean
            row[name] = auroc(chosen[keep], values[keep])
        metrics[score_name] = row
    metrics["style_f1"] = best_cluster_f1(np.array(result["cluster"]), style != "main")
    if "latents" in result:
        metrics["style_f1_any_count"] = best_f1_over_cluster_counts(np.array(result["latents"]), style != "main")
    return metrics


def best_cluster_f1(members: np.ndarray, subset: np.ndarray) -> float:
    best = 0.0
    for cluster in np.unique(members):
        found = members == cluster
        hits = int((found & subset).sum())
        best = max(best, 2 * hits / (found.sum() + subset.sum()))
    return best


def best_f1_over_cluster_counts(latents: np.ndarray, subset: np.ndarray) -> float:
    """The style F1 had a plain mixture (EM, as for --clusters) been given the number of clusters that suits
    the style best, 1 to MAX_CLUSTERS: whether the map holds the style apart at all."""
    from hypersort_core.analysis import MAX_CLUSTERS, find_clusters

    counts = range(1, min(MAX_CLUSTERS, len(np.unique(latents, axis=0))) + 1)
    return max((best_cluster_f1(find_clusters(latents, count).members, subset) for count in counts), default=0.0)


def summarize(results: list[dict]) -> dict:
    """Medians over datasets of every metric, and the per-dataset metrics."""
    per_run = {result["dataset"]: run_metrics(result) for result in results}
    scores = [name for name in (*HYPERSORT_SCORES, *BASELINE_SCORES) if name in results[0]["scores"]]
    median = {}
    for score in scores:
        median[score] = {}
        for column in (*KINDS, "overall"):
            values = [metrics[score][column] for metrics in per_run.values() if metrics[score][column] is not None]
            median[score][column] = float(np.median(values)) if values else None
    style_f1 = [metrics["style_f1"] for metrics in per_run.values()]
    any_count = [metrics["style_f1_any_count"] for metrics in per_run.values() if "style_f1_any_count" in metrics]
    summary = {"median": median, "style_f1_median": float(np.median(style_f1)), "style_f1": style_f1, "per_run": per_run}
    if any_count:
        summary |= {"style_f1_any_count_median": float(np.median(any_count)), "style_f1_any_count": any_count}
    return summary


def format_table(summary: dict, report: dict) -> str:
    columns = (*KINDS, "overall")
    lines = [f"curation benchmark '{report['tag']}' ({report['minutes']} min): median AUROC over {len(summary['per_run'])} datasets"]
    if any(value is not None for row in summary["median"].values() for value in row.values()):
        lines.append(f"{'score':<16}" + "".join(f"{column[:10]:>11}" for column in columns))
        for score, row in summary["median"].items():
            lines.append(f"{score:<16}" + "".join(f"{row[c]:>11.3f}" if row[c] is not None else f"{'n/a':>11}" for c in columns))
    else:
        lines.append("no wrong labels in these datasets (--perturbed 0): the style alone")
    lines.append(f"style subset as one cluster: F1 median {summary['style_f1_median']:.2f} ({', '.join(f'{v:.2f}' for v in summary['style_f1'])})")
    if "style_f1_any_count" in summary:
        values = ", ".join(f"{v:.2f}" for v in summary["style_f1_any_count"])
        lines.append(f"  with the cluster count that suits the style best: F1 median {summary['style_f1_any_count_median']:.2f} ({values})")
    return "\n".join(lines)


def plot_maps(report: dict, path: Path) -> None:
    """Every dataset's latent map twice: coloured by the truth (error kind; the style's cases as stars) and by the
    clusters the analysis found, so that a reader sees where the style lies and whether it got a cluster."""
    from matplotlib.figure import Figure

    from hypersort_core.atomic import atomic_savefig
    from hypersort_core.report import cluster_colour

    runs = report["runs"]
    figure = Figure(figsize=(3.4 * len(runs), 6.6))
    axes = figure.subplots(2, len(runs), squeeze=False)
    kind_colours = dict(zip(("clean", *KINDS), ("lightgray", *(f"C{i}" for i in range(len(KINDS))))))
    for column, run in enumerate(runs):
        latents, kind = np.array(run["latents"])[:, :2], np.array(run["kind"])
        style, cluster = np.array(run["style"]) != "main", np.array(run["cluster"])
        metrics = report["summary"]["per_run"][run["dataset"]]
        truth, found = axes[0, column], axes[1, column]
        for name, colour in kind_colours.items():
            chosen = (kind == name) & ~style
            truth.scatter(*latents[chosen].T, s=14, color=colour, label=name.replace("_", " "))
        truth.scatter(*latents[style].T, s=60, marker="*", color="k", label="style")
        for number in np.unique(cluster):
            found.scatter(*latents[cluster == number].T, s=14, color=cluster_colour(number), label="main" if number == 0 else f"cluster {number}")
        found.scatter(*latents[style].T, s=70, marker="*", facecolors="none", edgecolors="k", linewidths=0.6)
        overall = metrics["misfit"]["overall"]
        truth.set_title(f"{run['dataset']}\n" + ("no wrong labels" if overall is None else f"misfit AUROC {overall:.3f}"), fontsize=8)
        found.set_title(f"found clusters; style F1 {metrics['style_f1']:.2f}", fontsize=8)
        for axis in (truth, found):
            axis.set_aspect("equal", adjustable="datalim")
            axis.tick_params(labelsize=6)
    axes[0, 0].legend(fontsize=6, loc="best")
    atomic_savefig(path, figure)


if __name__ == "__main__":
    sys.exit(main())
