"""MBSD: uni-modal losses plus a sample-weighted self-distillation between the modalities' predictions
(the method GeWu-Lab/BalanceBenchmark lists as "MBSD" among its objective methods).

Provenance. BalanceBenchmark (Xu, Cui, Huang, Wang, Hu, arXiv 2502.10816) names MBSD without a
citation in its repository; no paper or authors' repository of that name was found (searched: the
BalanceBenchmark repository and README, GeWu-Lab's list of balanced multimodal learning papers,
public code for the loss's distinctive lines). The only earlier public code is
xushaoxuan123/new-imbalance_leaderboard at 508a7b3, the benchmark's first author's pre-release
leaderboard: `models/MSBD/MSBD_main.py` `train_epoch` (L21-120, the method is called "MSBD" there:
uni-modal logits L58-62, losses L82-87, the window's terms L88-113), `train_model/MSBD_train.py`
(L19-49, the epoch loop) and `main.py` (L46-58, the defaults). It is not an authors' release (as
committed, its entry point builds a classifier without the `head` the step reads), but it is what
BalanceBenchmark's `balancemm/trainer/MBSD_trainer.py` (at 4c1482f) copies, and so what BalanceMM's
MBSD numbers come from; the mechanics below are that code's. The "modality-wise normalization on
weight and feature" that both files mention is a comment left over from MMCosine: the leaderboard
code normalises only when the method is MMCosine (L47-57), BalanceMM's MBSD not at all; there is no
normalisation here.

One step, with s_m modality m's logits from the fusion head (concat: its slice of the weight plus
bias / M, exactly their `out_a`, `out_v`; sum fusion: its own Linear), p_m = softmax(s_m)[y]:
  inside the window   L = CE(fused) + sum_m CE(s_m) + (1/B) sum_i w_i (RS_i + KL_i),
  outside it          L = CE(fused)   (the uni-modal losses too are only added inside the window),
where, for the two modalities a and v and each sample i,
  ps_i = max(p_a,i, p_v,i), pw_i = min(p_a,i, p_v,i)           (the stronger and the weaker one),
  w_i  = ps_i - pw_i when either modality's argmax is the label, else 0,
  RS_i = (1/C) sum_k (s_a,ik - s_v,ik)^2                       (squared gap of the logits),
  KL_i = pw_i (log pw_i - ps_i)                                ( = F.kl_div(ps, pw) of the code,
                                                                 which reads ps as a log-probability).
Nothing is detached: w, ps and pw carry gradient, as in their code (they fill zero tensors with
`w[i] = max(...) - min(...)`, an in-place copy that keeps the graph).

Remaining differences and their flags:
  - Window: the leaderboard's defaults are epochs 10 to 60 (`--mbsd_starts 10 --mbsd_ends 60`),
    BalanceMM's 0 to 80; the default here is the whole run, as no paper gives one.
  - Three or more modalities (their code has two): every pair (m, n) gets the term above, and the
    pair terms are averaged, so two modalities give exactly their loss. BalanceMM's three-modality
    branch also averages over pairs, but takes RS on probabilities rather than logits; here it
    stays on logits for every number of modalities.
  - Evaluation protocol (ours for every method): the model is selected on val (the leaderboard
    selects on test); optimiser and schedule are the run's.
"""
from __future__ import annotations

import argparse
import itertools
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Method, register_method
from .common import add_window_args, in_window, require, require_unimodal_logits, window_rules


def pair_distillation(s_m: Tensor, s_n: Tensor, labels: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """(1/B sum_i w_i RS_i, 1/B sum_i w_i KL_i, mean w) for one pair of modalities' logits (B, C)."""
    p_m = torch.softmax(s_m, 1).gather(1, labels[:, None]).squeeze(1)  # (B,)
    p_n = torch.softmax(s_n, 1).gather(1, labels[:, None]).squeeze(1)
    strong, weak = torch.maximum(p_m, p_n), torch.minimum(p_m, p_n)
    with torch.no_grad():
        hit = (s_m.argmax(1) == labels) | (s_n.argmax(1) == labels)
    w = torch.where(hit, strong - weak, torch.zeros_like(strong))  # gradient kept, as theirs
    rs = (s_m - s_n).pow(2).mean(1)  # (1/C) sum over classes
    kl = torch.xlogy(weak, weak) - weak * strong  # F.kl_div(input=strong, target=weak), elementwise
    return (w * rs).mean(), (w * kl).mean(), w.detach().mean()


@register_method
class MBSD(Method):
    name = "mbsd"
    help = ("MBSD (BalanceBenchmark's objective method): uni-modal losses + weighted logit gap and KL between "
            "the stronger and the weaker modality's true-class probabilities")
    min_modalities = 2

    @classmethod
    def add_args(cls, group: argparse._ArgumentGroup) -> None:
        add_window_args(group, "mbsd", 0, None)

    @classmethod
    def check_args(cls, args) -> None:
        super().check_args(args)
        require(window_rules(args, "mbsd"))

    def loss(self, out, labels, epoch) -> Tuple[Tensor, Dict[str, float]]:
        loss = F.cross_entropy(out.logits, labels)
        if not in_window(epoch, self.args.mbsd_starts, self.args.mbsd_ends):
            return loss, {}
        uni = require_unimodal_logits(out, self.name)
        logs: Dict[str, float] = {}
        for m, s in uni.items():
            ce = F.cross_entropy(s, labels)
            loss = loss + ce
            logs[f"mbsd_ce_{m}"] = float(ce.detach())
        pairs = list(itertools.combinations(uni, 2))
        rs_sum, kl_sum, w_sum = 0.0, 0.0, 0.0
        for m, n in pairs:
            rs, kl, w = pair_distillation(uni[m], uni[n], labels)
            rs_sum, kl_sum, w_sum = rs_sum + rs, kl_sum + kl, w_sum + float(w)
        loss = loss + (rs_sum + kl_sum) / len(pairs)
        logs.update({"mbsd_rs": float(rs_sum.detach()) / len(pairs), "mbsd_kl": float(kl_sum.detach()) / len(pairs),
                     "mbsd_w": w_sum / len(pairs)})
        return loss, logs
