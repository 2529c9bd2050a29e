"""`hsort`: parse, call the library, print.  Bad input is one line on stderr and exit code 2."""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import replace
from pathlib import Path

import click
from hypersort_core.cli.options import comma_list, error_kinds, reports_bad_input, triple

from hypersort_core import __version__
from hypersort_core.data.label_errors import ERROR_KINDS, STYLES
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
@click.option("--kinds", default=",".join(DEFAULT_KINDS), show_default=True, callback=error_kinds,
              help=f"Error kinds, taken in turn: {','.join(ERROR_KINDS)} (or 'all').")
@click.option("--style", type=click.Choice(list(STYLES)), default=None,
              help="Protocol of a subset annotated differently: neighbour (the adjacent structure included) or coarse (blocky contours).")
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
@click.option("--preset", type=click.Choice(["paper", "small"]), default="paper", show_default=True, help="paper: the paper's UNet at 2 mm, ROI 168; small: CPU-sized.")
@click.option("--layout", type=click.Choice(["auto", "nnunet", "msd", "totalsegmentator", "folders", "manifest"]), default=None, help="Dataset layout (default: detected).")
@click.option("--label", default=None, help="Structures to learn: NAME|INT[,...] (default: all foreground as one class).")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default=None, help="TotalSegmentator: only the subjects meta.csv puts in this split (default: every subject folder).")
@click.option("--batch-size", type=int, default=None)
@click.option("--epochs", type=int, default=None)
@click.option("--max-minutes", type=float, default=None, help="Stop (with a checkpoint) after this much training time.")
@click.option("--seed", type=int, default=None)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None)
@click.option("--precision", type=click.Choice(["auto", "fp32", "tf32", "bf16"]), default=None, help="auto: bf16 autocast on CUDA, fp32 on CPU.")
@click.option("--lr", type=float, default=None, help="Hyper-network learning rate.")
@click.option("--latent-lr", type=float, default=None, help="Latent learning rate (Adam betas 0.7/0.9).")
@click.option("--l1", type=float, default=None, help="Weight of the L1 penalty on the latents.")
@click.option("--latent-dim", type=int, default=None)
@click.option("--base-channels", type=int, default=None)
@click.option("--levels", type=int, default=None, help="Downsampling stages.")
@click.option("--convs-per-level", type=int, default=None)
@click.option("--spacing", default=None, callback=triple(float), help="Target spacing in mm: 2 or 2,2,3.")
@click.option("--roi", default=None, callback=triple(int), help="ROI in voxels: 168 or 160,160,96.")
@click.option("--crop", type=click.Choice(["label", "image", "random"]), default=None, help="ROI centred on the label, the image, or random crops.")
@click.option("--augment/--no-augment", default=None, help="Random rotation, zoom and intensity jitter per draw (no flips), so that the UNet cannot learn wrong labels by heart.")
@click.option("--checkpoint-every", type=int, default=None, help="Epochs between checkpoints (one is always written at the end).")
@click.option("--workers", type=int, default=None, help="Processes that prepare the cases and load batches (per training process).")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False, path_type=Path), default=None, help="Where prepared cases are kept and reused across runs  [default: $HSORT_CACHE or ~/.cache/hypersort]")
@click.option("--nproc", type=click.IntRange(min=1), default=None, help="Train with N processes on this machine (one per GPU): starts `torchrun --standalone --nproc_per_node N` for you.")
@click.option("--skip-bad", is_flag=True, default=None, help="Leave out bad cases instead of stopping.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its checkpoint.")
@click.option("--overwrite", is_flag=True, help="Start again in an --out that already holds a run.")
@click.option("--no-analyze", is_flag=True, help="Skip `hsort analyze` at the end.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@reports_bad_input
def fit(data: Path, run_dir: Path, preset: str, resume: bool, overwrite: bool, no_analyze: bool, quiet: bool, cache_dir: Path | None, nproc: int | None, **options) -> None:
    """Train HyperSORT on DATA, write the run folder --out, then analyze it.

    Under torchrun every process runs this command; rank 0 alone checks the data, prints and analyzes.
    """
    from hypersort_core.analysis import analyze_run, format_summary
    from hypersort_core.check import check_dataset
    from hypersort_core.distributed import world_from_environment
    from hypersort_core.train import fit as fit_run

    world = world_from_environment()
    config = _resume_config(run_dir, options) if resume else _new_config(preset, options)
    config.validate()
    # A resumed run's dataset was checked when the run began (its cache is read, not the files); with --nproc
    # this process checks before it starts torchrun, so that bad input is still one line and exit code 2.
    if not resume and world.is_main and not os.environ.get(CHECKED_ENV):
        _check_first(check_dataset(data, config.layout, config.label, split=config.split), config.skip_bad)
    if nproc and nproc > 1 and world.size == 1:
        _run_under_torchrun(nproc)
    result = fit_run(data, run_dir, config, resume=resume, progress=not quiet, overwrite=overwrite, cache_dir=cache_dir)
    interrupted_exit = INTERRUPTED_EXIT if result.signal is None else 128 + result.signal  # 130 SIGINT, 143 SIGTERM
    if not world.is_main:
        sys.exit(interrupted_exit if result.stopped == "interrupted" else 0)
    if result.stopped == "interrupted":
        _print_fit_summary(result, data)
        sys.exit(interrupted_exit)
    analysis = analyze_run(run_dir, progress=not quiet) if not no_analyze and len(result.case_ids) > 1 else None
    if analysis is not None:
        click.echo(format_summary(analysis))
    _print_fit_summary(result, data, analysis)


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


ARCHITECTURE_OPTIONS = ("latent_dim", "base_channels", "levels", "convs_per_level")
PREPROCESS_OPTIONS = ("spacing", "roi", "crop")
RESUMABLE_OPTIONS = ("epochs", "max_minutes", "checkpoint_every", "device", "workers")


def _new_config(preset: str, options: dict):
    from hypersort_core.config import ConfigError, TrainConfig

    architecture = {k: options.pop(k) for k in ARCHITECTURE_OPTIONS}
    preprocess = {k: options.pop(k) for k in PREPROCESS_OPTIONS}
    config = TrainConfig.from_preset(preset, **options)
    try:
        return replace(
            config,
            model=replace(config.model, **{k: v for k, v in architecture.items() if v is not None}),
            preprocess=replace(config.preprocess, **{k: v for k, v in preprocess.items() if v is not None}),
        )
    except ValueError as error:  # the dataclasses validate themselves
        raise ConfigError(str(error)) from None


def _resume_config(run_dir: Path, options: dict):
    """A resumed run keeps its settings; only how long and where it runs may change."""
    from hypersort_core.train import read_config

    if not (run_dir / "config.json").is_file():
        raise FileNotFoundError(f"{run_dir}: no config.json, so nothing to resume")
    config, _ = read_config(run_dir)
    return config.with_overrides(**{k: options[k] for k in RESUMABLE_OPTIONS})


def _check_first(report, skip_bad: bool) -> None:
    """`hsort check` before training: warnings are listed once, errors stop the run unless --skip-bad."""
    for issue in report.warnings:
        click.echo(f"warning: {issue}", err=True)
    if not skip_bad:
        report.raise_on_errors()


def _print_fit_summary(result, data: Path, analysis=None) -> None:
    from hypersort_core.analysis import DESCRIPTIONS, RANKED_BY
    from hypersort_core.evaluate import PERTURBATIONS_NAME, format_perturbation_summary, perturbation_summary
    from hypersort_core.latents import latent_scores, read_latents_csv

    run = result.run_dir
    how = {None: "finished", "time budget": "stopped at the time budget", "interrupted": "interrupted"}[result.stopped]
    click.echo(f"{how} after {result.epochs_done} epoch{'' if result.epochs_done == 1 else 's'}; run folder: {run}")
    for name, what in [("latents.csv", "latents and scores"), ("latent_map.png", "latent map"), ("log.csv", "per-epoch log"), ("progress.png", "loss curves"), ("checkpoint.pt", "checkpoint (continue with --resume)")]:
        click.echo(f"  {run / name}  ({what})")
    click.echo(f"  prepared cases: {result.cache_dir}  (reused by later runs with the same settings)")
    for error in result.bad_cases:
        click.echo(f"  skipped bad case: {error}")
    truth = Path(data) / PERTURBATIONS_NAME
    if truth.is_file() and (run / "latents.csv").is_file():
        case_ids, latents = read_latents_csv(run / "latents.csv")
        norm, mean_dist = latent_scores(latents)
        scores = {"norm": norm, "mean_dist": mean_dist}
        if analysis is not None:  # the ranking's own score first
            scores = {RANKED_BY: analysis.columns[RANKED_BY], **scores}
        click.echo(format_perturbation_summary(perturbation_summary(case_ids, latents, scores, truth), DESCRIPTIONS))


@main.command()
@click.option("--size", type=click.IntRange(min=1), default=None, help="ROI side in voxels  [default: 168 on CUDA, 32 on CPU]")
@click.option("--batch", "batches", default=None, callback=comma_list(int), help="Batch sizes: 2,4  [default: 2,4 on CUDA, 2 on CPU]")
@click.option("--preset", type=click.Choice(["paper", "small"]), default=None, help="UNet architecture  [default: paper on CUDA, small on CPU]")
@click.option("--dtype", "dtypes", default=None, callback=comma_list(str), help="float32,bfloat16  [default: both on CUDA, float32 on CPU]")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="JSON file with every measurement  [default: bench/out/bench.json, bench/out/static.json with --static]")
@click.option("--quick", is_flag=True, help="Fewer repeats and one layer of each kind: proves the run end to end.")
@click.option("--only", "sections", default=None, callback=comma_list(str), help="Sections: layers,head,step,block  [default: all]")
@click.option("--static", "static", is_flag=True, help="No GPU needed: compile every kernel launch of one training step for --arch and bound it from its machine code.")
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


def _static_bench(out: Path, arch: str, layers: tuple[str, ...] | None, as_json: bool, *, size: int | None,
                  batches: tuple[int, ...] | None, preset: str | None, dtypes: tuple[str, ...] | None, **timing_options) -> None:
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
    from hypersort_core.cli.evaluate import evaluate
    from hypersort_core.cli.predict import correct, export, import_reference, predict

    for command in (check, analyze, predict, correct, export, import_reference, evaluate):
        main.add_command(command)


_register_commands()

if __name__ == "__main__":
    main()
