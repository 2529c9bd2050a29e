"""hypersort-core: HyperSORT for 3D medical segmentation datasets."""
from importlib.metadata import PackageNotFoundError, version

from hypersort_core.layers import HyperHead, PerSampleConv3d, PerSampleConvTranspose3d
from hypersort_core.model import (
    HyperNetwork,
    HyperSORT,
    ModelConfig,
    parameter_count,
    unet_forward,
)
from hypersort_core.unet import UNet

try:
    __version__ = version("hypersort-core")
except PackageNotFoundError:
    __version__ = "0.0.0+unknown"

__all__ = [
    "HyperHead",
    "HyperNetwork",
    "HyperSORT",
    "ModelConfig",
    "PerSampleConv3d",
    "PerSampleConvTranspose3d",
    "UNet",
    "parameter_count",
    "unet_forward",
    "__version__",
]
