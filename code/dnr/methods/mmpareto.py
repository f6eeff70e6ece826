"""MMPareto (Wei & Hu, ICML 2024): Pareto integration of multimodal and uni-modal gradients.

Checked against the authors' released code: GeWu-Lab/MMPareto_ICML2024 at a339db3,
`code/MMPareto.py` `train_epoch` (L57-213), `code/models/models.py` `AVClassifier` (L133-184) and
`code/min_norm_solvers.py` (L9-58, L92-129). The mechanics below are theirs unless a flag says
otherwise.

The method builds its own uni-modal heads, one Linear(D_m, C) per modality (`unimodal_heads`,
PyTorch's default initialisation, as theirs), beside the fusion head. Losses, one forward pass:
L_mm = CE(fused logits) and L_m = CE(head_m(z_m)). For the encoder of modality m, with g_mm and
g_m the gradients of L_mm and L_m over all its parameters (one flattened vector each):
  cos(g_mm, g_m) > 0 (strictly):  weights (w_mm, w_m) = (1/2, 1/2);
  otherwise:                      the min-norm weights of the two vectors (MGDA for two tasks),
                                  w_mm = (||g_m||^2 - g_mm . g_m) / ||g_mm - g_m||^2, w_m = 1 - w_mm.
Then tensor by tensor t of that encoder: n_t = 2 (w_mm g_mm,t + w_m g_m,t) is scaled up to the norm
of the plain sum (g_mm + g_m)_t when it is smaller, and multiplied by gamma = 1.5 (in both cases, so
every encoder step is at least 1.5 times the plain sum's). The heads keep their own loss's gradient:
the fusion head gets that of L_mm only, head_m that of L_m only. Weight decay is added by the
optimiser afterwards, so the 1.5 never scales it.

Because the uni-modal logits come from the method's own heads, it works with every fusion.

Remaining differences and their flags:
  - `--mmpareto_gamma` (default 1.5, the code's hard-coded value; 1 = no extra factor).
  - `--mmpareto_rescale vector` scales the whole encoder vector once, up to ||g_mm + g_m||, instead
    of tensor by tensor (this project's earlier default, with gamma 1).
  - Earlier versions of this project took the uni-modal logits from the fusion head's slices, so
    the fusion head also learnt from the uni-modal losses; that variant is gone.
  - A tensor whose integrated gradient is exactly zero stays zero (their ratio would be 0/0).
  - Three or more modalities (their code has two): every encoder still has exactly two tasks, L_mm
    and its own L_m, so the same two-task rule applies per encoder.
  - Under DistributedDataParallel each process integrates its own gradients, then they are averaged.
  - Evaluation protocol (ours for every method): the model is selected on val; their StepLR is
    created but never stepped, our schedule is the run's.
"""
from __future__ import annotations

import argparse
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed as dist
from ..models import unwrap
from .base import Method, register_method
from .common import add_unimodal_heads


def pareto_weights(g_mm: Tensor, g_uni: Tensor) -> Tuple[float, float, float]:
    """(w_mm, w_uni, cosine) for two flattened gradients, as described in the module docstring."""
    cos = float(F.cosine_similarity(g_mm, g_uni, dim=0))
    if cos > 0:
        return 0.5, 0.5, cos
    diff = g_mm - g_uni
    denom = float(diff.dot(diff))
    w_mm = 0.5 if denom == 0 else min(max(float((g_uni - g_mm).dot(g_uni)) / denom, 0.0), 1.0)
    return w_mm, 1.0 - w_mm, cos


def rescaled(new: Tensor, plain_sum: Tensor) -> Tensor:
    """`new` scaled up to the norm of `plain_sum` when it is smaller (never down)."""
    norm, target = torch.linalg.vector_norm(new), torch.linalg.vector_norm(plain_sum)
    return new * (target / norm) if 0 < norm < target else new


def integrate(g_mm: List[Tensor], g_uni: List[Tensor], gamma: float = 1.5,
              per_tensor: bool = True) -> Tuple[List[Tensor], Dict[str, float]]:
    """One encoder's integrated gradient, tensor by tensor, from its per-tensor gradients of L_mm and L_m."""
    def flat(tensors):
        return torch.cat([t.flatten() for t in tensors])

    w_mm, w_uni, cos = pareto_weights(flat(g_mm), flat(g_uni))
    new = [2 * (w_mm * a + w_uni * b) for a, b in zip(g_mm, g_uni)]
    plain = [a + b for a, b in zip(g_mm, g_uni)]
    if per_tensor:
        new = [rescaled(n, s) for n, s in zip(new, plain)]
    else:
        whole = rescaled(flat(new), flat(plain))
        new = [part.view_as(n) for part, n in zip(whole.split([n.numel() for n in new]), new)]
    return [n * gamma for n in new], {"w_mm": w_mm, "w_uni": w_uni, "cos": cos}


@register_method
class MMPareto(Method):
    name = "mmpareto"
    help = "MMPareto (ICML 2024): Pareto integration of multimodal and uni-modal gradients"
    min_modalities = 2

    @classmethod
    def add_args(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--mmpareto_gamma", type=float, default=1.5,
                           help="factor on every integrated encoder gradient; the authors' code hard-codes "
                                "1.5 (default: %(default)s)")
        group.add_argument("--mmpareto_rescale", choices=("tensor", "vector"), default="tensor",
                           help="scale the integrated gradient up to the plain sum's norm tensor by tensor (the "
                                "authors' code) or over the encoder's whole vector (default: %(default)s)")

    @classmethod
    def check_args(cls, args) -> None:
        super().check_args(args)
        if args.mmpareto_gamma <= 0:
            raise ValueError(f"--mmpareto_gamma must be > 0, got {args.mmpareto_gamma}")
        if getattr(args, "amp", "off") == "fp16":
            raise ValueError("--method mmpareto computes per-loss gradients itself and does not work with "
                             "--amp fp16's loss scaling; use --amp bf16 or off")

    @classmethod
    def build_model(cls, info, **model_args) -> nn.Module:
        model = super().build_model(info, **model_args)
        # The uni-modal heads are the method's, not slices of the fusion head (the authors' head_audio, head_video).
        return add_unimodal_heads(model, info.num_classes, info.modality_names)

    def unimodal_losses(self, out, labels) -> Dict[str, Tensor]:
        heads = unwrap(self.model).unimodal_heads
        return {m: F.cross_entropy(heads[m](out.features[m]), labels) for m in heads}

    def loss(self, out, labels, epoch):
        mm = F.cross_entropy(out.logits, labels)
        self._uni = self.unimodal_losses(out, labels)
        logs = {"loss_mm": float(mm.detach())}
        logs.update({f"loss_{m}": float(v.detach()) for m, v in self._uni.items()})
        self._mm = mm
        return mm + sum(self._uni.values()), logs

    def backward(self, loss, out, labels, model):
        encoders = unwrap(model).encoders
        params: Dict[str, List[Tensor]] = {m: [p for p in encoders[m].parameters() if p.requires_grad]
                                           for m in self._uni}
        all_enc = [p for m in params for p in params[m]]

        def grads(value, wrt):
            got = torch.autograd.grad(value, wrt, retain_graph=True, allow_unused=True)
            return [g if g is not None else torch.zeros_like(p) for g, p in zip(got, wrt)]

        g_mm_all = grads(self._mm, all_enc)
        g_mm, start = {}, 0
        for m in params:
            g_mm[m] = g_mm_all[start:start + len(params[m])]
            start += len(params[m])
        g_uni = {m: grads(self._uni[m], params[m]) for m in params}
        # One backward of the sum: each head gets its own loss's gradient (and DDP its reduction).
        loss.backward()
        self._last = {}
        with torch.no_grad():
            for m in params:
                new, info = integrate(g_mm[m], g_uni[m], self.args.mmpareto_gamma,
                                      per_tensor=self.args.mmpareto_rescale == "tensor")
                for p, g in zip(params[m], new):
                    p.grad = g
                self._last.update({f"mmpareto_{k}_{m}": v for k, v in info.items()})
        # Under DistributedDataParallel each process integrates its own gradients; average them.
        dist.average_gradients(all_enc)

    def before_step(self, model, out, labels, epoch):
        return dict(getattr(self, "_last", {}))
