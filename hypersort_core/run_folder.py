"""The run folder on disk: the names of its files and its config.json, shared by every command that
writes or reads one (`fit` writes it, `analyze`, `predict`, `export`, `evaluate` and the API read it)."""

from __future__ import annotations

import json
from pathlib import Path

from hypersort_core.atomic import atomic_write_text
from hypersort_core.config import TrainConfig
from hypersort_core.data import default_cache_dir
from hypersort_core.version import __version__

CONFIG_NAME = "config.json"
LATENTS_NAME = "latents.csv"
RANKING_NAME = "ranking.csv"
CLUSTERS_NAME = "clusters.csv"
EVALUATION_NAME = "evaluation.json"
LATENT_MAP_NAME = "latent_map.png"
LATENT_MAP_PAGE_NAME = "latent_map.html"
REPORT_NAME = "report.html"
LOG_NAME = "log.csv"
PROGRESS_NAME = "progress.png"
# What `hsort analyze` writes, in the order it reports them.
ANALYSIS_NAMES = (RANKING_NAME, CLUSTERS_NAME, LATENTS_NAME, LATENT_MAP_NAME, LATENT_MAP_PAGE_NAME, REPORT_NAME)


def write_config(run_dir: Path, config: TrainConfig, data: Path, case_ids: list[str], cache: Path | None = None) -> None:
    # Absolute, so that later commands find the dataset (and its prepared cases) from any working directory.
    cache = Path(cache or default_cache_dir()).resolve()
    payload = {"version": __version__, "data": str(Path(data).resolve()), "cache": str(cache), **config.to_dict(), "cases": case_ids}
    atomic_write_text(Path(run_dir) / CONFIG_NAME, json.dumps(payload, indent=2) + "\n")


def read_config(run_dir: Path) -> tuple[TrainConfig, Path]:
    """The settings and dataset path a run folder was made with."""
    payload = json.loads((Path(run_dir) / CONFIG_NAME).read_text())
    return TrainConfig.from_dict(payload), Path(payload["data"])


def run_cache_dir(run_dir: Path) -> Path:
    """The cache a run's cases were prepared in (the default cache for runs that did not record one)."""
    return Path(json.loads((Path(run_dir) / CONFIG_NAME).read_text()).get("cache") or default_cache_dir())


def is_run_folder(path: Path) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()
