"""MMPareto (Wei & Hu, ICML 2024): Pareto integration of multimodal and uni-modal gradients.

Losses: L_mm = CE(fused logits) and, per modality, L_m = CE(its head-slice logits). For the
encoder of modality m, with g_mm = grad of L_mm and g_m = grad of L_m (over all the encoder's
parameters as one vector):
  cos(g_mm, g_m) >= 0:  weights (1/2, 1/2);
  otherwise:            the min-norm weights (gamma, 1 - gamma) of the two vectors,
                        gamma = clip((g_m - g_mm) . g_m / ||g_mm - g_m||^2, 0, 1);
  g = 2 (w_mm g_mm + w_m g_m), rescaled up to ||g_mm + g_m|| when it is smaller (so the
  integration never shrinks the step), times --mmpareto_gamma.
Parameters outside the encoders (the fusion head) get the gradient of L_mm + sum_m L_m.

Paper vs the authors' code: the code rescales tensor by tensor and multiplies by 1.5; we rescale
the encoder's whole gradient vector and default the extra factor to 1 (--mmpareto_gamma 1.5 for
theirs).
"""
from __future__ import annotations

import argparse
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import distributed as dist
from ..models import unwrap
from .base import Method, register_method
from .common import require_unimodal_logits


def pareto_weights(g_mm: Tensor, g_uni: Tensor) -> Tuple[float, float, float]:
    """(w_mm, w_uni, cosine) for two flattened gradients, as described in the module docstring."""
    cos = float(F.cosine_similarity(g_mm, g_uni, dim=0, eps=1e-12))
    if cos >= 0:
        return 0.5, 0.5, cos
    diff = g_mm - g_uni
    denom = float(diff.dot(diff))
    gamma = 0.5 if denom == 0 else min(max(float((g_uni - g_mm).dot(g_uni)) / denom, 0.0), 1.0)
    return gamma, 1.0 - gamma, cos


def combine(g_mm: Tensor, g_uni: Tensor, gamma_scale: float = 1.0) -> Tuple[Tensor, Dict[str, float]]:
    w_mm, w_uni, cos = pareto_weights(g_mm, g_uni)
    g = 2 * (w_mm * g_mm + w_uni * g_uni)
    target = torch.linalg.vector_norm(g_mm + g_uni)
    norm = torch.linalg.vector_norm(g)
    if norm > 0 and target > norm:
        g = g * (target / norm)
    return g * gamma_scale, {"w_mm": w_mm, "w_uni": w_uni, "cos": cos}


@register_method
class MMPareto(Method):
    name = "mmpareto"
    help = "MMPareto (ICML 2024): Pareto integration of multimodal and uni-modal gradients"

    @classmethod
    def add_args(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--mmpareto_gamma", type=float, default=1.0,
                           help="extra factor on the integrated encoder gradient (the authors' code "
                                "used 1.5) (default: %(default)s)")

    @classmethod
    def check_args(cls, args) -> None:
        super().check_args(args)
        if args.mmpareto_gamma <= 0:
            raise ValueError(f"--mmpareto_gamma must be > 0, got {args.mmpareto_gamma}")
        if getattr(args, "amp", "off") == "fp16":
            raise ValueError("--method mmpareto computes per-loss gradients itself and does not work with "
                             "--amp fp16's loss scaling; use --amp bf16 or off")

    def loss(self, out, labels, epoch):
        uni = require_unimodal_logits(out, self.name)
        mm = F.cross_entropy(out.logits, labels)
        total = mm + sum(F.cross_entropy(u, labels) for u in uni.values())
        return total, {"loss_mm": float(mm.detach())}

    def backward(self, loss, out, labels, model):
        net = unwrap(model)
        uni = require_unimodal_logits(out, self.name)
        params: Dict[str, List[Tensor]] = {m: [p for p in net.encoders[m].parameters() if p.requires_grad]
                                           for m in uni}
        mm = F.cross_entropy(out.logits, labels)
        flat_mm = {}
        all_enc = [p for m in uni for p in params[m]]
        grads = torch.autograd.grad(mm, all_enc, retain_graph=True, allow_unused=True)
        i = 0
        for m in uni:
            n = len(params[m])
            flat_mm[m] = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                                    for g, p in zip(grads[i:i + n], params[m])])
            i += n
        flat_uni = {}
        for m, logits in uni.items():
            g = torch.autograd.grad(F.cross_entropy(logits, labels), params[m], retain_graph=True, allow_unused=True)
            flat_uni[m] = torch.cat([(x if x is not None else torch.zeros_like(p)).flatten()
                                     for x, p in zip(g, params[m])])
        loss.backward()  # the head (and anything else) gets the gradient of the summed losses
        self._last = {}
        with torch.no_grad():
            for m in uni:
                new, info = combine(flat_mm[m], flat_uni[m], self.args.mmpareto_gamma)
                offset = 0
                for p in params[m]:
                    n = p.numel()
                    p.grad = new[offset:offset + n].view_as(p).clone()
                    offset += n
                self._last.update({f"mmpareto_{k}_{m}": v for k, v in info.items()})
        # Under DistributedDataParallel each process integrates its own gradients; average them.
        dist.average_gradients([p for m in uni for p in params[m]])

    def before_step(self, model, out, labels, epoch):
        return dict(getattr(self, "_last", {}))
