"""UME: Uni-Modal Ensemble (Du, Teng, Li, Liu, Yuan, Wang, Yuan, Zhao, ICML 2023, "On Uni-Modal
Feature Learning in Supervised Multi-Modal Learning", arXiv 2305.01233).

No released code of the authors was found (see umt.py for the search); the mechanics follow the
paper, as read, and what it leaves open is a flag.

The uni-modal models are trained separately and their predictions combined at test time:
  1. Members: one uni-modal model per modality (encoder + linear classifier), trained alone with
     cross-entropy by this trainer (`--method unimodal`, the run's data, optimiser and schedule,
     `--ume_teacher_epochs` epochs) into <out>/teacher_<modality>, each selected on val (the same
     first stage as UMT's teachers, teachers.py).
  2. The model this run evaluates is the ensemble (`UnimodalEnsemble`, built by build_model and
     filled with the members' val-selected weights in before_training): its logits are the mean of
     the members' logits, (1/M) sum_m s_m; each member's own logits are the run's per-modality
     logits (acc_<modality>, "head" in results.json), its encoders' features the probe's and the
     diagnoses'.
The run itself trains nothing: the ensemble has no parameter of its own and its members are
finished, so every epoch draws no training sample (epoch_indices is empty: the log's training loss
and accuracy read 0) and only evaluates val and test. The numbers are the same every epoch, so
selection on val takes epoch 0, and results.json holds the ensemble's val-selected test accuracy.
`--epochs 1` gives the same result as any other value (set --ume_teacher_epochs then, or the
members get one epoch).

Flags (what the paper leaves open):
  - `--ume_combine logits` (default: the mean of the members' logits) or `softmax` (the mean of
    their probabilities; the model's logits are then the log of that mean, so softmax, argmax and
    the reported metrics are those of the averaged probabilities).
  - `--ume_teacher_epochs` (default 0 = the run's --epochs): the members' schedule.
Remaining differences:
  - Members use concat fusion over their one modality whatever --fusion says (film and gated need
    two modalities); --fusion does not change the ensemble.
  - Three or more modalities (the paper has two): the mean over all M members.
  - Evaluation protocol (ours for every method): members and ensemble are selected on val; the
    run's seconds count the evaluation epochs only (each member's are in its own results.json).
"""
from __future__ import annotations

import argparse
import math
import warnings
from typing import Callable, Dict, Mapping, Optional

import torch
from torch import Tensor, nn

from ..data.base import DatasetInfo
from ..models import ModelOutput, create_model
from .base import Method, register_method
from .common import require
from .teachers import read_teacher, teacher_epochs, train_teachers

COMBINES = ("logits", "softmax")


class UnimodalEnsemble(nn.Module):
    """M uni-modal models side by side: `encoders[m]` and `heads[m]` (the member's Linear head, its
    one-modality concat fusion); logits = the members' combined predictions. Same interface as
    MultimodalClassifier (encode, head, forward, encoders, encoder_names), so the trainer, the
    probe, the diagnoses and --eval_only treat it as any model. The combination rule is part of
    the state dict (extra state), so a checkpoint evaluates as it was trained."""

    def __init__(self, info: DatasetInfo, fusion: str = "concat", encoders: Optional[Mapping[str, str]] = None,
                 encoder_options: Optional[Mapping[str, dict]] = None, combine: str = "logits"):
        super().__init__()
        choice = dict(encoders or {})
        members = {m: create_model(info.restrict([m]), fusion="concat",
                                   encoders={m: choice[m]} if m in choice else None, encoder_options=encoder_options)
                   for m in info.modality_names}
        self.modalities = info.modality_names
        self.encoder_names = {m: members[m].encoder_names[m] for m in self.modalities}
        self.encoders = nn.ModuleDict({m: members[m].encoders[m] for m in self.modalities})
        self.heads = nn.ModuleDict({m: members[m].fusion for m in self.modalities})
        self.num_classes = info.num_classes
        self.combine = combine
        self.check_combine()

    def check_combine(self) -> None:
        if self.combine not in COMBINES:
            raise ValueError(f"--ume_combine must be one of {COMBINES}, got {self.combine!r}")

    def get_extra_state(self):
        return {"combine": self.combine}

    def set_extra_state(self, state) -> None:
        self.combine = state["combine"]
        self.check_combine()

    def load_member(self, modality: str, state: Mapping[str, Tensor]) -> None:
        """Take a uni-modal model's state dict (keys encoders.<modality>.*, fusion.*)."""
        enc, head = f"encoders.{modality}.", "fusion."
        unknown = [k for k in state if not k.startswith((enc, head))]
        if unknown:
            raise ValueError(f"not a uni-modal model of {modality!r}: unexpected keys {unknown[:3]}")
        self.encoders[modality].load_state_dict({k[len(enc):]: v for k, v in state.items() if k.startswith(enc)})
        self.heads[modality].load_state_dict({k[len(head):]: v for k, v in state.items() if k.startswith(head)})

    def encode(self, inputs: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        missing = [m for m in self.modalities if m not in inputs]
        if missing:
            raise KeyError(f"model input lacks modalities {missing}; got {sorted(inputs)}")
        return {m: self.encoders[m](inputs[m]) for m in self.modalities}

    def head(self, features: Mapping[str, Tensor]) -> ModelOutput:
        uni = {m: self.heads[m]({m: features[m]}).logits for m in self.modalities}  # each (B, C)
        stacked = torch.stack([uni[m] for m in self.modalities])  # (M, B, C)
        if self.combine == "logits":
            logits = stacked.mean(0)
        else:  # log of the mean probability: softmax of it is the mean probability
            logits = torch.logsumexp(torch.log_softmax(stacked.float(), -1), 0) - math.log(len(self.modalities))
        return ModelOutput(logits, dict(features), uni)

    def forward(self, inputs: Mapping[str, Tensor],
                feature_transform: Optional[Callable[[Dict[str, Tensor]], Dict[str, Tensor]]] = None) -> ModelOutput:
        feats = self.encode(inputs)
        if feature_transform is not None:
            feats = feature_transform(feats)
        return self.head(feats)


@register_method
class UME(Method):
    name = "ume"
    help = ("UME, Uni-Modal Ensemble (ICML 2023): uni-modal models trained separately, their logits averaged "
            "at test time; the run itself trains nothing")
    min_modalities = 2

    @classmethod
    def add_args(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--ume_combine", choices=COMBINES, default="logits",
                           help="how the members' predictions combine: the mean of their logits, or of their "
                                "softmax probabilities (default: %(default)s)")
        group.add_argument("--ume_teacher_epochs", type=int, default=0,
                           help="epochs of each uni-modal member's stage (<out>/teacher_<modality>); 0 = the run's "
                                "--epochs (default: %(default)s)")

    @classmethod
    def check_args(cls, args) -> None:
        super().check_args(args)
        require([(args.ume_teacher_epochs >= 0,
                  f"--ume_teacher_epochs must be >= 0 (0 = --epochs), got {args.ume_teacher_epochs}")])

    @classmethod
    def build_model(cls, info, **model_args) -> nn.Module:
        return UnimodalEnsemble(info, **model_args)

    def __init__(self, args, model, info):
        super().__init__(args, model, info)
        model.combine = args.ume_combine
        model.check_combine()
        # No optimiser step ever runs; the loop's scheduler.step() is then harmless, its warning noise.
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")

    def before_training(self, ctx) -> None:
        epochs = teacher_epochs(self.args, self.args.ume_teacher_epochs)
        folders = train_teachers(ctx, self.info.modality_names, epochs, "--ume_teacher_epochs")
        for m, folder in folders.items():
            ctx.model.load_member(m, read_teacher(folder, ctx.device)["model"])

    def epoch_indices(self, epoch, ctx):
        return []  # nothing to train: the members are finished, the ensemble has no parameter of its own
