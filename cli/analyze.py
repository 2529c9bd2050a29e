"""`hsort analyze RUN`: scores, clusters, ranking, the latent map and the review report of a run."""

from __future__ import annotations

from pathlib import Path

import click

from hypersort_core.analysis import GALLERY, METHODS
from hypersort_core.cli.options import device_option, reports_bad_input
from hypersort_core.report import PICTURES


@click.command()
@click.argument("run_dir", metavar="RUN", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--clusters", type=click.IntRange(min=1), default=None, help="Number of clusters  [default: chosen by a Dirichlet-process mixture, up to 6]")
@click.option("--method", type=click.Choice(METHODS), default=METHODS[0], show_default=True, help="Gaussian mixture or k-means.")
@click.option("--gallery", type=click.IntRange(min=0), default=GALLERY, show_default=True, help="Most suspicious cases shown in report.html.")
@click.option(
    "--pictures", type=click.IntRange(min=0), default=PICTURES, show_default=True, help="Most suspicious cases drawn as slice pictures (0.2 s each on a CPU)."
)
@device_option(help="Where the λ = 0 UNet segments the cases.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@reports_bad_input
def analyze(run_dir: Path, clusters: int | None, method: str, gallery: int, pictures: int, device: str, quiet: bool) -> None:
    """Score, cluster and rank the training cases of RUN, most suspicious first, and write
    ranking.csv, clusters.csv, latent_map.png, latent_map.html and report.html into it."""
    from hypersort_core.report import analyze_run, format_summary

    click.echo(format_summary(analyze_run(run_dir, clusters, method, gallery, device, progress=not quiet, pictures=pictures)))
