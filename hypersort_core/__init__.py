"""hypersort-core: HyperSORT for 3D medical segmentation datasets.

The Python API (api.py) is what the `hsort` commands call: `fit` a dataset, `load_run` a run folder,
ask the `Run` for its scores, clusters and segmentations in a style, `find_label_issues` in any latent
table, `check_dataset` before training.  The model parts are here too, for those who build on them.
"""

import importlib

from hypersort_core.layers import HyperHead, PerSampleConv3d, PerSampleConvTranspose3d
from hypersort_core.model import (
    HyperNetwork,
    HyperSORT,
    ModelConfig,
    parameter_count,
    unet_forward,
)
from hypersort_core.unet import UNet
from hypersort_core.version import __version__

# The API is loaded on first use: `hsort --help` and `from hypersort_core import UNet` need none of it.
_API = {name: "hypersort_core.api" for name in ("LabelIssues", "Run", "check_dataset", "find_label_issues", "fit", "load_run", "training_config")}
_API["CheckReport"] = "hypersort_core.check"


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'hypersort_core' has no attribute {name!r}")


__all__ = [
    "CheckReport",
    "HyperHead",
    "HyperNetwork",
    "HyperSORT",
    "LabelIssues",
    "ModelConfig",
    "PerSampleConv3d",
    "PerSampleConvTranspose3d",
    "Run",
    "UNet",
    "__version__",
    "check_dataset",
    "find_label_issues",
    "fit",
    "load_run",
    "parameter_count",
    "training_config",
    "unet_forward",
]
