"""log.csv and progress.png: one row per finished epoch, and their curves."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from matplotlib.figure import Figure

from hypersort_core.atomic import atomic_savefig, atomic_write_text
from hypersort_core.run_folder import LOG_NAME, PROGRESS_NAME

LOG_COLUMNS = ("epoch", "steps", "loss", "cross_entropy", "dice", "latent_l1", "skipped_steps", "latent_norm", "seconds")


def write_log_csv(run_dir: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=LOG_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(Path(run_dir) / LOG_NAME, buffer.getvalue())


def plot_progress(run_dir: Path, rows: list[dict]) -> None:
    """Segmentation losses on a log scale beside the mean latent norm: the two things to watch."""
    epochs = [row["epoch"] for row in rows]
    figure = Figure(figsize=(10, 3.6))
    losses, norm = figure.subplots(1, 2)
    for key in ("loss", "cross_entropy", "dice"):
        losses.plot(epochs, [row[key] for row in rows], label=key)
    losses.set(xlabel="epoch", ylabel="loss", yscale="log", title="training loss")
    losses.legend()
    norm.plot(epochs, [row["latent_norm"] for row in rows], color="tab:purple")
    norm.set(xlabel="epoch", ylabel="mean ||λ||₂", title="latent norm")
    atomic_savefig(Path(run_dir) / PROGRESS_NAME, figure)
