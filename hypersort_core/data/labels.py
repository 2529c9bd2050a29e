"""Which labels of a dataset the network learns, and how they become consecutive classes."""

from dataclasses import dataclass

import numpy as np

from .errors import DataError
from .layouts import Dataset

MAX_CLASSES = 255  # prepared label maps are stored as uint8


@dataclass
class LabelSelection:
    """Label value values[k] becomes class k+1 and every other value class 0.

    An empty `values` list is the binary selection: every nonzero value is one foreground class.
    For TotalSegmentator the values number the structures (1..K in sorted order of their names).
    """

    names: list[str]
    values: list[int]

    @property
    def is_binary(self) -> bool:
        return not self.values

    @property
    def num_classes(self) -> int:
        """Classes including background: one per selected label, or two for the binary selection."""
        return len(self.names) + 1

    def classes_of(self, label_map: np.ndarray) -> np.ndarray:
        """The class map (uint8) of a label map holding the dataset's label values."""
        if self.is_binary:
            return (label_map != 0).view(np.uint8)  # 0 and 1 as they are: no copy
        classes = np.zeros(label_map.shape, dtype=np.uint8)
        for number, value in enumerate(self.values, start=1):
            classes[label_map == value] = number
        return classes


def select_labels(dataset: Dataset, spec: str | None) -> LabelSelection:
    """Parse a comma-separated list of label names or values ("liver,spleen", "1,2"); None = binary."""
    if spec is None:
        return LabelSelection(["foreground"], [])
    tokens = [token.strip() for token in spec.split(",")]
    if not all(tokens):
        raise DataError(dataset.labels_file, f"label list {spec!r} has an empty entry")
    names, values = [], []
    for token in tokens:
        name, value = resolve_label(dataset, token)
        if value in values:
            raise DataError(dataset.labels_file, f"label {name!r} is selected twice in {spec!r}")
        names.append(name)
        values.append(value)
    if len(values) > MAX_CLASSES:
        raise DataError(dataset.labels_file, f"{len(values)} labels selected; at most {MAX_CLASSES} are supported")
    return LabelSelection(names, values)


def resolve_label(dataset: Dataset, token: str) -> tuple[str, int]:
    """A label name or value -> (name, value); a dataset that declares no names accepts any value > 0."""
    if token in dataset.label_names:
        return token, dataset.label_names[token]
    if token.isdigit():
        value = int(token)
        names_by_value = {value: name for name, value in dataset.label_names.items()}
        if value in names_by_value:
            return names_by_value[value], value
        if value > 0 and not dataset.label_names:
            return token, value
    raise DataError(dataset.labels_file, f"unknown label {token!r}; known labels: {describe_labels(dataset)}")


def describe_labels(dataset: Dataset) -> str:
    if not dataset.label_names:
        return "none declared, select label values by number (e.g. 1)"
    by_value = sorted(dataset.label_names.items(), key=lambda item: item[1])
    return ", ".join(f"{name} ({value})" for name, value in by_value)
