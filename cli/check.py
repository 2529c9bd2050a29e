"""`hsort check DATA`: what is wrong with a dataset, case by case, before training on it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from hypersort_core.cli.options import reports_bad_input
from hypersort_core.data import LAYOUTS
from hypersort_core.data.layouts import TOTALSEGMENTATOR_SPLITS


@click.command()
@click.argument("data", type=click.Path(exists=True, path_type=Path))
@click.option("--label", default=None, help="Structures to check: NAME|INT[,...] (default: all foreground as one class).")
@click.option("--layout", type=click.Choice(["auto", *LAYOUTS]), default="auto", show_default=True, help="Dataset layout.")
@click.option("--split", type=click.Choice(TOTALSEGMENTATOR_SPLITS), default=None, help="TotalSegmentator: only the subjects meta.csv puts in this split.")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True, help="Processes that read the cases (0: this one).")
@click.option(
    "--cache",
    "cache_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where each case's findings are kept, so that unchanged files are not read again  [default: $HSORT_CACHE or ~/.cache/hypersort]",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (cases, errors, warnings, summary) instead of the table.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@reports_bad_input
def check(data: Path, label: str | None, layout: str, split: str | None, workers: int, cache_dir: Path | None, as_json: bool, quiet: bool) -> None:
    """Verify DATA: files, dataset.json, label values, NaNs, grids, empty labels, orientation,
    duplicates, spacing and size outliers, labels outside the body.  Exit code 0 clean,
    1 warnings only, 2 errors."""
    from hypersort_core.check import check_dataset, format_report
    from hypersort_core.data import default_cache_dir

    report = check_dataset(
        data, layout=layout, label=label, progress=not quiet and not as_json, split=split, cache_dir=cache_dir or default_cache_dir(), workers=workers
    )
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else format_report(report))
    sys.exit(report.exit_code)
