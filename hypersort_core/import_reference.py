"""`hsort import-reference`: a checkpoint of the paper's public code as a run folder.

The public code (ImFusionGmbH/HyperSORT) saves `model_w.pt`, its HyperModel's state_dict (an MLP
`hypernetwork.{i}.0`, one Linear head per UNet tensor `heads.{name with ; for .}`, and a placeholder
`model.dummy_param`), and `latent_dict.pt`, {row of its data list: latent [1, d]}; the data list is
its data_files/*.txt as it is (a `DataPath<TAB>LabelPath` header, then one row per case, paths relative to
the checkout's root: `read_manifest` finds that folder) or one of our .tsv/.csv manifests. The UNet's
architecture is read off the heads' sizes and must be exactly the one `parameter_layout` describes.
The heads are stacked into our single head (`reference_to_single_head`, the same function), the
latents are keyed by the data list's case ids, and the run folder gets what `hsort fit` writes:
config.json, checkpoint.pt (epoch 0: `fit --resume` would train on from the imported weights) and
latents.csv. Both files are read with `torch.load(weights_only=True)`, so they cannot run code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from hypersort_core.atomic import atomic_write_csv
from hypersort_core.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    TrainingState,
    load_weights_only,
    save_checkpoint,
)
from hypersort_core.config import ConfigError, TrainConfig
from hypersort_core.data import Case, DataError, PreprocessConfig, select_labels
from hypersort_core.data.layouts import read_manifest
from hypersort_core.latents import write_latents_csv
from hypersort_core.model import HyperSORT, ModelConfig
from hypersort_core.reference import (
    ReferenceHyperNetwork,
    head_key,
    reference_to_single_head,
)
from hypersort_core.run_folder import write_config
from hypersort_core.train import build_optimizers

PLACEHOLDER_KEY = "model.dummy_param"
MLP_WEIGHT = re.compile(r"hypernetwork\.(\d+)\.0\.weight")
DATA_LIST_NAME = "data_list.tsv"  # the imported rows only, written when --allow-missing dropped some
SHOWN_PROBLEMS = 3


@dataclass
class ImportedRun:
    run_dir: Path
    case_ids: list[str]
    dropped: list[str]  # cases of the data list without a latent (with allow_missing)


def load_reference_file(path: Path) -> object:
    """torch.load without executing code; a damaged or foreign file is a one-line CheckpointError."""
    try:
        return load_weights_only(path)
    except FileNotFoundError:
        raise
    except Exception as error:  # torch raises many types for a truncated or foreign file
        raise CheckpointError(f"{path}: not a PyTorch file that loads with weights_only=True ({type(error).__name__})") from error


def read_reference_weights(path: Path) -> dict[str, torch.Tensor]:
    """The HyperModel state_dict of model_w.pt, without its placeholder tensor."""
    state = load_reference_file(path)
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise CheckpointError(f"{path}: expected a state_dict (tensor names -> tensors) of the public HyperSORT code")
    return {key: value.float() for key, value in state.items() if key != PLACEHOLDER_KEY}


def reference_architecture(state: dict[str, torch.Tensor], path: Path) -> ModelConfig:
    """The model whose reference hyper-network has exactly these tensors, read off the MLP's and heads' sizes."""
    mlp = sorted((int(match.group(1)), state[key]) for key in state if (match := MLP_WEIGHT.fullmatch(key)))
    if not mlp:
        raise CheckpointError(f"{path}: no hypernetwork.0.0.weight; not a checkpoint of the public HyperSORT code")

    def head_size(tensor_name: str) -> int:
        key = f"heads.{head_key(tensor_name)}.bias"
        if key not in state:
            raise CheckpointError(f"{path}: no head {key}; not a checkpoint of the public HyperSORT code")
        return state[key].shape[0]

    base_channels = head_size("conv_init.bias")
    config = ModelConfig(
        in_channels=head_size("conv_init.weight") // (base_channels * 27),
        out_channels=head_size("conv_final.bias"),
        levels=sum(1 for key in state if re.fullmatch(r"heads\.down_\d+;weight\.weight", key)),
        convs_per_level=sum(1 for key in state if re.fullmatch(r"heads\.conv_0_\d+;weight\.weight", key)),
        base_channels=base_channels,
        latent_dim=mlp[0][1].shape[1],
        hidden=tuple(weight.shape[0] for _, weight in mlp),
    )
    check_tensor_shapes(state, config, path)
    return config


def check_tensor_shapes(state: dict[str, torch.Tensor], config: ModelConfig, path: Path) -> None:
    """Every tensor the architecture needs, in its shape, and no other."""
    with torch.device("meta"):
        expected = {key: tuple(value.shape) for key, value in ReferenceHyperNetwork(config).state_dict().items()}
    found = {key: tuple(value.shape) for key, value in state.items()}
    problems = [f"{key} is missing" for key in expected if key not in found]
    problems += [f"{key} is unexpected" for key in found if key not in expected]
    problems += [f"{key} has shape {list(found[key])}, expected {list(shape)}" for key, shape in expected.items() if key in found and found[key] != shape]
    if problems:
        shown = "; ".join(problems[:SHOWN_PROBLEMS]) + (f"; and {len(problems) - SHOWN_PROBLEMS} more" if len(problems) > SHOWN_PROBLEMS else "")
        raise CheckpointError(f"{path}: does not match the UNet its heads describe ({architecture_text(config)}): {shown}")


def architecture_text(config: ModelConfig) -> str:
    return (
        f"{config.levels} levels, {config.convs_per_level} convs per level, {config.base_channels} base channels, "
        f"{config.in_channels} -> {config.out_channels} channels, latent {config.latent_dim}, hidden {list(config.hidden)}"
    )


def read_latent_dict(path: Path, rows: int, latent_dim: int) -> dict[int, torch.Tensor]:
    """{row index: latent [latent_dim]} from latent_dict.pt; keys must be rows of the data list."""
    content = load_reference_file(path)
    if not isinstance(content, dict):
        raise CheckpointError(f"{path}: expected a dict of data-list row -> latent tensor, found {type(content).__name__}")
    latents = {}
    for key, value in content.items():
        index = int(key) if isinstance(key, int) or (isinstance(key, torch.Tensor) and key.numel() == 1) else None
        if index is None or not 0 <= index < rows:
            raise CheckpointError(f"{path}: key {key!r} is not a row of the data list (0 to {rows - 1})")
        if not isinstance(value, torch.Tensor) or value.numel() != latent_dim:
            shape = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise CheckpointError(f"{path}: the latent of row {index} is {shape}, expected [1, {latent_dim}]")
        latents[index] = value.detach().float().reshape(latent_dim)
    return latents


def hypersort_from_reference(reference: ReferenceHyperNetwork, case_ids: list[str], latents: torch.Tensor) -> HyperSORT:
    """Our model computing the reference's function: stacked heads, and the latents in case_ids order."""
    model = HyperSORT(reference.config, case_ids)
    mlp_state, weight, bias = reference_to_single_head(reference)
    with torch.no_grad():
        model.hypernet.mlp.load_state_dict(mlp_state)
        model.hypernet.head.weight.copy_(weight)
        model.hypernet.head.bias.copy_(bias)
        model.latents.weight.copy_(latents)
    return model


def write_data_list(path: Path, cases: list[Case]) -> Path:
    """A data list of just these cases, with absolute paths and their ids (the manifest layout's case column)."""
    rows = [[case.image.absolute(), case.label.absolute(), case.case_id] for case in cases]
    atomic_write_csv(path, [["DataPath", "LabelPath", "case"], *rows], delimiter="\t", lineterminator="\n")
    return path


def import_config(model: ModelConfig, preprocess: PreprocessConfig | None, label: str | None) -> TrainConfig:
    """The paper preset's settings (its preprocessing unless another is given) around the imported model."""
    config = TrainConfig.from_preset("paper", layout="manifest", label=label)
    config = replace(config, model=model, preprocess=preprocess or config.preprocess)
    roi, multiple = config.preprocess.roi, model.size_multiple
    if any(side % multiple for side in roi):
        raise ConfigError(f"ROI {tuple(roi)} must be a multiple of {multiple} on each side for a UNet with {model.levels} levels")
    return config


def import_reference(
    weights: Path,
    latent_dict: Path,
    data_list: Path,
    out: Path,
    preprocess: PreprocessConfig | None = None,
    label: str | None = None,
    allow_missing: bool = False,
) -> ImportedRun:
    """Turn the public code's model_w.pt and latent_dict.pt, trained on data_list, into the run folder `out`."""
    run_dir = Path(out)
    if (run_dir / CHECKPOINT_NAME).exists():
        raise ConfigError(f"{run_dir} already holds a run; choose a new --out")
    state = read_reference_weights(Path(weights))
    model_config = reference_architecture(state, Path(weights))
    dataset = read_manifest(Path(data_list).absolute())  # the manifest reader itself keeps the rows' order
    classes = select_labels(dataset, label).num_classes
    if classes != model_config.out_channels:
        raise ConfigError(
            f"{weights}: the UNet has {model_config.out_channels} output channels, but the labels chosen ({label or 'all foreground as one'}) make {classes} classes; choose them with --label"
        )
    config = import_config(model_config, preprocess, label)
    latents = read_latent_dict(Path(latent_dict), len(dataset.cases), model_config.latent_dim)
    dropped = [f"{case.case_id} (row {row})" for row, case in enumerate(dataset.cases) if row not in latents]
    if dropped and not allow_missing:
        raise CheckpointError(f"{latent_dict}: no latent for {len(dropped)} rows of {dataset.root}: {', '.join(dropped)}; --allow-missing leaves them out")
    kept = sorted((case.case_id, row, case) for row, case in enumerate(dataset.cases) if row in latents)
    if not kept:
        raise DataError(dataset.root, f"none of its rows has a latent in {latent_dict}")
    case_ids = [case_id for case_id, _, _ in kept]
    data = write_data_list(run_dir / DATA_LIST_NAME, [case for _, _, case in kept]) if dropped else dataset.root

    reference = ReferenceHyperNetwork(model_config)
    reference.load_state_dict(state)
    model = hypersort_from_reference(reference, case_ids, torch.stack([latents[row] for _, row, _ in kept]))
    write_config(run_dir, config, data, case_ids)
    save_checkpoint(run_dir, model, build_optimizers(model, config, torch.device("cpu")), TrainingState())
    write_latents_csv(run_dir, case_ids, model.latents.weight.detach().numpy())
    return ImportedRun(run_dir, case_ids, dropped)
