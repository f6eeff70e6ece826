"""Uni-modal baseline: one modality's encoder and a linear classifier, nothing else.

Same trainer, data, splits and evaluation as the multimodal runs, so the number is the accuracy
that modality reaches when trained alone (the reference every results table needs)."""
from __future__ import annotations

import argparse

from ..data.base import DatasetInfo
from .base import Method, register_method


@register_method
class Unimodal(Method):
    name = "unimodal"
    help = "one modality alone (--unimodal_modality NAME), cross-entropy"

    @classmethod
    def add_args(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--unimodal_modality", default=None,
                           help="the modality to train alone; required with --method unimodal")

    @classmethod
    def select_modalities(cls, args: argparse.Namespace, info: DatasetInfo):
        m = args.unimodal_modality
        if m is None:
            raise ValueError(f"--method unimodal needs --unimodal_modality, one of {info.modality_names}")
        if m not in info.modality_names:
            raise ValueError(f"--unimodal_modality {m!r} is not a modality of dataset {info.name!r}; "
                             f"choose one of {info.modality_names}")
        return [m]
