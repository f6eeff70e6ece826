"""AMCo: adaptive mask co-optimisation (Zhou, Liang, Zheng, Xuan, Kumada, ICASSP 2023, "Adaptive
Mask Co-Optimization for Modal Dependence in Multimodal Learning").

No code from the authors could be found (no repository, none linked from the paper's page), and
the paper itself (IEEE Xplore only) could not be read here beyond its abstract: "the adaptive mask
... making dependent modalities harder to be learned; the co-optimization can preserve the
performance of models on dependent modalities". The mechanics below are therefore a
reconstruction: they follow the one implementation found, the AMCo trainer of the field's toolkit
GeWu-Lab/BalanceBenchmark as first written (at 596b434: `balancemm/trainer/AMCo_trainer.py`
`train_loop` and `training_step`, `balancemm/models/avclassify_model.py` `AVClassifierModel.forward`
L198-226), which names the paper's symbols (sigma, U, epsilon) and its defaults
(`configs/trainer_config.yaml`: sigma 0.5, U 512, eps 0.3), read as a description of the paper.
(Its later version, at 4c1482f, masks the classes of the uni-modal logits instead of feature
units, with the U it still declares unused; not followed.) Treat this method as "AMCo as the
benchmark describes it", not as the authors' verified update.

Inside the window (0-based epochs), each step:
  1. mask ratio p = sin(pi/2 * min(eps, l) / eps), where l starts at 0 at every epoch and grows by
     epoch / 10 after each step (so nothing is masked in epoch 0, and from epoch 1 on p reaches 1
     within a few steps);
  2. if a modality has been found dependent earlier in this epoch (the first such one in the
     model's order), int(p * U) of the U units of its pooled feature (U = its feature dimension,
     512 for ResNet-18) are set to zero, one random set of units for the whole batch, and the kept
     units are multiplied by 1 / (1 - p) (by 10 when |p - 1| <= 0.1);
  3. loss = CE(fused logits) + sum over modalities of CE(uni-modal logits), the uni-modal logits
     being each modality's slice of the head on the (masked) features: the co-optimisation;
  4. modal dependence for the following steps: S = softmax over the concatenated uni-modal logits
     [s_1, ..., s_M] (one distribution over M x C entries per sample); share_m = the mean over the
     batch of S's mass on modality m's block; the first modality (in order) with share_m >= sigma
     is marked dependent, and stays so until the epoch ends.
Outside the window: plain cross-entropy on the fused logits. Evaluation never masks.

Remaining differences and their flags:
  - Everything above is unverified against the authors (see the first paragraph); in particular
    the schedule of l (whose epoch / 10 per step makes the mask total from epoch 1 on with the
    default eps; `--amco_eps` stretches it) and the dependence rule.
  - Under DistributedDataParallel the shares are averaged over processes, so all mark the same
    modality; each process draws its own mask units.
  - Window: the benchmark's configuration starts AMCo at epoch 10 in that first version and at
    epoch 0 later; ours starts at 0 (`--amco_starts 10` for the former). Its `alpha: 0.1` is read
    by neither version and has no counterpart here.
  - Three or more modalities: the same rule over M blocks (the benchmark's three-modality branch
    also marks the first modality in order whose share reaches sigma).
  - Needs per-modality logits: --fusion concat or sum.
  - Evaluation protocol (ours for every method): the model is selected on val.
"""
from __future__ import annotations

import argparse
import math
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import distributed as dist
from ..models import unwrap
from .base import Method, register_method
from .common import add_window_args, in_window, require, require_unimodal_logits, window_rules


def mask_ratio(progress: float, eps: float) -> float:
    """p = sin(pi/2 * min(eps, l) / eps), l = `progress`."""
    return math.sin(math.pi / 2 * min(eps, progress) / eps)


def unit_mask(dim: int, p: float, device=None, generator: Optional[torch.Generator] = None) -> Tensor:
    """(dim,) multiplier: int(p * dim) random units zero, the others 1 / (1 - p) (10 when p is
    within 0.1 of 1, where 1 / (1 - p) would blow up)."""
    n = int(p * dim)
    keep = torch.ones(dim)
    keep[torch.randperm(dim, generator=generator)[:n]] = 0.0
    scale = 1.0 / (1.0 - p) if abs(p - 1.0) > 0.1 else 10.0
    return (keep * scale).to(device)


def dependence_shares(uni: Dict[str, Tensor]) -> Dict[str, float]:
    """share_m: mean over the batch of the mass on modality m's block of a softmax over the
    concatenated uni-modal logits."""
    names = list(uni)
    with torch.no_grad():
        joint = torch.softmax(torch.cat([uni[m].detach().float() for m in names], 1), 1)  # (B, M*C)
        blocks = joint.split([uni[m].shape[1] for m in names], 1)
        return {m: float(b.sum(1).mean()) for m, b in zip(names, blocks)}


@register_method
class AMCo(Method):
    name = "amco"
    help = ("AMCo (ICASSP 2023, as BalanceBenchmark describes it): mask units of the dependent modality's "
            "feature with a growing ratio, plus uni-modal cross-entropies")
    min_modalities = 2

    @classmethod
    def add_args(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--amco_sigma", type=float, default=0.5,
                           help="a modality is dependent when its share of the joint uni-modal softmax reaches "
                                "this (default: %(default)s)")
        group.add_argument("--amco_eps", type=float, default=0.3,
                           help="epsilon in the mask ratio sin(pi/2 min(eps, l) / eps); l grows by epoch / 10 per "
                                "step within an epoch (default: %(default)s)")
        add_window_args(group, "amco", 0, None)

    @classmethod
    def check_args(cls, args) -> None:
        super().check_args(args)
        require([(0 < args.amco_sigma <= 1, f"--amco_sigma must lie in (0, 1], got {args.amco_sigma}"),
                 (args.amco_eps > 0, f"--amco_eps must be > 0, got {args.amco_eps}")]
                + window_rules(args, "amco"))

    def __init__(self, args, model, info):
        super().__init__(args, model, info)
        self.epoch = 0
        self.progress = 0.0  # l
        self.dependent: List[str] = []  # marked this epoch, in the order they were marked
        self.step_info: Dict[str, float] = {}

    def on_epoch_start(self, epoch, ctx):
        self.epoch, self.progress, self.dependent = epoch, 0.0, []

    def masked_modality(self, names) -> Optional[str]:
        """The first modality, in the model's order, marked dependent this epoch."""
        return next((m for m in names if m in self.dependent), None)

    def forward(self, model, inputs, labels):
        self.step_info = {}
        if not in_window(self.epoch, self.args.amco_starts, self.args.amco_ends):
            return model(inputs)
        p = mask_ratio(self.progress, self.args.amco_eps)
        self.progress += self.epoch / 10
        target = self.masked_modality(list(unwrap(model).modalities))
        self.step_info = {"amco_ratio": p if target is not None else 0.0}
        if target is None:
            return model(inputs)

        def mask(feats):
            f = feats[target]
            return {**feats, target: f * unit_mask(f.shape[1], p, f.device).to(f.dtype)}

        # Inside the model's forward, so DistributedDataParallel sees the whole step.
        return model(inputs, feature_transform=mask)

    def loss(self, out, labels, epoch):
        loss = F.cross_entropy(out.logits, labels)
        if not in_window(epoch, self.args.amco_starts, self.args.amco_ends):
            return loss, {}
        uni = require_unimodal_logits(out, self.name)
        logs = dict(self.step_info)
        for m, s in uni.items():
            ce = F.cross_entropy(s, labels)
            loss = loss + ce
            logs[f"amco_ce_{m}"] = float(ce.detach())
        # Averaged over processes, so every process marks the same modality.
        shares = dist.all_reduce_dict(dependence_shares(uni), labels.device, mean=True)
        for m in uni:  # the first one (in order) that reaches sigma
            if shares[m] >= self.args.amco_sigma:
                if m not in self.dependent:
                    self.dependent.append(m)
                break
        logs.update({f"amco_share_{m}": v for m, v in shares.items()})
        return loss, logs
