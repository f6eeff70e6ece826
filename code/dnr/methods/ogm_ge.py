"""OGM-GE: on-the-fly gradient modulation with generalisation enhancement (Peng et al., CVPR 2022).

Checked against the authors' released code: GeWu-Lab/OGM-GE_CVPR2022 at 343dc1d (main.py as last
changed in 5480329, 2023-03-23), `main.py` `train_epoch` (scores, ratio, coefficients and the
parameter loop, L95-153). The mechanics below are theirs unless a flag says otherwise.

Each step, after the backward pass of the fused cross-entropy, from the head's per-modality logits
s_m (for concat fusion, modality m's slice of the weight plus bias / M): S_m = sum over the batch
of softmax(s_m)[y], rho_m = S_m / S_other. The dominant modality's gradients are scaled by
k = 1 - tanh(alpha * rho) (the paper's Eq. 10 and the released code alike: `--ogm_formula tanh`);
the other modality keeps k = 1. At an exact tie (rho = 1) the code modulates the first modality
(their audio), and so do we. Only 4-D gradients are touched, i.e. convolution weights, the 1x1
downsampling ones included (`--ogm_params conv`); BatchNorm, linear layers and the fusion head keep
their gradients. With GE (`ogm_ge`), every touched tensor of every encoder, modulated or not, then
gets Gaussian noise with the (unbiased) standard deviation of its original, unscaled gradient
(+ 1e-8). Nothing happens outside the modulation window (0-based epochs, inclusive).

Remaining differences and their flags:
  - `--ogm_params all` modulates (and adds noise to) every encoder parameter, this project's
    earlier default. With the authors' rule an encoder without convolutions (an MLP or a
    transformer: the built-in `sensor` modality, CMU-MOSI) is never modulated; the method warns
    at start-up which encoders that concerns.
  - `--ogm_formula relu_minus_one`: 1 - tanh(alpha * relu(rho - 1)), the coefficient of the first
    code release (before the 2022-05-29 change; that release could not run as published). Earlier
    versions of this project called it `code` and the default `paper`.
  - The noise comes from this method's own generator, seeded by (--random_seed, epoch, step) and
    drawn encoder by encoder, parameter by parameter in registration order, so every process draws
    the same noise; the authors draw from the global generator (`normal_`): the same distribution,
    not the same numbers.
  - Three or more modalities (their code has two): rho_m compares S_m with the mean S of the
    others, every modality with rho_m > 1 is modulated, the first one if all are tied.
  - Evaluation protocol (ours for every method): the model is selected on val; the authors'
    defaults (alpha 0.8 for CREMA-D, window 0-based epochs [0, 50]) are ours.
"""
from __future__ import annotations

import argparse
import math
import warnings
from typing import Dict, List

import torch
from torch import nn

from .. import distributed as dist
from ..models import unwrap
from .base import Method, register_method
from .common import (add_window_args, in_window, ratio_to_others, require, require_unimodal_logits,
                     true_class_score, window_rules)

FORMULAS = ("tanh", "relu_minus_one")


def ogm_coefficients(scores, alpha: float, formula: str = "tanh"):
    """({modality: k}, {modality: rho}): k = 1 - tanh(alpha * rho) (or of relu(rho - 1)) for the
    modalities with rho > 1, 1 for the others; all tied: the first modality is the one modulated."""
    rho = ratio_to_others(scores)
    dominant = [m for m, r in rho.items() if r > 1] or [next(iter(rho))]
    coeff = {}
    for m, r in rho.items():
        x = r if formula == "tanh" else max(r - 1, 0.0)
        coeff[m] = 1 - math.tanh(alpha * x) if m in dominant else 1.0
    return coeff, rho


def modulated_parameters(encoder: nn.Module, which: str) -> List[nn.Parameter]:
    """The parameters OGM touches: 4-D ones (convolution weights) for 'conv', all for 'all'."""
    return [p for p in encoder.parameters() if p.requires_grad and (which == "all" or p.dim() == 4)]


class OGMBase(Method):
    noise = True
    min_modalities = 2

    @classmethod
    def add_args(cls, group: argparse._ArgumentGroup) -> None:
        if cls is not OGMGE:  # one set of flags serves ogm and ogm_ge
            return
        group.add_argument("--ogm_alpha", type=float, default=0.8,
                           help="alpha in k = 1 - tanh(alpha * rho), methods ogm and ogm_ge (default: %(default)s)")
        group.add_argument("--ogm_formula", choices=FORMULAS, default="tanh",
                           help="'tanh': 1 - tanh(alpha * rho), the paper's and the released code's; "
                                "'relu_minus_one': 1 - tanh(alpha * relu(rho - 1)), the first (non-runnable) "
                                "release's, called 'code' before (default: %(default)s)")
        group.add_argument("--ogm_params", choices=("conv", "all"), default="conv",
                           help="gradients modulated (and given noise): 'conv' the 4-D convolution weights "
                                "only, as the authors' code; 'all' every encoder parameter (default: %(default)s)")
        add_window_args(group, "ogm", 0, 50)

    @classmethod
    def check_args(cls, args) -> None:
        super().check_args(args)
        require([(args.ogm_alpha >= 0, f"--ogm_alpha must be >= 0, got {args.ogm_alpha}")]
                + window_rules(args, "ogm"))

    def __init__(self, args, model, info):
        super().__init__(args, model, info)
        self.step = 0
        encoders = unwrap(model).encoders
        self.params: Dict[str, List[nn.Parameter]] = {
            m: modulated_parameters(encoders[m], args.ogm_params) for m in info.modality_names}
        untouched = [m for m, ps in self.params.items() if not ps]
        if untouched:
            warnings.warn(f"--method {self.name} with --ogm_params {args.ogm_params}: the encoders of {untouched} "
                          f"have no convolution weight, so OGM never modulates them (the authors' rule); "
                          f"--ogm_params all modulates every encoder parameter", stacklevel=2)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "step": self.step}

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        self.step = int(state.get("step", 0))

    def noise_generator(self, epoch: int, device) -> torch.Generator:
        """The generator of the next step's noise: seeded by run seed, epoch and step count, so every
        process draws the same noise and replicas stay equal."""
        gen = torch.Generator(device=device)
        gen.manual_seed(hash((getattr(self.args, "random_seed", 0), epoch, self.step)) % 2**63)
        return gen

    def before_step(self, model, out, labels, epoch):
        if not in_window(epoch, self.args.ogm_starts, self.args.ogm_ends):
            return {}
        uni = require_unimodal_logits(out, self.name)
        # Scores summed over every process's samples: all processes scale by the same k.
        scores = dist.all_reduce_dict({m: true_class_score(uni[m], labels) for m in uni}, labels.device)
        coeff, rho = ogm_coefficients(scores, self.args.ogm_alpha, self.args.ogm_formula)
        gen = self.noise_generator(epoch, labels.device) if self.noise else None
        self.step += 1
        with torch.no_grad():
            for m, k in coeff.items():
                for p in self.params[m]:
                    if p.grad is None:
                        continue
                    # The noise's std is the original gradient's, taken before the scaling.
                    std = p.grad.std() if gen is not None and p.grad.numel() > 1 else None
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
