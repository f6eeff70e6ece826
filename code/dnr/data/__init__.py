"""Datasets: every one describes its modalities, shapes and classes (see base.py).

To add a dataset, write one module with `add_args(group)` and a `build(args) -> DataSplits`
decorated with `register_dataset`, and import it below.
"""
from .base import (
    DATASETS,
    DataSplits,
    DatasetInfo,
    ModalitySpec,
    MultimodalDataset,
    build_datasets,
    check_sample,
    register_dataset,
    segment_indices,
)
from . import builtin  # noqa: F401  (registers "builtin")
from . import cremad  # noqa: F401  (registers "cremad")
from . import kinetics_sounds  # noqa: F401  (registers "kinetics_sounds")
from . import ucf101  # noqa: F401  (registers "ucf101")
from . import mosi  # noqa: F401  (registers "mosi")

__all__ = [
    "DATASETS",
    "DataSplits",
    "DatasetInfo",
    "ModalitySpec",
    "MultimodalDataset",
    "build_datasets",
    "check_sample",
    "register_dataset",
    "segment_indices",
]
