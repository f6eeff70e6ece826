"""OPM: on-the-fly prediction modulation (Wei, Hu et al., TPAMI 2024).

Checked against the authors' released code: GeWu-Lab/BML_TPAMI2024 at 4b3aa4f,
`code/models/Classifier.py` (`calcu_q`, `Modality_drop.execute_drop`, `Classifier.forward`: the
scores, drop probabilities, masks and rescaling) and `code/main.py` `train` (L77-178: the warm-up
and the loss on the kept samples), with `code/scripts/train_opm.sh` for the settings. The mechanics
below are theirs unless a difference is listed.

Each training step, from the head's per-modality logits on the undropped features (for concat
fusion, modality m's slice of the weight plus bias / M): S_m = sum over the batch of
softmax(s_m)[y], rho_m = S_m / S_other. A modality ahead of the others (rho_m > 1) has its features
dropped, sample by sample, with probability
    q_m = clip(q_base * (1 + lambda * tanh(rho_m - 1)), 0, 1)        (q_m = 0 when rho_m <= 1),
the drop being carried out in a step with probability p_exe. Kept features are divided by
(1 - theta), theta = sum_m D_m q_m / sum_m D_m; a sample whose modalities were all dropped leaves
the loss. No dropping during the warm-up (their `epoch <= 5`: from 0-based epoch 6 on). Defaults
are their script's: q_base 0.5, lambda 0.5, p_exe 0.7.

Remaining differences:
  - The random draws (whether a step drops, then one mask per modality) come from torch's global
    generator in that order; theirs from numpy (the step) and a Bernoulli sample (the masks): the
    same distributions, not the same numbers.
  - When every sample of a batch lost all its modalities, they skip the optimiser step; here the
    step runs with a zero loss (weight decay and momentum still act), which keeps processes in step
    under DistributedDataParallel. With q below 1 and batches of 64 this practically never happens.
  - Three or more modalities (their code has two): rho_m compares S_m with the mean S of the others.
  - Evaluation protocol (ours for every method): the model is selected on val; the optimiser and
    schedule are the run's (theirs: AdamW).
"""
from __future__ import annotations

import argparse
import math
from typing import Dict

import torch
import torch.nn.functional as F

from ..models import unwrap
from .base import Method, register_method
from .common import (add_window_args, in_window, ratio_to_others, require, require_unimodal_logits,
                     true_class_score, window_rules)


def drop_probabilities(scores: Dict[str, float], q_base: float, lam: float) -> Dict[str, float]:
    rho = ratio_to_others(scores)
    return {m: (min(max(q_base * (1 + lam * math.tanh(r - 1)), 0.0), 1.0) if r > 1 else 0.0)
            for m, r in rho.items()}


@register_method
class OPM(Method):
    name = "opm"
    help = "OPM (TPAMI 2024): drop the dominant modality's features with a ratio-driven probability"
    min_modalities = 2

    @classmethod
    def add_args(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--opm_q_base", type=float, default=0.5, help="base drop probability (default: %(default)s)")
        group.add_argument("--opm_lambda", type=float, default=0.5,
                           help="how fast the drop probability grows with the ratio (default: %(default)s)")
        group.add_argument("--opm_p_exe", type=float, default=0.7,
                           help="probability that a step drops at all (default: %(default)s)")
        add_window_args(group, "opm", 6, None)

    @classmethod
    def check_args(cls, args) -> None:
        super().check_args(args)
        require([(0 <= args.opm_q_base <= 1, f"--opm_q_base must lie in [0, 1], got {args.opm_q_base}"),
                 (args.opm_lambda >= 0, f"--opm_lambda must be >= 0, got {args.opm_lambda}"),
                 (0 <= args.opm_p_exe <= 1, f"--opm_p_exe must lie in [0, 1], got {args.opm_p_exe}")]
                + window_rules(args, "opm"))

    def __init__(self, args, model, info):
        super().__init__(args, model, info)
        self.keep, self.q = None, {}
        self.epoch = 0

    def on_epoch_start(self, epoch, ctx):
        self.epoch = epoch

    def forward(self, model, inputs, labels):
        self.keep, self.q = None, {}
        if not in_window(self.epoch, self.args.opm_starts, self.args.opm_ends):
            return model(inputs)
        net = unwrap(model)

        def drop(feats):
            with torch.no_grad():
                uni = require_unimodal_logits(net.head({m: f.detach() for m, f in feats.items()}), self.name)
            self.q = drop_probabilities({m: true_class_score(uni[m], labels) for m in uni},
                                        self.args.opm_q_base, self.args.opm_lambda)
            if not any(v > 0 for v in self.q.values()) or float(torch.rand(())) >= self.args.opm_p_exe:
                return feats
            b = labels.shape[0]
            dims = {m: f.shape[1] for m, f in feats.items()}
            theta = sum(dims[m] * self.q[m] for m in feats) / sum(dims.values())
            masks = {m: (torch.rand(b, 1, device=f.device) >= self.q[m]).to(f.dtype) for m, f in feats.items()}
            self.keep = torch.stack([masks[m][:, 0] for m in feats]).amax(0) > 0  # (B,)
            return {m: f * masks[m] / (1 - theta) for m, f in feats.items()}

        # Dropping happens inside the model's forward, so DistributedDataParallel sees the whole step.
        return model(inputs, feature_transform=drop)

    def loss(self, out, labels, epoch):
        logs = {f"opm_q_{m}": v for m, v in self.q.items()}
        if self.keep is None:
            return F.cross_entropy(out.logits, labels), logs
        logs["opm_kept"] = float(self.keep.float().mean())
        if not self.keep.any():
            return out.logits.sum() * 0.0, logs
        return F.cross_entropy(out.logits[self.keep], labels[self.keep]), logs
