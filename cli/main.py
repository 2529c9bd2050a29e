"""`hsort`: parse, call the library, print.  Bad input is one line on stderr and exit code 2."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from hypersort_core import __version__
from hypersort_core.cli.options import comma_list, device_option, error_kinds, preset_option, reports_bad_input, triple
from hypersort_core.config import PRECISIONS
from hypersort_core.data import CROPS, LAYOUTS
from hypersort_core.data.label_errors import ERROR_KINDS, STYLES
from hypersort_core.data.layouts import TOTALSEGMENTATOR_SPLITS
from hypersort_core.data.synth import DEFAULT_KINDS

INTERRUPTED_EXIT = 130
CHECKED_ENV = "HSORT_DATA_CHECKED"  # set by `hsort fit --nproc` for the processes it starts: the data was checked


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hsort")
def main() -> None:
    """HyperSORT: map a 3D segmentation dataset, find its annotation styles and wrong labels."""
    # nibabel logs the header repairs it makes; a damaged file is reported once, by our own error line.
    logging.getLogger("nibabel").setLevel(logging.ERROR)


@main.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--cases", default=60, show_default=True, type=click.IntRange(min=1), help="Number of phantoms.")
@click.option("--size", default=32, show_default=True, type=click.IntRange(min=16), help="Side of each volume in voxels (2 mm spacing).")
@click.option("--perturbed", default=0.15, show_default=True, type=click.FloatRange(0, 1), help="Fraction of labels with an error.")
@click.option(
    "--kinds", default=",".join(DEFAULT_KINDS), show_default=True, callback=error_kinds, help=f"Error kinds, taken in turn: {','.join(ERROR_KINDS)} (or 'all')."
)
@click.option(
    "--style",
    type=click.Choice(list(STYLES)),
    default=None,
    help="Protocol of a differently annotated subset: neighbour (adjacent structure included), coarse (blocky contours), vessel (its vessel included).",
)
@click.option("--style-fraction", default=0.0, show_default=True, type=click.FloatRange(0, 1), help="Fraction of cases annotated in --style.")
@click.option("--seed", default=0, show_default=True)
@reports_bad_input
def synth(out: Path, cases: int, size: int, perturbed: float, kinds: tuple[str, ...], style: str | None, style_fraction: float, seed: int) -> None:
    """Write a synthetic nnU-Net dataset of CT-like phantoms with known label errors (and optionally a second style)."""
    from hypersort_core.data import make_synthetic_dataset

    if style_fraction > 0 and style is None:
        raise click.BadParameter("--style-fraction needs a --style", param_hint="--style")
    try:
        path = make_synthetic_dataset(out, cases=cases, size=size, perturbed=perturbed, seed=seed, kinds=kinds, style=style, style_fraction=style_fraction)
    except ValueError as error:  # settings that cannot make a dataset together
        raise click.UsageError(str(error)) from None
    click.echo(f"wrote {cases} cases to {path} (ground truth of the perturbations: {path / 'perturbations.csv'})")


@main.command()
@click.argument("data", type=click.Path(exists=True, path_type=Path))
@click.option("--out", "run_dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="Run folder.")
@preset_option("paper", "paper: the paper's UNet at 2 mm, ROI 168; small: CPU-sized.")
@click.option("--layout", type=click.Choice(["auto", *LAYOUTS]), default=None, help="Dataset layout (default: detected).")
@click.option("--label", default=None, help="Structures to learn: NAME|INT[,...] (default: all foreground as one class).")
@click.option(
    "--split",
    type=click.Choice(TOTALSEGMENTATOR_SPLITS),
    default=None,
    help="TotalSegmentator: only the subjects meta.csv puts in this split (default: every subject folder).",
)
@click.option("--batch-size", type=int, default=None)
@click.option("--epochs", type=int, default=None)
@click.option("--max-minutes", type=float, default=None, help="Stop (with a checkpoint) after this much training time.")
@click.option("--seed", type=int, default=None)
@device_option(default=None)
@click.option("--precision", type=click.Choice(PRECISIONS), default=None, help="auto: bf16 autocast on CUDA, fp32 on CPU.")
@click.option("--lr", type=float, default=None, help="Hyper-network learning rate.")
@click.option("--latent-lr", type=float, default=None, help="Latent learning rate (Adam betas 0.7/0.9).")
@click.option("--l1", type=float, default=None, help="Weight of the L1 penalty on the latents.")
@click.option("--latent-dim", type=int, default=None)
@click.option("--base-channels", type=int, default=None)
@click.option("--levels", type=int, default=None, help="Downsampling stages.")
@click.option("--convs-per-level", type=int, default=None)
@click.option("--spacing", default=None, callback=triple(float), help="Target spacing in mm: 2 or 2,2,3.")
@click.option("--roi", default=None, callback=triple(int), help="ROI in voxels: 168 or 160,160,96.")
@click.option("--crop", type=click.Choice(CROPS), default=None, help="ROI centred on the label, the image, or random crops.")
@click.option(
    "--augment/--no-augment",
    default=None,
    help="Random rotation, zoom and intensity jitter per draw (no flips), so that the UNet cannot learn wrong labels by heart.",
)
@click.option("--checkpoint-every", type=int, default=None, help="Epochs between checkpoints (one is always written at the end).")
@click.option("--workers", type=int, default=None, help="Processes that prepare the cases and load batches (per training process).")
@click.option(
    "--cache",
    "cache_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where prepared cases are kept and reused across runs  [default: $HSORT_CACHE or ~/.cache/hypersort]",
)
@click.option(
    "--nproc",
    type=click.IntRange(min=1),
    default=None,
    help="Train with N processes on this machine (one per GPU): starts `torchrun --standalone --nproc_per_node N` for you.",
)
@click.option("--skip-bad", is_flag=True, default=None, help="Leave out bad cases instead of stopping.")
@click.option("--force", is_flag=True, help="Start even when the estimated peak memory exceeds the free memory.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its checkpoint.")
@click.option("--overwrite", is_flag=True, help="Start again in an --out that already holds a run.")
@click.option("--no-analyze", is_flag=True, help="Skip `hsort analyze` at the end.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@reports_bad_input
def fit(
    data: Path,
    run_dir: Path,
    preset: str,
    resume: bool,
    overwrite: bool,
    force: bool,
    no_analyze: bool,
    quiet: bool,
    cache_dir: Path | None,
    nproc: int | None,
    **options,
) -> None:
    """Train HyperSORT on DATA, write the run folder --out, then analyze it.

    Under torchrun every process runs this command; rank 0 alone checks the data, prints and analyzes.
    """
    from hypersort_core.api import RESUMABLE_SETTINGS, check_before_training, estimate_before_training, resumed_config, training_config
    from hypersort_core.api import fit as fit_run
    from hypersort_core.distributed import world_from_environment
    from hypersort_core.report import format_summary
    from hypersort_core.train import INTERRUPTED

    world = world_from_environment()
    config = resumed_config(run_dir, **{k: options[k] for k in RESUMABLE_SETTINGS}) if resume else training_config(preset, **options)
    config.validate()
    # A resumed run's dataset was checked when the run began (its cache is read, not the files); with --nproc
    # this process checks before it starts torchrun, so that bad input is still one line and exit code 2.
    if not resume and world.is_main and not os.environ.get(CHECKED_ENV):
        check_before_training(data, config, warn=lambda issue: click.echo(f"warning: {issue}", err=True), cache_dir=cache_dir, progress=not quiet)
    if not resume and world.size == 1:
        estimate_before_training(data, config, force, say=click.echo, processes=nproc or 1)
    if nproc and nproc > 1 and world.size == 1:
        _run_under_torchrun(nproc)
    settings = {k: options[k] for k in RESUMABLE_SETTINGS} if resume else options
    run = fit_run(
        data,
        run_dir,
        preset=preset,
        check=False,
        estimate=False,
        resume=resume,
        overwrite=overwrite,
        analyze=not no_analyze,
        progress=not quiet,
        cache_dir=cache_dir,
        **settings,
    )
    result = run.fit_result
    interrupted_exit = INTERRUPTED_EXIT if result.signal is None else 128 + result.signal  # 130 SIGINT, 143 SIGTERM
    if not world.is_main:
        sys.exit(interrupted_exit if result.stopped == INTERRUPTED else 0)
    if result.stopped == INTERRUPTED:
        _print_fit_summary(result, data)
        sys.exit(interrupted_exit)
    if run.analysis is not None:
        click.echo(format_summary(run.analysis))
    _print_fit_summary(result, data, run.analysis)


def _run_under_torchrun(nproc: int) -> None:
    """`hsort fit --nproc N ...` runs `torchrun --standalone --nproc_per_node N -m hypersort_core.cli fit ...` and exits with its code."""
    from hypersort_core.distributed import launch

    sys.exit(launch(nproc, ["hypersort_core.cli", *_without_option(sys.argv[1:], "--nproc")], {CHECKED_ENV: "1"}))


def _without_option(arguments: list[str], name: str) -> list[str]:
    """arguments less `name VALUE` and `name=VALUE`."""
    kept, skip = [], False
    for argument in arguments:
        if skip:
            skip = False
        elif argument == name:
            skip = True
        elif not argument.startswith(f"{name}="):
            kept.append(argument)
    return kept


def _print_fit_summary(result, data: Path, analysis=None) -> None:
    from hypersort_core.analysis import DESCRIPTIONS
    from hypersort_core.checkpoint import CHECKPOINT_NAME
    from hypersort_core.data.synth import PERTURBATIONS_NAME
    from hypersort_core.evaluate import format_perturbation_summary, perturbation_summary
    from hypersort_core.latents import latent_scores, read_latents_csv
    from hypersort_core.run_folder import LATENT_MAP_NAME, LATENTS_NAME, LOG_NAME, PROGRESS_NAME
    from hypersort_core.train import INTERRUPTED, TIME_BUDGET

    run = result.run_dir
    how = {None: "finished", TIME_BUDGET: "stopped at the time budget", INTERRUPTED: "interrupted"}[result.stopped]
    click.echo(f"{how} after {result.epochs_done} epoch{'' if result.epochs_done == 1 else 's'}; run folder: {run}")
    for name, what in [
        (LATENTS_NAME, "latents and scores"),
        (LATENT_MAP_NAME, "latent map"),
        (LOG_NAME, "per-epoch log"),
        (PROGRESS_NAME, "loss curves"),
        (CHECKPOINT_NAME, "checkpoint (continue with --resume)"),
    ]:
        click.echo(f"  {run / name}  ({what})")
    click.echo(f"  prepared cases: {result.cache_dir}  (reused by later runs with the same settings)")
    for error in result.bad_cases:
        click.echo(f"  skipped bad case: {error}")
    truth = Path(data) / PERTURBATIONS_NAME
    if truth.is_file() and (run / LATENTS_NAME).is_file():
        case_ids, latents = read_latents_csv(run / LATENTS_NAME)
        norm, mean_dist = latent_scores(latents)
        scores = {"norm": norm, "mean_dist": mean_dist}
        if analysis is not None:  # the ranking's own score first
            scores = {analysis.ranked_by: analysis.columns[analysis.ranked_by], **scores}
        click.echo(format_perturbation_summary(perturbation_summary(case_ids, latents, scores, truth), DESCRIPTIONS))


@main.command()
@click.option("--size", type=click.IntRange(min=1), default=None, help="ROI side in voxels  [default: 168 on CUDA, 32 on CPU]")
@click.option("--batch", "batches", default=None, callback=comma_list(int), help="Batch sizes: 2,4  [default: 2,4 on CUDA, 2 on CPU]")
@preset_option(None, "UNet architecture  [default: paper on CUDA, small on CPU]")
@click.option("--dtype", "dtypes", default=None, callback=comma_list(str), help="float32,bfloat16  [default: both on CUDA, float32 on CPU]")
@device_option()
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="JSON file with every measurement  [default: bench/out/bench.json, bench/out/static.json with --static]",
)
@click.option("--quick", is_flag=True, help="Fewer repeats and one layer of each kind: proves the run end to end.")
@click.option("--only", "sections", default=None, callback=comma_list(str), help="Sections: layers,head,step,block  [default: all]")
@click.option(
    "--static", "static", is_flag=True, help="No GPU needed: compile every kernel launch of one training step for --arch and bound it from its machine code."
)
@click.option("--arch", type=click.Choice(["sm_90", "sm_80"]), default="sm_90", show_default=True, help="With --static: the GPU to compile for.")
@click.option("--layers", default=None, callback=comma_list(str), help="With --static: only these UNet layers (and 'head')  [default: all]")
@click.option("--json", "as_json", is_flag=True, help="With --static: print the JSON report instead of the table.")
@reports_bad_input
def bench(out: Path | None, static: bool, arch: str, layers: tuple[str, ...] | None, as_json: bool, **options) -> None:
    """Time the per-sample convs, the head and a training step against the reference formulation."""
    if static:
        _static_bench(out or Path("bench/out/static.json"), arch, layers, as_json, **options)
        return
    from hypersort_core.benchmark import bench_settings, format_report, run_benchmark

    out = out or Path("bench/out/bench.json")
    report = run_benchmark(bench_settings(**options), out, progress=lambda line: click.echo(line, err=True))
    click.echo(format_report(report, out))


def _static_bench(
    out: Path,
    arch: str,
    layers: tuple[str, ...] | None,
    as_json: bool,
    *,
    size: int | None,
    batches: tuple[int, ...] | None,
    preset: str | None,
    dtypes: tuple[str, ...] | None,
    **timing_options,
) -> None:
    """`hsort bench --static`: the static report of one training step, as a table (or JSON) and a JSON file."""
    import json

    from hypersort_core.static_bench import format_static_report, run_static, static_settings

    settings = static_settings(arch, preset, size, batches, dtypes, layers, timing_options)
    report = run_static(settings, out, progress=lambda line: click.echo(line, err=True))
    click.echo(json.dumps(report, indent=1) if as_json else format_static_report(report, out))


def _register_commands() -> None:
    """The commands that work on a finished run live in their own modules."""
    from hypersort_core.cli.analyze import analyze
    from hypersort_core.cli.check import check
    from hypersort_core.cli.curate import curate, review
    from hypersort_core.cli.evaluate import evaluate
    from hypersort_core.cli.predict import correct, export, import_reference, predict

    for command in (check, analyze, predict, correct, export, import_reference, evaluate, review, curate):
        main.add_command(command)


_register_commands()

if __name__ == "__main__":
    main()
