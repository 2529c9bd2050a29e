"""`hsort review` and `hsort curate`: a curator's decisions about the ranked cases, and the dataset they make."""

from __future__ import annotations

from pathlib import Path

import click

from hypersort_core.cli.options import reports_bad_input
from hypersort_core.cli.predict import DEVICE_OPTION, RUN_ARGUMENT


@click.command()
@RUN_ARGUMENT
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="The new nnU-Net raw dataset (dataset.json, imagesTr, labelsTr).")
@click.option(
    "--review",
    "review_csv",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The decisions  [default: RUN/review.csv, written by hsort review]",
)
@click.option("--copy", is_flag=True, help="Copy the images instead of linking them (labels are always copied).")
@click.option("--overwrite", is_flag=True, help="Replace an --out that an earlier hsort curate wrote.")
@DEVICE_OPTION
@click.option("--quiet", is_flag=True, help="No progress bar.")
@reports_bad_input
def curate(run_dir: Path, out: Path, review_csv: Path | None, copy: bool, overwrite: bool, device: str, quiet: bool) -> None:
    """Write a new nnU-Net dataset from RUN's dataset with the review's decisions applied: labels kept, replaced by
    a style's prediction, or cases left out; curation.csv says what was done to each case. The source is only read."""
    from hypersort_core.curate import CURATION_NAME, curate_dataset
    from hypersort_core.run import load_run

    curation = curate_dataset(load_run(run_dir, device), out, review_csv, copy=copy, overwrite=overwrite, progress=not quiet)
    replaced = sum(case.label_source == "prediction" for case in curation.cases)
    left_out = len(curation.cases) - curation.kept
    click.echo(
        f"wrote {curation.kept} cases to {curation.out} ({replaced} labels replaced by a prediction, {left_out} cases left out); "
        f"what was done to each: {curation.out / CURATION_NAME}"
    )


@click.command()
@RUN_ARGUMENT
@click.option("--port", type=click.IntRange(0, 65535), default=0, show_default=True, help="Port on 127.0.0.1 (0: any free one).")
@click.option("--no-browser", is_flag=True, help="Print the address instead of opening it.")
@click.option("--reviewer", default=None, help="Name recorded with each decision  [default: your user name]")
@DEVICE_OPTION
@reports_bad_input
def review(run_dir: Path, port: int, no_browser: bool, reviewer: str | None, device: str) -> None:
    """Open a local page (127.0.0.1 only) to go through RUN's cases worst first and record a decision for each in
    RUN/review.csv: wrong (use a style's prediction, or exclude), hard but correct, or fine. Ctrl-C stops it."""
    import getpass
    import webbrowser

    from hypersort_core.faults import Terminated
    from hypersort_core.review import ReviewSession, page_url, serve
    from hypersort_core.run import load_run

    session = ReviewSession(load_run(run_dir, device), reviewer if reviewer is not None else getpass.getuser())
    server = serve(session, port)
    url = page_url(server, session)
    click.echo(f"reviewing {run_dir} at {url}\ndecisions go to {session.review_file}; Ctrl-C stops the server")
    if not no_browser:
        webbrowser.open(url)
    try:
        server.serve_forever()
    except KeyboardInterrupt as stop:
        if isinstance(stop, Terminated):  # SIGTERM keeps its exit code (143)
            raise
        click.echo(f"stopped; apply the decisions with: hsort curate {run_dir} --out NEW_DATASET")
    finally:
        server.server_close()
