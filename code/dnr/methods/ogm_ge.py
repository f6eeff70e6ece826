"""OGM-GE: on-the-fly gradient modulation with generalisation enhancement (Peng et al., CVPR 2022).

Each step, from the head's per-modality logits s_m: S_m = sum_batch softmax(s_m)[y] and
rho_m = S_m / S_other (with more than two modalities, S_other is the mean over the others). The
gradients of every encoder whose rho_m > 1 (the dominant one) are scaled by
k_m = 1 - tanh(alpha * rho_m); the others keep k = 1. With GE, Gaussian noise with the standard
deviation of each original gradient tensor is then added to every encoder's gradient.

Paper vs the authors' code (we follow the paper; --ogm_formula code switches):
  - the paper's coefficient is 1 - tanh(alpha * rho); the released code uses
    1 - tanh(alpha * relu(rho - 1)), which is continuous at rho = 1;
  - the code modulates only 4-D convolution weights; the paper (and we) all encoder parameters.
Defaults from SPEC: alpha 0.8 (CREMA-D), modulation during epochs [0, 50].
"""
from __future__ import annotations

import argparse
import math

import torch

from .. import distributed as dist
from ..models import unwrap
from .base import Method, register_method
from .common import (add_window_args, in_window, ratio_to_others, require, require_unimodal_logits,
                     true_class_score, window_rules)


def ogm_coefficients(scores, alpha: float, formula: str = "paper"):
    """{modality: k}: 1 - tanh(alpha * rho) for modalities with rho > 1, else 1."""
    rho = ratio_to_others(scores)
    coeff = {}
    for m, r in rho.items():
        if r > 1:
            coeff[m] = 1 - math.tanh(alpha * (r if formula == "paper" else r - 1))
        else:
            coeff[m] = 1.0
    return coeff, rho


class OGMBase(Method):
    noise = True
    min_modalities = 2

    @classmethod
    def add_args(cls, group: argparse._ArgumentGroup) -> None:
        if cls is not OGMGE:  # one set of flags serves ogm and ogm_ge
            return
        group.add_argument("--ogm_alpha", type=float, default=0.8,
                           help="alpha in k = 1 - tanh(alpha * rho), methods ogm and ogm_ge (default: %(default)s)")
        group.add_argument("--ogm_formula", choices=("paper", "code"), default="paper",
                           help="'paper': 1 - tanh(alpha * rho); 'code': the authors' 1 - tanh(alpha * relu(rho - 1)) "
                                "(default: %(default)s)")
        add_window_args(group, "ogm", 0, 50)

    @classmethod
    def check_args(cls, args) -> None:
        super().check_args(args)
        require([(args.ogm_alpha >= 0, f"--ogm_alpha must be >= 0, got {args.ogm_alpha}")]
                + window_rules(args, "ogm"))

    def __init__(self, args, model, info):
        super().__init__(args, model, info)
        self.step = 0

    def state_dict(self) -> dict:
        return {**super().state_dict(), "step": self.step}

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        self.step = int(state.get("step", 0))

    def before_step(self, model, out, labels, epoch):
        if not in_window(epoch, self.args.ogm_starts, self.args.ogm_ends):
            return {}
        uni = require_unimodal_logits(out, self.name)
        # Scores summed over every process's samples: all processes scale by the same k.
        scores = dist.all_reduce_dict({m: true_class_score(uni[m], labels) for m in uni}, labels.device)
        coeff, rho = ogm_coefficients(scores, self.args.ogm_alpha, self.args.ogm_formula)
        encoders = unwrap(model).encoders
        if self.noise:
            # The same noise on every process (seeded by epoch and step), so replicas stay equal.
            self.step += 1
            gen = torch.Generator(device=labels.device)
            gen.manual_seed(hash((getattr(self.args, "random_seed", 0), epoch, self.step)) % 2**63)
        with torch.no_grad():
            for m, k in coeff.items():
                for p in encoders[m].parameters():
                    if p.grad is None:
                        continue
                    std = p.grad.std() if (self.noise and p.grad.numel() > 1) else None
                    p.grad.mul_(k)
                    if std is not None:
                        noise = torch.randn(p.grad.shape, generator=gen, device=p.grad.device, dtype=p.grad.dtype)
                        p.grad.add_(noise * (std + 1e-8))
        logs = {f"ogm_coeff_{m}": k for m, k in coeff.items()}
        logs.update({f"ogm_ratio_{m}": r for m, r in rho.items()})
        return logs


@register_method
class OGM(OGMBase):
    name = "ogm"
    help = "OGM (CVPR 2022) without the GE noise"
    noise = False


@register_method
class OGMGE(OGMBase):
    name = "ogm_ge"
    help = "OGM-GE (CVPR 2022): scale the dominant encoder's gradients, add Gaussian noise"
    noise = True
