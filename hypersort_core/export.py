"""`hsort export`: one style of a run as an ordinary UNet, usable without the hyper-network.

The hyper-network's output at the chosen latent is theta, the flat vector of all UNet weights; cut
into the plain UNet's state_dict tensors it is a normal set of weights. They are saved with
safetensors (no code can hide in the file); the file's metadata holds the architecture that
`UNet.from_file` rebuilds, and the preprocessing and latent it came from. The same description is
written beside it as JSON, for people and for tools that do not read safetensors metadata.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from hypersort_core.atomic import atomic_open, atomic_write_text
from hypersort_core.config import ConfigError
from hypersort_core.model import ModelConfig, unpack_theta
from hypersort_core.run import Run
from hypersort_core.styles import NamedLatent
from hypersort_core.unet import ARCHITECTURE_KEY

UNET_ARGUMENTS = ("in_channels", "out_channels", "levels", "convs_per_level", "base_channels")


def unet_architecture(config: ModelConfig) -> dict[str, int]:
    """The arguments `UNet(...)` is rebuilt from."""
    return {name: getattr(config, name) for name in UNET_ARGUMENTS}


@torch.no_grad()
def unet_state_dict(run: Run, latent) -> dict[str, torch.Tensor]:
    """The plain UNet's state_dict whose function is the hyper-network's UNet at this latent."""
    latent = torch.as_tensor(latent, dtype=torch.float32, device=run.device)[None]
    theta = run.model.theta(latent).float().cpu()
    return {name: tensor[0].clone() for name, tensor in unpack_theta(theta, run.config.model).items()}


def export_unet(run: Run, chosen: NamedLatent, out: Path) -> Path:
    """Write the UNet of `chosen` to `out` (.safetensors) and its description beside it; returns the description's path."""
    from safetensors.torch import save  # imported here: only export needs it

    out = Path(out)
    if out.suffix == ".json":
        raise ConfigError(f"{out}: the weights need a name other than .json (the description is written to {out.stem}.json beside them)")
    description = {
        ARCHITECTURE_KEY: unet_architecture(run.config.model),
        "preprocess": run.config.preprocess.to_dict(),
        "style": chosen.name,
        "latent": [float(value) for value in chosen.latent],
        "run": str(run.run_dir),
    }
    metadata = {key: json.dumps(value) for key, value in description.items()}
    with atomic_open(out, "wb") as handle:
        handle.write(save(unet_state_dict(run, chosen.latent), metadata))
    description_file = out.with_suffix(".json")
    atomic_write_text(description_file, json.dumps(description, indent=2) + "\n")
    return description_file
