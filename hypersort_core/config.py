"""Every setting of a HyperSORT run in one dataclass, and the presets that fill it.

`config.json` in the run folder is `TrainConfig.to_dict()` plus the package
version and the case list, so a run can be understood and resumed from disk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

from hypersort_core.data import PreprocessConfig
from hypersort_core.data.augment import Augmentation
from hypersort_core.model import ModelConfig


class ConfigError(ValueError):
    """A setting that cannot work (unknown preset, missing device, impossible ROI)."""


DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "tf32", "bf16")  # auto: bf16 autocast on CUDA, fp32 on the CPU


PRESETS: dict[str, dict] = {
    # The paper: 3 levels, 16 channels, 3 convs per level, 2 mm, ROI 168^3; Adam 1e-4 as in its Section 4.
    "paper": {
        "model": ModelConfig(),
        "preprocess": PreprocessConfig(spacing=(2.0, 2.0, 2.0), roi=(168, 168, 168)),
        "batch_size": 2,
        "epochs": 500,
        "lr": 1e-4,
        "latent_lr": 1e-3,
    },
    # CPU-sized: what a 2-core laptop trains in minutes (see docs in README: 8 channels, 2 levels, 2 convs).
    "small": {
        "model": ModelConfig(levels=2, convs_per_level=2, base_channels=8),
        "preprocess": PreprocessConfig(spacing=(2.0, 2.0, 2.0), roi=(32, 32, 32)),
        "batch_size": 4,
        "epochs": 100,
        "lr": 2e-3,
        "latent_lr": 1e-2,
        # Measured on the curation benchmark (bench/curation.py, every error kind): with 1.0 the segmentation
        # gradient on a wrong label's latent never beats the L1 subgradient and every latent collapses to 0;
        # 0.1 (the demo's first choice) still holds most latents at 0, 0.03 finds the most (README).
        "l1": 0.03,
    },
}


@dataclass
class TrainConfig:
    """What `hsort fit` does; defaults are the 'paper' preset's."""

    model: ModelConfig = field(default_factory=ModelConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    preset: str = "paper"
    layout: str = "auto"
    label: str | None = None
    batch_size: int = 2
    epochs: int = 500
    max_minutes: float | None = None
    lr: float = 1e-4
    latent_lr: float = 1e-3
    latent_betas: tuple[float, float] = (0.7, 0.9)
    l1: float = 1.0
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    checkpoint_every: int = 5
    workers: int = 0
    skip_bad: bool = False
    split: str | None = None  # TotalSegmentator: only the subjects meta.csv puts in this split
    augment: bool = False  # random rotation, zoom and intensity per draw (data/augment.py)

    @classmethod
    def from_preset(cls, preset: str, **overrides) -> TrainConfig:
        """The preset's values, then every override that is not None."""
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        given = {k: v for k, v in overrides.items() if v is not None}
        return cls(preset=preset, **{**PRESETS[preset], **given})

    def validate(self) -> None:
        """Refuse a setting that cannot train, naming the option, before any work is done."""
        model, roi = self.model, self.preprocess.roi
        smallest_roi = 2 * model.size_multiple  # the deepest level must keep 2 voxels per side for InstanceNorm
        checks = [
            (self.batch_size >= 1, "--batch-size must be 1 or more"),
            (self.epochs >= 1, "--epochs must be 1 or more"),
            (self.max_minutes is None or self.max_minutes >= 0, "--max-minutes must be 0 or more"),
            (math.isfinite(self.lr) and self.lr > 0, "--lr must be a positive number"),
            (math.isfinite(self.latent_lr) and self.latent_lr > 0, "--latent-lr must be a positive number"),
            (math.isfinite(self.l1) and self.l1 >= 0, "--l1 must be 0 or a positive number"),
            (self.checkpoint_every >= 1, "--checkpoint-every must be 1 or more"),
            (self.workers >= 0, "--workers must be 0 or more"),
            (0 <= self.seed < 2**63, "--seed must be between 0 and 2**63 - 1"),
            (self.device in DEVICES, f"--device must be one of {', '.join(DEVICES)}"),
            (self.precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}"),
            (model.latent_dim >= 1, "--latent-dim must be 1 or more"),
            (model.levels >= 1, "--levels must be 1 or more"),
            (model.base_channels >= 1, "--base-channels must be 1 or more"),
            (model.convs_per_level >= 0, "--convs-per-level must be 0 or more"),
            (
                all(side % model.size_multiple == 0 for side in roi),
                f"--roi {tuple(roi)} must be a multiple of {model.size_multiple} on each side for a UNet with {model.levels} levels",
            ),
            (
                min(roi) >= smallest_roi,
                f"--roi {tuple(roi)} is too small for {model.levels} levels: the deepest level needs 2 voxels per side, so at least {smallest_roi}",
            ),
        ]
        for ok, problem in checks:
            if not ok:
                raise ConfigError(problem)

    def augmentation(self) -> Augmentation | None:
        return Augmentation() if self.augment else None

    def with_overrides(self, **overrides) -> TrainConfig:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def to_dict(self) -> dict:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["model"] = self.model.to_dict()
        values["preprocess"] = self.preprocess.to_dict()
        values["latent_betas"] = list(self.latent_betas)
        return values

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        values = dict(values)
        values["model"] = ModelConfig.from_dict(values["model"])
        values["preprocess"] = PreprocessConfig(**_tuples(values["preprocess"]))
        values["latent_betas"] = tuple(values["latent_betas"])
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def _tuples(values: dict) -> dict:
    """JSON turns tuples into lists; the dataclasses want tuples back."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


__all__ = ["DEVICES", "PRECISIONS", "PRESETS", "ConfigError", "TrainConfig"]
