"""The Python API: the functions the `hsort` commands call, for notebooks and scripts.

    import hypersort_core as hs
    run = hs.fit("Dataset001_Liver", "runs/liver", preset="small", epochs=50)   # check, train, analyze
    run.scores()[:5]                     # the most suspicious cases, as records
    run.clusters()                       # the annotation styles found
    labels, affine = run.segment("new_ct.nii.gz", cluster=1)   # a new image, in style 1
    run.export("style1_unet.safetensors", cluster=1)            # that style's plain UNet

`find_label_issues` scores and clusters any latent table, whatever produced it, without files.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path

import nibabel as nib
import numpy as np

from hypersort_core import run as run_module
from hypersort_core.analysis import GALLERY, Analysis, LabelIssues, analyze, find_label_issues
from hypersort_core.check import CheckReport, check_dataset
from hypersort_core.config import ConfigError, TrainConfig
from hypersort_core.data import PreprocessConfig, default_cache_dir
from hypersort_core.distributed import world_from_environment
from hypersort_core.estimate import Estimate, estimate_fit
from hypersort_core.export import export_unet
from hypersort_core.main_style import prepared_training_cases
from hypersort_core.model import ModelConfig
from hypersort_core.predict import latent_probabilities, read_image, segment
from hypersort_core.report import PICTURES, analyze_loaded_run
from hypersort_core.run_folder import CLUSTERS_NAME, CONFIG_NAME, read_config
from hypersort_core.styles import NamedLatent, case_latent, cluster_latent, cluster_name
from hypersort_core.train import INTERRUPTED, FitResult
from hypersort_core.train import fit as train

RESUMABLE_SETTINGS = ("epochs", "max_minutes", "checkpoint_every", "device", "workers")

__all__ = ["CheckReport", "LabelIssues", "Run", "check_dataset", "find_label_issues", "fit", "load_run", "training_config"]


@dataclass
class Run(run_module.Run):
    """A trained run folder: its latents, its analysis and the UNet of any style.

    `fit_result` says how the training that returned this run ended (None for a run loaded from disk)."""

    fit_result: FitResult | None = None
    analysis: Analysis | None = None

    def scores(self) -> list[dict]:
        """Every case, most suspicious first: rank, case, cluster, style, each score and the label file (ranking.csv)."""
        analysis = self._analysis()
        records = analysis.ranking_records()
        for record, i in zip(records, analysis.ranking):
            record["label"] = analysis.label_files[i]
        return records

    def clusters(self) -> list[dict]:
        """The annotation styles, the main one first: size, centroid z0.. and mean scores (clusters.csv)."""
        return self._analysis().cluster_records()

    def analyze(
        self, out: Path | str | None = None, clusters: int | None = None, method: str = "gmm", pictures: int = PICTURES, progress: bool = True
    ) -> Analysis:
        """Write ranking.csv, clusters.csv, the latent map and report.html into the run folder (or `out`), as `hsort analyze` does."""
        self.analysis = analyze_loaded_run(self, clusters, method, progress=progress, pictures=pictures, out=None if out is None else Path(out))
        return self.analysis

    def style_latent(self, latent: np.ndarray | list[float] | None = None, cluster: int | None = None, case: str | None = None) -> NamedLatent:
        """The latent of a style: given coordinates, a cluster's centroid, a training case's own latent, or λ = 0."""
        given = [name for name, value in (("latent", latent), ("cluster", cluster), ("case", case)) if value is not None]
        if len(given) > 1:
            raise ConfigError(f"give only one of latent, cluster and case (got {', '.join(given)})")
        if cluster is not None:
            return cluster_latent(self, cluster) if (self.run_dir / CLUSTERS_NAME).is_file() else self._cluster_centroid(cluster)
        if case is not None:
            return NamedLatent(f"case_{case}", case_latent(self, case))
        if latent is None:
            return NamedLatent("lambda0", np.zeros(self.config.model.latent_dim, dtype=np.float32))
        values = np.asarray(latent, dtype=np.float32).reshape(-1)
        if len(values) != self.config.model.latent_dim or not np.isfinite(values).all():
            raise ConfigError(f"latent {list(values)} must be {self.config.model.latent_dim} finite numbers")
        return NamedLatent("latent_" + "_".join(f"{value:g}" for value in values), values)

    def segment(
        self,
        image: Path | str | nib.spatialimages.SpatialImage | np.ndarray,
        affine: np.ndarray | None = None,
        *,
        latent: np.ndarray | list[float] | None = None,
        cluster: int | None = None,
        case: str | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Segment one image in a style (λ = 0 unless a latent, cluster or case is given): (label map uint8, affine),
        on the image's own grid.  `image`: a NIfTI path, a nibabel image, or an array with its `affine`."""
        voxels, affine = self._image_and_affine(image, affine)
        chosen = self.style_latent(latent, cluster, case)
        return segment(voxels, affine, latent_probabilities(self, chosen.latent), self.config.preprocess), affine

    def export(self, path: Path | str, *, latent: np.ndarray | list[float] | None = None, cluster: int | None = None, case: str | None = None) -> Path:
        """Write a style's plain UNet (.safetensors, and its description .json beside it); returns the description."""
        return export_unet(self, self.style_latent(latent, cluster, case), Path(path))

    def _cluster_centroid(self, cluster: int) -> NamedLatent:
        """A cluster's centroid for a run not analyzed on disk yet: the clusters `hsort analyze` would find."""
        centroids = self._analysis().clustering.centroids
        if not 0 <= cluster < len(centroids):
            raise ConfigError(f"cluster {cluster} is not one of the run's clusters (0 to {len(centroids) - 1})")
        return NamedLatent(cluster_name(cluster), centroids[cluster].astype(np.float32))

    def _analysis(self) -> Analysis:
        if self.analysis is None:
            self.analysis = analyze(self, prepared_training_cases(self), gallery=GALLERY)
        return self.analysis

    def _image_and_affine(self, image, affine: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(image, (str, Path)):
            source = read_image(Path(image), self.config.preprocess, self.config.model.out_channels)
            return source.image, source.affine
        if isinstance(image, nib.spatialimages.SpatialImage):
            return np.asarray(image.dataobj, dtype=np.float32), image.affine
        voxels = np.asarray(image, dtype=np.float32)
        if voxels.ndim != 3:
            raise ConfigError(f"an image array must be 3-D; got shape {voxels.shape}")
        if not np.isfinite(voxels).all():
            raise ConfigError("the image array holds values that are not finite")
        return voxels, np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)


def load_run(run_dir: Path | str, device: str = "auto") -> Run:
    """Load a run folder written by `hsort fit` (or `fit` here)."""
    loaded = run_module.load_run(run_dir, device)
    return Run(**{field.name: getattr(loaded, field.name) for field in fields(run_module.Run)})


def training_config(preset: str = "paper", **settings) -> TrainConfig:
    """A preset's settings with any of them changed: TrainConfig's fields, the model's (ModelConfig: latent_dim,
    base_channels, levels, ...) and the preprocessing's (PreprocessConfig: spacing, roi, crop, ...); None keeps the preset's."""
    architecture = {k: settings.pop(k) for k in ModelConfig.__dataclass_fields__ if k in settings}
    preprocess = {k: _triple(settings.pop(k)) if k in ("spacing", "roi") else settings.pop(k) for k in PreprocessConfig.__dataclass_fields__ if k in settings}
    unknown = sorted(set(settings) - set(TrainConfig.__dataclass_fields__))
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)}")
    config = TrainConfig.from_preset(preset, **settings)
    try:
        return replace(
            config,
            model=replace(config.model, **{k: v for k, v in architecture.items() if v is not None}),
            preprocess=replace(config.preprocess, **{k: v for k, v in preprocess.items() if v is not None}),
        )
    except ValueError as error:  # the dataclasses validate themselves
        raise ConfigError(str(error)) from None


def _triple(value):
    """2 -> (2, 2, 2), as `--roi 168` and `--spacing 2` mean; a triple or None stays."""
    return (value,) * 3 if isinstance(value, (int, float)) else value


def resumed_config(run_dir: Path | str, **settings) -> TrainConfig:
    """A resumed run keeps its settings; only how long and where it runs may change."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{run_dir}: no {CONFIG_NAME}, so nothing to resume")
    changed = sorted(k for k, v in settings.items() if v is not None and k not in RESUMABLE_SETTINGS)
    if changed:
        raise ConfigError(f"a resumed run keeps its settings; only {', '.join(RESUMABLE_SETTINGS)} may change (got {', '.join(changed)})")
    config, _ = read_config(run_dir)
    return config.with_overrides(**settings)


def check_before_training(
    data: Path | str, config: TrainConfig, warn: Callable[[str], None] | None = None, cache_dir: Path | str | None = None, progress: bool = False
) -> CheckReport:
    """`hsort check` before training: each warning goes to `warn` once, and an error stops unless skip_bad.
    Each case is checked and prepared (into `cache_dir`, default_cache_dir() by default) in one read of its
    files, in config.workers processes; unchanged files are not read again."""
    report = check_dataset(
        data,
        config.layout,
        config.label,
        progress=progress,
        split=config.split,
        cache_dir=Path(cache_dir or default_cache_dir()),
        workers=config.workers,
        prepare=config.preprocess,
    )
    for issue in report.warnings:
        (warn or _python_warning)(str(issue))
    if not config.skip_bad:
        report.raise_on_errors()
    return report


def estimate_before_training(data: Path | str, config: TrainConfig, force: bool = False, say: Callable[[str], None] = print, processes: int = 1) -> Estimate:
    """Time per epoch and peak memory from one real step, said; a run that would not fit in memory stops here
    (ConfigError, saying what to change) unless force.  processes: those `hsort fit --nproc` will start."""
    found = estimate_fit(Path(data), config, processes)
    say(found.describe())
    if not force:
        found.check_fits(config)
    return found


def fit(
    data: Path | str,
    out: Path | str,
    *,
    preset: str = "paper",
    check: bool = True,
    resume: bool = False,
    overwrite: bool = False,
    analyze: bool = True,
    progress: bool = True,
    cache_dir: Path | str | None = None,
    warn: Callable[[str], None] | None = None,
    estimate: bool = True,
    force: bool = False,
    **settings,
) -> Run:
    """Check the dataset, train HyperSORT on it into the run folder `out`, and analyze the run, as `hsort fit` does.

    settings: those of `training_config` (resume: those of a resumed run).  check=False skips the dataset
    check; estimate=False the time and memory estimate (printed; a run that would not fit in memory is refused
    unless force); analyze=False the analysis.  An interrupted or stopped run is returned too: see `run.fit_result`."""
    config = resumed_config(out, **settings) if resume else training_config(preset, **settings)
    config.validate()
    if check and not resume:
        check_before_training(data, config, warn, cache_dir, progress)
    if estimate and not resume and world_from_environment().size == 1:
        estimate_before_training(data, config, force)
    result = train(
        Path(data), Path(out), config, resume=resume, progress=progress, overwrite=overwrite, cache_dir=None if cache_dir is None else Path(cache_dir)
    )
    run = replace(load_run(out, config.device), fit_result=result)
    if analyze and result.stopped != INTERRUPTED and len(result.case_ids) > 1 and world_from_environment().is_main:
        run.analyze(progress=progress)
    return run


def _python_warning(message: str) -> None:
    warnings.warn(message, stacklevel=3)
