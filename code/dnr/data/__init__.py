"""Datasets: every one describes its modalities, shapes and classes (see base.py).

To add a dataset, write one module in this folder: a `build(args) -> DataSplits` decorated with
`register_dataset` (with its own `add_args(group)`), or, for a dataset made by script/prepare.py, a
`PreparedDataset` passed to `clips.register_prepared`. Nothing else to edit: the first use of this
package's names (`from dnr.data import build_datasets`) imports every module here, and each one
registers itself.

That import is lazy (PEP 562) so that the preparation tool's worker processes, which import
`dnr.data.prepare` and the decoders only, never load torch: they would cost ~750 MB each.
"""
import importlib
import pkgutil

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


def register_all() -> None:
    """Import every module of this package (once; later calls cost nothing): each dataset module
    registers its loader, and a prepared dataset also its preparation sub-command."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


def __getattr__(name: str):
    if name in __all__:
        register_all()
        from . import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
