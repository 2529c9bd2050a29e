"""`hsort evaluate`: the paper's Section 4.2 experiment on a run, with the two plain-UNet baselines."""

from __future__ import annotations

from pathlib import Path

import click

from hypersort_core.cli.options import device_option, reports_bad_input


@click.command()
@click.argument("run_dir", metavar="RUN", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--reference-labels",
    "reference",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="Corrected labels: a folder of {case}.nii.gz files, or a dataset folder in any layout  [default: the dataset's perturbations.csv]",
)
@click.option(
    "--test",
    "test",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="A test dataset (any layout): Dice of each cluster's UNet, best-of-K and the spread across clusters.",
)
@click.option("--min-change", type=click.IntRange(min=0), default=0, show_default=True, help="AUROC target: labels changed by more than this many voxels.")
@click.option("--folds", type=click.IntRange(min=2), default=5, show_default=True, help="Folds of the Test-Dice baseline.")
@click.option("--baseline-epochs", type=click.IntRange(min=1), default=None, help="Epochs of each baseline UNet  [default: as many as the run trained]")
@click.option("--skip-baselines", is_flag=True, help="Score HyperSORT only (the baselines train 1 + FOLDS plain UNets).")
@device_option()
@click.option("--quiet", is_flag=True, help="No progress bars.")
@reports_bad_input
def evaluate(
    run_dir: Path,
    reference: Path | None,
    test: Path | None,
    min_change: int,
    folds: int,
    baseline_epochs: int | None,
    skip_baselines: bool,
    device: str,
    quiet: bool,
) -> None:
    """Spearman and AUROC of HyperSORT's scores and of two plain-UNet baselines against the voxels each label changed; writes RUN/evaluation.json."""
    from hypersort_core.evaluate import evaluate_run, format_evaluation
    from hypersort_core.run import load_run
    from hypersort_core.run_folder import EVALUATION_NAME

    evaluation = evaluate_run(
        load_run(run_dir, device),
        reference,
        test,
        min_change=min_change,
        folds=folds,
        baseline_epochs=baseline_epochs,
        baselines=not skip_baselines,
        progress=not quiet,
    )
    click.echo(format_evaluation(evaluation))
    click.echo(f"every per-case value: {run_dir / EVALUATION_NAME}")
