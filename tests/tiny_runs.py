"""A CPU-second-sized training configuration, for tests that need a real run folder."""

from dataclasses import replace

from hypersort_core.config import TrainConfig


def tiny_config(**overrides) -> TrainConfig:
    """The small preset shrunk to 4 channels, 1 conv per level, ROI 16³, batch 3, 2 epochs."""
    config = TrainConfig.from_preset("small", **{"batch_size": 3, "epochs": 2, "checkpoint_every": 1, **overrides})
    return replace(
        config,
        model=replace(config.model, base_channels=4, convs_per_level=1),
        preprocess=replace(config.preprocess, roi=(16, 16, 16)),
    )
