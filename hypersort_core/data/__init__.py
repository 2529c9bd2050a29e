"""The data pipeline: dataset readers, label selection, preprocessing with a cache, the training set
and synthetic phantoms."""

from .cache import (
    PreparedCase,
    PreparedData,
    default_cache_dir,
    fill_cache,
    prepare_cases,
)
from .errors import DataError
from .labels import LabelSelection, select_labels
from .layouts import LAYOUTS, Case, Dataset, read_dataset
from .preprocess import CROPS, PreprocessConfig
from .synth import make_synthetic_dataset
from .training_set import UNREADABLE, ReadableCases, TrainingSet, collate_readable, scored_roi

__all__ = [
    "CROPS",
    "LAYOUTS",
    "Case",
    "DataError",
    "Dataset",
    "LabelSelection",
    "PreparedCase",
    "PreparedData",
    "PreprocessConfig",
    "ReadableCases",
    "UNREADABLE",
    "TrainingSet",
    "collate_readable",
    "scored_roi",
    "default_cache_dir",
    "fill_cache",
    "make_synthetic_dataset",
    "prepare_cases",
    "read_dataset",
    "select_labels",
]
