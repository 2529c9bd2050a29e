"""A finished (or interrupted) run folder, loaded back: settings, case list, latents and the model.

Everything after `hsort fit` — analysis, prediction, export, evaluation — starts here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hypersort_core.checkpoint import load_latest_checkpoint
from hypersort_core.config import TrainConfig
from hypersort_core.data import PreparedData, prepare_cases, read_dataset, select_labels
from hypersort_core.device import autocast_for, resolve_device, use_precision
from hypersort_core.misfit import LOSSES
from hypersort_core.model import HyperSORT
from hypersort_core.run_folder import CONFIG_NAME, read_config, run_cache_dir


@dataclass
class Run:
    run_dir: Path
    config: TrainConfig
    data: Path
    model: HyperSORT
    device: torch.device
    training_state: dict = field(default_factory=dict)  # the checkpoint's TrainingState, as plain data

    @property
    def case_ids(self) -> list[str]:
        return self.model.case_ids

    @property
    def latents(self) -> np.ndarray:
        """The learned latents [N, latent_dim], in case_ids order."""
        return self.model.latents.weight.detach().float().cpu().numpy()

    @property
    def running_losses(self) -> dict[str, np.ndarray]:
        """Each case's misfit.LOSSES as running means over the training epochs (NaN: none kept, as in runs of earlier versions)."""
        kept = self.training_state.get("running_losses") or {}
        return {name: np.array(kept.get(name, [np.nan] * len(self.case_ids)), dtype=float) for name in LOSSES}

    def latent_of(self, case_id: str) -> np.ndarray:
        if case_id not in self.case_ids:
            raise KeyError(f"{case_id!r} is not a training case of {self.run_dir}")
        return self.latents[self.case_ids.index(case_id)]

    def prepared(self, data: Path | None = None, progress: bool = False) -> PreparedData:
        """A dataset preprocessed exactly as the training cases were (the run's cache is reused)."""
        dataset = read_dataset(data or self.data, self.config.layout, split=self.config.split if data is None else None)
        selection = select_labels(dataset, self.config.label)
        return prepare_cases(dataset, selection, self.config.preprocess, run_cache_dir(self.run_dir), skip_bad=self.config.skip_bad, progress=progress)

    @torch.no_grad()
    def logits(self, images: torch.Tensor, latent: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Logits [B, C, *spatial] (float32) for images [B, in, *spatial], all segmented by the UNet of one latent [d] (or one per image [B, d])."""
        latent = torch.as_tensor(np.asarray(latent), dtype=torch.float32, device=self.device)
        latent = latent.expand(len(images), -1) if latent.dim() == 1 else latent
        with autocast_for(self.config.precision, self.device):
            return self.model(images.to(self.device), latent).float()

    def probabilities(self, images: torch.Tensor, latent: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Softmax [B, C, *spatial] of `logits`."""
        return self.logits(images, latent).softmax(dim=1)

    def segment_prepared(self, image: np.ndarray, latent: np.ndarray | torch.Tensor) -> np.ndarray:
        """Class map of one preprocessed image [X, Y, Z] (sides divisible by the UNet's size multiple)."""
        probabilities = self.probabilities(torch.from_numpy(np.array(image, dtype=np.float32))[None, None], latent)
        return probabilities[0].argmax(dim=0).to(torch.uint8).cpu().numpy()


def load_run(run_dir: Path | str, device: str = "auto") -> Run:
    """Load a run folder written by `hsort fit` (checkpoint read with weights_only=True)."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{run_dir}: not a run folder (no {CONFIG_NAME})")
    config, data = read_config(run_dir)
    device = resolve_device(device)
    use_precision(config.precision, device)
    payload, _ = load_latest_checkpoint(run_dir, map_location=device)
    model = HyperSORT(config.model, payload["case_ids"]).to(device)
    model.load_state_dict(payload["model"])
    model.eval()
    return Run(run_dir, config, data, model, device, payload.get("state", {}))
