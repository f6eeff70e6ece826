"""UMT: Uni-Modal Teacher (Du, Teng, Li, Liu, Yuan, Wang, Yuan, Zhao, ICML 2023, "On Uni-Modal
Feature Learning in Supervised Multi-Modal Learning", arXiv 2305.01233; first as "Improving
Multi-Modal Learning with Uni-Modal Teachers", arXiv 2106.11059).

No released code of the authors was found (searched 2026-12-01: GitHub code, issues and pages for
the paper's titles, "Uni-Modal Teacher", "UMT"/"UME" with the paper's datasets, the first author's
repositories; none implements the paper). Following the rule for that case, the mechanics below
follow the paper, as read; what the paper leaves open is a flag. GeWu-Lab/BalanceBenchmark has a
UMT trainer; it was used only to confirm that the method is distillation of encoder features and
is no reference for its details.

Two stages:
  1. Teachers: one uni-modal model per modality (encoder + linear classifier), trained alone with
     cross-entropy by this trainer (`--method unimodal`, the run's data, optimiser and schedule,
     `--umt_teacher_epochs` epochs) into <out>/teacher_<modality>, selected on val (teachers.py).
  2. The multimodal model, trained from its own initialisation (the teachers are not copied into
     it) with
        L = CE(fused logits, y) + umt_weight * sum_m MSE(z_m, t_m),
     where z_m is the multimodal model's pooled feature of modality m (the input of the fusion
     head) and t_m the frozen teacher's pooled feature of the same augmented input, computed with
     no gradient and the teacher in evaluation mode (its BatchNorm statistics fixed). MSE is the
     mean over the batch and the feature dimensions. Every step, every epoch.

The teachers are the method's, not the model's: frozen, never stepped, they stay out of the
optimiser, the checkpoints and the parameter count; a resumed run re-reads them from their stage
folders (and refuses teachers whose selected epochs changed).

Flags (what the paper leaves open):
  - `--umt_weight` (default 1.0: the plain sum "cross-entropy plus distillation"): the weight of the
    distillation terms. The paper's per-dataset value could not be checked here; BalanceBenchmark's
    configuration uses 10.
  - `--umt_teacher_epochs` (default 0 = the run's --epochs): the teachers' schedule.
Remaining differences:
  - Teachers use concat fusion over their one modality whatever --fusion the multimodal model uses
    (film and gated need two modalities).
  - Three or more modalities (the paper has two): one teacher and one distillation term per
    modality, all with the same weight.
  - Evaluation protocol (ours for every method): teacher and multimodal model are selected on val;
    the run's seconds count the second stage only (each teacher's are in its own results.json).
"""
from __future__ import annotations

import argparse
from typing import Dict

import torch.nn.functional as F
from torch import Tensor

from .base import Method, register_method
from .common import require
from .teachers import build_teacher, read_teacher, teacher_epochs, teacher_features, train_teachers


def distillation_losses(features: Dict[str, Tensor], targets: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """MSE (mean over batch and dimensions) between each student feature and its teacher's."""
    return {m: F.mse_loss(features[m].float(), targets[m].float()) for m in targets}


@register_method
class UMT(Method):
    name = "umt"
    help = ("UMT, Uni-Modal Teacher (ICML 2023): uni-modal teachers first, then CE + weight * MSE(encoder "
            "feature, frozen teacher's feature) per modality")
    min_modalities = 2

    @classmethod
    def add_args(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--umt_weight", type=float, default=1.0,
                           help="weight of each modality's feature-distillation MSE next to the cross-entropy; "
                                "unitless (default: %(default)s)")
        group.add_argument("--umt_teacher_epochs", type=int, default=0,
                           help="epochs of each uni-modal teacher's stage (<out>/teacher_<modality>); 0 = the "
                                "run's --epochs (default: %(default)s)")

    @classmethod
    def check_args(cls, args) -> None:
        super().check_args(args)
        require([(args.umt_weight >= 0, f"--umt_weight must be >= 0, got {args.umt_weight}"),
                 (args.umt_teacher_epochs >= 0,
                  f"--umt_teacher_epochs must be >= 0 (0 = --epochs), got {args.umt_teacher_epochs}")])

    def __init__(self, args, model, info):
        super().__init__(args, model, info)
        self.teachers = {}
        self.teacher_epochs: Dict[str, int] = {}  # each teacher's selected epoch, checked on resume
        self._targets: Dict[str, Tensor] = {}

    def before_training(self, ctx) -> None:
        epochs = teacher_epochs(self.args, self.args.umt_teacher_epochs)
        folders = train_teachers(ctx, self.info.modality_names, epochs, "--umt_teacher_epochs")
        saved = {m: read_teacher(f, ctx.device) for m, f in folders.items()}
        selected = {m: int(s["epoch"]) for m, s in saved.items()}
        if self.teacher_epochs and self.teacher_epochs != selected:
            raise ValueError(f"the checkpoint was trained with teachers selected at epochs {self.teacher_epochs}, "
                             f"the teacher folders now hold epochs {selected}; resume with the same teachers")
        self.teacher_epochs = selected
        self.set_teachers({m: build_teacher(self.info, m, s, ctx.device) for m, s in saved.items()})

    def set_teachers(self, teachers) -> None:
        """The frozen uni-modal models {modality: model whose encoders[modality] gives t_m}."""
        self.teachers = dict(teachers)

    def forward(self, model, inputs, labels):
        if not self.teachers:
            raise ValueError("--method umt has no teachers: before_training did not run")
        out = model(inputs)
        self._targets = teacher_features(self.teachers, inputs)
        return out

    def loss(self, out, labels, epoch):
        ce = F.cross_entropy(out.logits, labels)
        distill = distillation_losses(out.features, self._targets)
        loss = ce + self.args.umt_weight * sum(distill.values())
        logs = {"loss_ce": float(ce.detach())}
        logs.update({f"umt_mse_{m}": float(v.detach()) for m, v in distill.items()})
        return loss, logs

    def state_dict(self) -> dict:
        return {**super().state_dict(), "teacher_epochs": dict(self.teacher_epochs)}

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        self.teacher_epochs = dict(state.get("teacher_epochs", {}))
