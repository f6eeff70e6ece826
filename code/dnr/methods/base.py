"""A training method is a small object with hooks the one epoch loop calls (engine.py, main.py):

    check_args(args)            (class method)  refuse bad values of its own flags, naming them
    select_modalities(args, info) (class method) which modalities the model sees
    build_model(info, **model_args) (class method) the model; a method that needs extra heads or
                                  mid-fusion blocks builds them here, so the loop has no special case
    before_training(ctx)        once, before the first epoch (also after a resume): e.g. a first
                                  stage (uni-modal teachers) run with ctx.run_stage, resumable
    epoch_indices(epoch, ctx) -> None or the training indices of this epoch (re-sampling); a method
                                  whose repeats play different roles finds each batch's positions in
                                  that list with ctx.train_loader.batch_sampler.batch_positions()
                                  (batch.step indexes it)
    on_epoch_start(epoch, ctx)  once per epoch, before training
    train_step(model, batch, update) -> StepResult   one batch; by default the five hooks below,
                                  once. Alternating methods take several optimiser steps here.
      forward(model, inputs, labels) -> ModelOutput  (e.g. drop a modality's features)
      loss(out, labels, epoch)   -> (loss, {name: float})
      backward(loss, out, labels, model)       (e.g. per-modality gradients, then combine)
      before_step(model, out, labels, epoch) -> {name: float}   (e.g. rescale encoder gradients)
    on_epoch_end(epoch, ctx)   -> {name: value}  after the epoch's evaluation; a "diagnosis"
                                  entry is a diagnose.Diagnosis (D&R, or --track_purity)
    state_dict() / load_state_dict(state)    whatever must survive a resume

Every method can own a `Relearner` (diagnose.py): D&R applies it; with --track_purity any other
method runs the same diagnoses on the same schedule and only records them.

The baseline is this class unchanged: plain cross-entropy on the fused logits.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..data.base import DatasetInfo, DeviceTransform
from ..diagnose import Relearner
from ..models import ModelOutput, create_model
from ..stepping import Batch, StepResult, Updater, check_finite, training_batches
from .diagnosis import check_diagnosis_args, make_relearner


@dataclass
class TrainContext:
    """What hooks may use besides the batch: the model, where it runs, the data description,
    `extract_features(split)` -> ({modality: (N, D)}, labels (N,)) for "train" (training
    samples, evaluation transform) and "val", `train_batches(epoch)` (this epoch's training
    batches as the loop will see them: same order, training transform), the run folder, and
    `run_stage(name, **flags)`, which runs this trainer with other flags into <out>/<name>
    (resuming it if it was cut, re-reading it if it finished) and returns that run's folder,
    `extract_features_of(model, split)`: as `extract_features`, for another model than the run's
    (a method's side copy, e.g. Gradient-Blending's), never cached, and
    `evaluate(split)` -> engine.Outputs of a fresh evaluation pass (eval mode, logits, per-modality
    logits and features) over "train" (evaluation transform), "val" or "test", for a method's own
    analysis (e.g. greedy's conditional utilisation rate); never cached."""

    model: nn.Module
    device: object
    info: DatasetInfo
    args: argparse.Namespace
    extract_features: Callable[[str], Tuple[Mapping[str, Tensor], Tensor]]
    is_main: bool = True  # the process that computes shared decisions (rank 0)
    broadcast: Callable[[object], object] = lambda obj: obj  # rank 0's object on every process
    out: Optional[Path] = None
    run_stage: Optional[Callable[..., Path]] = None
    train_loader: Optional[DataLoader] = None  # this process's shard of every training batch
    train_transform: Optional[DeviceTransform] = None  # the device transform training batches get
    extract_features_of: Optional[Callable[[nn.Module, str], Tuple[Mapping[str, Tensor], Tensor]]] = None
    evaluate: Optional[Callable[[str], object]] = None  # split -> engine.Outputs (a fresh pass)

    def train_batches(self, epoch: int) -> Iterator[Batch]:
        """This epoch's training batches (this process's shard), on the device, augmented as in
        training. Each call draws augmentation anew; the order is the epoch's (seed, epoch) one."""
        if self.train_loader is None:
            raise ValueError("this TrainContext was built without the training loader")
        return training_batches(self.train_loader, self.device, epoch, self.train_transform)


class Method:
    name = "baseline"
    help = "joint training with cross-entropy on the fused logits"
    min_modalities = 1  # create_method refuses fewer, naming the method
    relearn = False  # True: the method's Relearner re-initialises (D&R); else it only records

    # ------------------------------------------------------------------ class-level hooks
    @classmethod
    def add_args(cls, group: argparse._ArgumentGroup) -> None:
        """Declare the method's own flags (prefix them with the method's name)."""

    @classmethod
    def check_args(cls, args: argparse.Namespace) -> None:
        """Raise ValueError naming the flag when one of the method's own flags is out of range.
        Every method shares the diagnosis flags (D&R, --track_purity)."""
        check_diagnosis_args(args)

    @classmethod
    def select_modalities(cls, args: argparse.Namespace, info: DatasetInfo):
        """Which of the dataset's modalities the model sees (all, unless the method says otherwise)."""
        return info.modality_names

    @classmethod
    def build_model(cls, info: DatasetInfo, **model_args) -> nn.Module:
        """The model this method trains: by default the multimodal classifier of models/."""
        return create_model(info, **model_args)

    # ------------------------------------------------------------------ life cycle
    def __init__(self, args: argparse.Namespace, model: nn.Module, info: DatasetInfo):
        self.args, self.model, self.info = args, model, info
        # Built before the first optimisation step: this is where theta_init is taken.
        tracking = self.relearn or getattr(args, "track_purity", False)
        self.relearner: Optional[Relearner] = (make_relearner(args, model, info, apply=self.relearn)
                                               if tracking else None)

    def before_training(self, ctx: TrainContext) -> None:
        pass

    def epoch_indices(self, epoch: int, ctx: TrainContext) -> Optional[Sequence[int]]:
        """The training samples of this epoch (indices into the training split, repeats allowed),
        shuffled by the loop; None = every sample once. Must be the same on every process."""
        return None

    def on_epoch_start(self, epoch: int, ctx: TrainContext) -> None:
        pass

    def train_step(self, model: nn.Module, batch: Batch, update: Updater) -> StepResult:
        with update.autocast():
            out = self.forward(model, batch.inputs, batch.labels)
            loss, logs = self.loss(out, batch.labels, batch.epoch)
        check_finite(loss, batch)
        update.zero_grad()
        self.backward(update.scale(loss), out, batch.labels, model)
        update.unscale()  # fp16: the hooks below see true gradients
        logs.update(self.before_step(model, out, batch.labels, batch.epoch))
        update.step()
        return StepResult(loss, out, logs)

    def forward(self, model: nn.Module, inputs: Mapping[str, Tensor], labels: Tensor) -> ModelOutput:
        return model(inputs)

    def loss(self, out: ModelOutput, labels: Tensor, epoch: int) -> Tuple[Tensor, Dict[str, float]]:
        return F.cross_entropy(out.logits, labels), {}

    def backward(self, loss: Tensor, out: ModelOutput, labels: Tensor, model: nn.Module) -> None:
        loss.backward()

    def before_step(self, model: nn.Module, out: ModelOutput, labels: Tensor, epoch: int) -> Dict[str, float]:
        return {}

    def on_epoch_end(self, epoch: int, ctx: TrainContext) -> Dict[str, object]:
        if self.relearner is None:
            return {}
        record = self.relearner.step(epoch, ctx.extract_features, compute=ctx.is_main, share=ctx.broadcast)
        return {"diagnosis": record} if record is not None else {}

    def diagnoses(self) -> List[dict]:
        """Every diagnosis of this run so far (applied or recorded only), oldest first."""
        return [d.to_dict() for d in self.relearner.history] if self.relearner is not None else []

    def state_dict(self) -> dict:
        return {"relearner": self.relearner.state_dict()} if self.relearner is not None else {}

    def load_state_dict(self, state: Mapping) -> None:
        if self.relearner is not None:
            if "relearner" not in state:
                raise KeyError("the checkpoint holds no D&R state (init snapshot, re-inits done); it was "
                               "written by a run without --track_purity or --method relearn")
            self.relearner.load_state_dict(state["relearner"])


METHODS: Dict[str, type] = {}


def register_method(cls):
    if cls.name in METHODS:
        raise ValueError(f"method {cls.name!r} registered twice")
    METHODS[cls.name] = cls
    return cls


def create_method(name: str, args: argparse.Namespace, model: nn.Module, info: DatasetInfo) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown --method {name!r}; choose one of {sorted(METHODS)}")
    cls = METHODS[name]
    if len(info.modalities) < cls.min_modalities:
        raise ValueError(f"--method {name} needs at least {number(cls.min_modalities)} modalities, the model "
                         f"has {info.modality_names}")
    return cls(args, model, info)


def number(n: int) -> str:
    return {2: "two", 3: "three"}.get(n, str(n))


register_method(Method)
