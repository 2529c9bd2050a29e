"""`hsort predict`, `correct`, `export` and `import-reference`: from a run to labels, pseudo-labels and plain UNets."""

from __future__ import annotations

from pathlib import Path

import click

from hypersort_core.cli.options import device_option, reports_bad_input, triple
from hypersort_core.data import CROPS

RUN_ARGUMENT = click.argument("run_dir", metavar="RUN", type=click.Path(exists=True, file_okay=False, path_type=Path))
DEVICE_OPTION = device_option()
LATENT_OPTION = click.option("--latent", default=None, metavar="X,Y", help="A point of the latent map.")
CLUSTER_OPTION = click.option("--cluster", type=int, default=None, metavar="K", help="The centroid of cluster K (clusters.csv of hsort analyze).")
CASE_OPTION = click.option("--case", default=None, metavar="ID", help="A training case's own latent.")


@click.command()
@RUN_ARGUMENT
@click.argument("images", metavar="IMAGE...", nargs=-1, required=True)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder for the {case}.nii.gz labels.")
@LATENT_OPTION
@CLUSTER_OPTION
@CASE_OPTION
@click.option("--all-clusters", is_flag=True, help="One prediction per cluster, in OUT/cluster_K/.")
@DEVICE_OPTION
@click.option("--quiet", is_flag=True, help="No progress bar.")
@reports_bad_input
def predict(
    run_dir: Path,
    images: tuple[str, ...],
    out_dir: Path,
    latent: str | None,
    cluster: int | None,
    case: str | None,
    all_clusters: bool,
    device: str,
    quiet: bool,
) -> None:
    """Segment IMAGE... (files, folders or quoted globs) in one style (default λ = 0, the main style); labels keep each image's geometry."""
    from hypersort_core.config import ConfigError
    from hypersort_core.predict import image_paths, predict_images
    from hypersort_core.run import load_run
    from hypersort_core.styles import choose_latent, cluster_latents

    run = load_run(run_dir, device)
    paths = image_paths(images)
    if all_clusters:
        if any(value is not None for value in (latent, cluster, case)):
            raise ConfigError("--all-clusters takes no --latent, --cluster or --case")
        folders = {out_dir / named.name: named.latent for named in cluster_latents(run)}
    else:
        folders = {out_dir: choose_latent(run, latent, cluster, case).latent}
    written = predict_images(run, paths, folders, progress=not quiet)
    click.echo(f"wrote {len(written)} labels to {out_dir}")


@click.command()
@RUN_ARGUMENT
@click.option("--cluster", type=int, required=True, metavar="K", help="The style: the centroid of cluster K (clusters.csv of hsort analyze).")
@click.option("--cases", multiple=True, metavar="ID[,ID...]", help="Training cases to correct (repeatable)  [default: all]")
@click.option("--flagged", type=click.IntRange(min=1), default=None, metavar="N", help="The N most suspicious cases of ranking.csv (hsort analyze).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None, help="[default: RUN/corrected_cluster_K]")
@DEVICE_OPTION
@click.option("--quiet", is_flag=True, help="No progress bar.")
@reports_bad_input
def correct(run_dir: Path, cluster: int, cases: tuple[str, ...], flagged: int | None, out_dir: Path | None, device: str, quiet: bool) -> None:
    """Pseudo-labels of training cases in cluster K's style, in each case's geometry, and changes.csv (voxels added, removed, Dice to the given label)."""
    from hypersort_core.correct import chosen_cases, correct_labels
    from hypersort_core.run import load_run

    run = load_run(run_dir, device)
    names = [name.strip() for value in cases for name in value.split(",") if name.strip()]
    changes_csv, changes = correct_labels(run, cluster, chosen_cases(run, names, flagged), out_dir, progress=not quiet)
    click.echo(f"wrote {len(changes)} pseudo-labels to {changes_csv.parent}; what changed: {changes_csv}")


@click.command()
@RUN_ARGUMENT
@LATENT_OPTION
@CLUSTER_OPTION
@CASE_OPTION
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The weights, e.g. unet.safetensors (the description goes beside it as .json).",
)
@reports_bad_input
def export(run_dir: Path, latent: str | None, cluster: int | None, case: str | None, out: Path) -> None:
    """Write one style's UNet as plain weights (safetensors), loadable with hypersort_core.UNet.from_file."""
    from hypersort_core.config import ConfigError
    from hypersort_core.export import export_unet
    from hypersort_core.run import load_run
    from hypersort_core.styles import choose_latent

    if all(value is None for value in (latent, cluster, case)):
        raise ConfigError("choose the style to export: --latent X,Y, --cluster K or --case ID (--latent 0,0 is the main style)")
    run = load_run(run_dir, "cpu")
    description = export_unet(run, choose_latent(run, latent, cluster, case), out)
    click.echo(f"wrote {out} (load it with hypersort_core.UNet.from_file); architecture and preprocessing: {description}")


@click.command("import-reference")
@click.argument("weights", metavar="MODEL_W.PT", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("latent_dict", metavar="LATENT_DICT.PT", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("data_list", metavar="DATA_LIST", type=click.Path(exists=True, path_type=Path))
@click.option("--out", "run_dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="The run folder to create.")
@click.option("--label", default=None, help="Labels the UNet was trained on: NAME|INT[,...] (default: all foreground as one class).")
@click.option("--spacing", default=None, callback=triple(float), help="Target spacing in mm: 2 or 2,2,3  [default: the paper's 2]")
@click.option("--roi", default=None, callback=triple(int), help="ROI in voxels: 168 or 160,160,96  [default: the paper's 168]")
@click.option("--crop", type=click.Choice(CROPS), default=None, help="ROI centred on the label, the image, or random crops  [default: label]")
@click.option("--allow-missing", is_flag=True, help="Leave out data-list rows that have no latent, instead of stopping.")
@reports_bad_input
def import_reference(weights: Path, latent_dict: Path, data_list: Path, run_dir: Path, label: str | None, allow_missing: bool, **preprocess) -> None:
    """Turn a checkpoint of the paper's public code (model_w.pt, latent_dict.pt and its data list: the .txt of its data_files/, or a .tsv/.csv) into a run folder."""
    from dataclasses import replace

    from hypersort_core.config import PRESETS, ConfigError
    from hypersort_core.import_reference import import_reference as import_run

    try:
        settings = replace(PRESETS["paper"]["preprocess"], **{k: v for k, v in preprocess.items() if v is not None})
    except ValueError as error:  # the dataclass validates itself
        raise ConfigError(str(error)) from None
    imported = import_run(weights, latent_dict, data_list, run_dir, settings, label, allow_missing)
    click.echo(f"imported {len(imported.case_ids)} cases into {imported.run_dir}")
    if imported.dropped:
        click.echo(f"  left out (no latent): {', '.join(imported.dropped)}")
