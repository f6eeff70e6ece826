"""AGM: adaptive gradient modulation (Li et al., ICCV 2023), as described in the paper.

Mono-modal responses by Shapley attribution through the fusion head: with z_m the pooled feature
and z_m^0 the feature of an all-zero input of modality m ("the modality removed"), and
h(S) = head(z_j for j in S, z_j^0 for j not in S),
    o_m = sum over subsets S of the other modalities of |S|! (M - |S| - 1)! / M!
          * (h(S + {m}) - h(S))  +  h({}) / M,
so the o_m add up to the fused logits. Because it only needs the head, AGM works with every
fusion (concat, sum, FiLM, gated).
Each step, L_m = CE(o_m, y); ratio_m = exp(mean_{j != m} L_j - L_m) (> 1 when m is ahead); the
"optimal" ratio uses the running means of the L's over all steps so far; encoder m's gradients
are scaled by k_m = exp(alpha * min(optimal_m - ratio_m, 10)): a modality that is ahead of its
usual standing is slowed down, one that is behind is sped up. Then the running means take this
step's L's.

We had no access to the authors' code to compare with; this follows the paper's description.
Zero-input features are computed with the encoder in evaluation mode on a single all-zero sample,
so they do not disturb BatchNorm statistics.
"""
from __future__ import annotations

import argparse
import itertools
import math
from typing import Dict

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import distributed as dist
from ..models import unwrap
from .base import Method, register_method
from .common import add_window_args, in_window, require, window_rules


@torch.no_grad()
def zero_input_features(net, batch_shapes: Dict[str, tuple], device) -> Dict[str, Tensor]:
    """Each encoder's output for one all-zero input, in evaluation mode. (1, D_m) per modality."""
    out = {}
    for m, shape in batch_shapes.items():
        enc = net.encoders[m]
        was_training = enc.training
        enc.eval()
        out[m] = enc(torch.zeros((1,) + tuple(shape), device=device))
        enc.train(was_training)
    return out


@torch.no_grad()
def shapley_responses(head, feats: Dict[str, Tensor], zero: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Exact Shapley decomposition of the fused logits over modalities (2^M head evaluations)."""
    names = list(feats)
    n = len(names)
    batch = next(iter(feats.values())).shape[0]
    cache = {}

    def h(subset):
        key = frozenset(subset)
        if key not in cache:
            cache[key] = head({m: feats[m] if m in key else zero[m].expand(batch, -1) for m in names}).logits
        return cache[key]

    base = h(()) / n
    out = {}
    for m in names:
        others = [j for j in names if j != m]
        total = torch.zeros_like(base)
        for size in range(len(others) + 1):
            weight = math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)
            for subset in itertools.combinations(others, size):
                total += weight * (h(subset + (m,)) - h(subset))
        out[m] = total + base
    return out


def agm_coefficients(losses: Dict[str, float], running: Dict[str, float], alpha: float) -> Dict[str, float]:
    """k_m = exp(alpha * min(optimal_m - ratio_m, 10)) from this step's and the running mono losses."""
    def ratios(values):
        names = list(values)
        return {m: math.exp(sum(values[j] for j in names if j != m) / (len(names) - 1) - values[m])
                for m in names}

    now, optimal = ratios(losses), ratios(running)
    return {m: math.exp(alpha * min(optimal[m] - now[m], 10.0)) for m in losses}


@register_method
class AGM(Method):
    name = "agm"
    help = "AGM (ICCV 2023): Shapley mono-modal responses, gradient scaling from running loss ratios"
    min_modalities = 2

    @classmethod
    def add_args(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--agm_alpha", type=float, default=1.0,
                           help="alpha in k_m = exp(alpha * (optimal ratio - current ratio)) (default: %(default)s)")
        add_window_args(group, "agm", 0, None)

    @classmethod
    def check_args(cls, args) -> None:
        super().check_args(args)
        require([(args.agm_alpha >= 0, f"--agm_alpha must be >= 0, got {args.agm_alpha}")] + window_rules(args, "agm"))

    def __init__(self, args, model, info):
        super().__init__(args, model, info)
        self.shapes = {s.name: tuple(s.shape) for s in info.modalities}
        self.running: Dict[str, float] = {}
        self.steps = 0

    def before_step(self, model, out, labels, epoch):
        if not in_window(epoch, self.args.agm_starts, self.args.agm_ends):
            return {}
        net = unwrap(model)
        zero = zero_input_features(net, self.shapes, labels.device)
        mono = shapley_responses(net.head, {m: f.detach() for m, f in out.features.items()}, zero)
        # Mean over every process's batch: all processes scale by the same k.
        losses = dist.all_reduce_dict({m: float(F.cross_entropy(o, labels)) for m, o in mono.items()},
                                      labels.device, mean=True)
        if not self.running:
            self.running = dict(losses)
        coeff = agm_coefficients(losses, self.running, self.args.agm_alpha)
        self.steps += 1
        self.running = {m: self.running[m] + (losses[m] - self.running[m]) / self.steps for m in losses}
        with torch.no_grad():
            for m, k in coeff.items():
                for p in net.encoders[m].parameters():
                    if p.grad is not None:
                        p.grad.mul_(k)
        logs = {f"agm_coeff_{m}": k for m, k in coeff.items()}
        logs.update({f"agm_mono_loss_{m}": v for m, v in losses.items()})
        return logs

    def state_dict(self) -> dict:
        return {**super().state_dict(), "running": self.running, "steps": self.steps}

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        self.running = dict(state.get("running", {}))
        self.steps = int(state.get("steps", 0))
