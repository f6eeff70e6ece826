"""A training method is a small object with hooks the one epoch loop calls (engine.py):

    on_epoch_start(epoch, ctx)               once per epoch, before training
    forward(model, inputs, labels) -> ModelOutput  (e.g. drop a modality's features)
    loss(out, labels, epoch)   -> (loss, {name: float})
    backward(loss, out, labels, model)       (e.g. per-modality gradients, then combine)
    before_step(model, out, labels, epoch) -> {name: float}   (e.g. rescale encoder gradients)
    on_epoch_end(epoch, ctx)   -> {name: value}  after the epoch's evaluation (e.g. D&R)
    state_dict() / load_state_dict(state)    whatever must survive a resume
    select_modalities(args, info) (class method)  which modalities the model sees

The baseline is this class unchanged: plain cross-entropy on the fused logits.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Optional, Tuple

import torch.nn.functional as F
from torch import Tensor, nn

from ..data.base import DatasetInfo
from ..models.classifier import ModelOutput


@dataclass
class TrainContext:
    """What hooks may use besides the batch: the model, where it runs, the data description,
    and `extract_features(split)` -> ({modality: (N, D)}, labels (N,)) for "train" (training
    samples, evaluation transform) and "val"."""

    model: nn.Module
    device: object
    info: DatasetInfo
    args: argparse.Namespace
    extract_features: Callable[[str], Tuple[Mapping[str, Tensor], Tensor]]
    is_main: bool = True  # the process that computes shared decisions (rank 0)
    broadcast: Callable[[object], object] = lambda obj: obj  # rank 0's object on every process


class Method:
    name = "baseline"
    help = "joint training with cross-entropy on the fused logits"

    @classmethod
    def add_args(cls, group: argparse._ArgumentGroup) -> None:
        """Declare the method's own flags (prefix them with the method's name)."""

    @classmethod
    def select_modalities(cls, args: argparse.Namespace, info: DatasetInfo):
        """Which of the dataset's modalities the model sees (all, unless the method says otherwise)."""
        return info.modality_names

    def __init__(self, args: argparse.Namespace, model: nn.Module, info: DatasetInfo):
        self.args, self.model, self.info = args, model, info

    def on_epoch_start(self, epoch: int, ctx: TrainContext) -> None:
        pass

    def forward(self, model: nn.Module, inputs: Mapping[str, Tensor], labels: Tensor) -> ModelOutput:
        return model(inputs)

    def loss(self, out: ModelOutput, labels: Tensor, epoch: int) -> Tuple[Tensor, Dict[str, float]]:
        return F.cross_entropy(out.logits, labels), {}

    def backward(self, loss: Tensor, out: ModelOutput, labels: Tensor, model: nn.Module) -> None:
        loss.backward()

    def before_step(self, model: nn.Module, out: ModelOutput, labels: Tensor, epoch: int) -> Dict[str, float]:
        return {}

    def on_epoch_end(self, epoch: int, ctx: TrainContext) -> Dict[str, object]:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: Mapping) -> None:
        pass


METHODS: Dict[str, type] = {}


def register_method(cls):
    if cls.name in METHODS:
        raise ValueError(f"method {cls.name!r} registered twice")
    METHODS[cls.name] = cls
    return cls


def create_method(name: str, args: argparse.Namespace, model: nn.Module, info: DatasetInfo) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown --method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name](args, model, info)


register_method(Method)
