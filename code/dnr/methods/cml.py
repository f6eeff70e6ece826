"""CML: Calibrating Multimodal Learning (Ma, Zhang, Zhang, Wu, Fu, Zhou & Hu, ICML 2023).

Principle: a prediction's confidence should not rise when a modality is removed. Confidence is the
largest softmax probability.

Checked against the authors' released code: QingyangZhang/CML at 9d2496e, `miwae/train.py`
(`get_mean` L18-30, `get_multi_mask` L67-86, arguments L122-141, the training step L221-307) and
`cpm/CPM_Nets.py` (`rank_loss` L98-124, its use L159-174); `miwae/batch_train.py` and
`cpm/batch_train.py` (the weights they sweep), `readme.md` (the command `--beta 10`). Their code
covers two incomplete-view models (MIWAE, CPM-Nets) on vector data; no audio-visual or late-fusion
code is released, so how a modality is removed from our encoder + fusion model is ours (below).
The mechanics below are theirs (the MIWAE script their readme runs) unless a flag says otherwise.

One step, with M modalities:
  1. one ordinary forward pass gives the pooled features z_m and the fused logits;
  2. each sample draws its own random order of the modalities; input k (k = 0 .. M-1) is the sample
     with the first k modalities of its order removed, so every input lacks one more modality than
     the one before it (input 0 is the full sample, input M-1 keeps one modality);
  3. for every input: logits_k (the fusion head on its features), confidence c_k = max softmax,
     prediction p_k = argmax;
  4. ranking loss, summed over the batch (not averaged) and over k = 0 .. M-2:
         relu((c_{k+1} - c_k) * [p_k = y] - eps)
       + relu((c_{k+1} - detach(c_k)) * [p_k != y and p_{k+1} != y] - eps)
     (when the fuller input is right, both confidences move; when both are wrong, only the
     reduced input's confidence is pushed down; when only the reduced input is right, nothing);
  5. loss = mean over k of CE(logits_k, y) + lambda * ranking loss. Their loss weight is
     `--beta` / 100 (their readme: `--beta 10`, so lambda = 0.1, the default here; their scripts
     sweep beta 0-75), eps is their `--epsilon` (0). It applies at every step of their second stage
     (their first stage trains only the MIWAE reconstruction, which our models do not have).

How a modality is removed: their MIWAE replaces a missing view's input by the training set's
mean of that view (a constant); their classifier is a network on the concatenated views. Here the
classifier on the concatenated views is the fusion head, so a removed modality's *pooled feature*
is replaced by a constant, with no gradient: by default the batch mean of that modality's features
(`--cml_impute mean`), or zeros (`--cml_impute zero`; for concat fusion, the head without that
modality's slice). No encoder is run again.

Remaining differences and their flags:
  - `--cml_rule cpm`: the rule of their CPM-Nets code, relu((c_{k+1} - c_k) * s - eps) with s = 0 only
    where the reduced input is right and the fuller one wrong, both confidences moving (there the
    weight is used as is, not divided by 100: give `--cml_lambda` accordingly).
  - `--cml_ce full`: cross-entropy on the full input only (theirs averages it over the M inputs).
  - `--cml_impute`: see above (input-level mean imputation would need the training mean of every
    modality's raw input and evaluation-mode encoder passes; not implemented).
  - One optimiser step per batch, as every method here: their MIWAE script takes 5 steps on each
    batch (same masks; `step = [0, 0, 5]`), their CPM-Nets code 5 full-batch steps per epoch.
  - Under DistributedDataParallel each process draws its own orders and takes its own batch mean.
  - Three or more modalities: the chain of step 2 has M inputs, as in their code for any number of
    views.
  - Evaluation protocol (ours for every method): the model is selected on val with all modalities
    present (theirs selects on the summed test accuracy of the M inputs).
"""
from __future__ import annotations

import argparse
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models import unwrap
from .base import Method, register_method
from .common import require

RULES = ("miwae", "cpm")
IMPUTE = ("mean", "zero")
CE = ("all", "full")


def removal_orders(batch: int, modalities: int, device) -> Tensor:
    """(B, M): each row a random order in which that sample's modalities are removed."""
    return torch.rand(batch, modalities, device=device).argsort(1)


def reduced_features(features: Dict[str, Tensor], orders: Tensor, impute: str = "mean") -> List[Dict[str, Tensor]]:
    """The M inputs of the chain: input k has, for every sample, the first k modalities of its order
    replaced by a constant without gradient (the batch mean of that modality's features, or zeros)."""
    names = list(features)
    position = orders.argsort(1)  # (B, M): where each modality sits in its sample's order
    fill = {m: (z.detach().mean(0, keepdim=True) if impute == "mean" else torch.zeros_like(z[:1]))
            for m, z in features.items()}
    chain = []
    for k in range(len(names)):
        removed = position < k  # (B, M)
        chain.append({m: torch.where(removed[:, j, None], fill[m].to(z.dtype), z)
                      for j, (m, z) in enumerate(features.items())})
    return chain


def ranking_loss(logits: Sequence[Tensor], labels: Tensor, rule: str = "miwae", eps: float = 0.0) -> Tensor:
    """The CML penalty on consecutive inputs of the chain (fuller first), summed over the batch."""
    conf, pred = [], []
    for lg in logits:
        c, p = torch.softmax(lg.float(), 1).max(1)
        conf.append(c)
        pred.append(p)
    total = logits[0].new_zeros((), dtype=torch.float32)
    for k in range(len(logits) - 1):
        fuller_right, reduced_right = pred[k] == labels, pred[k + 1] == labels
        if rule == "miwae":
            total = total + F.relu((conf[k + 1] - conf[k]) * fuller_right - eps).sum()
            both_wrong = ~fuller_right & ~reduced_right
            total = total + F.relu((conf[k + 1] - conf[k].detach()) * both_wrong - eps).sum()
        else:
            keep = ~(reduced_right & ~fuller_right)
            total = total + F.relu((conf[k + 1] - conf[k]) * keep - eps).sum()
    return total


@register_method
class CML(Method):
    name = "cml"
    help = "CML (ICML 2023): penalise confidence that rises when modalities are removed"
    min_modalities = 2

    @classmethod
    def add_args(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--cml_lambda", type=float, default=0.1,
                           help="weight of the ranking loss (summed over the batch); the authors' readme runs "
                                "--beta 10, applied as beta / 100 (default: %(default)s)")
        group.add_argument("--cml_rule", choices=RULES, default="miwae",
                           help="which samples are penalised: the authors' MIWAE code (fuller input right: both "
                                "confidences; both wrong: the reduced one only) or their CPM-Nets code (all but "
                                "reduced right and fuller wrong) (default: %(default)s)")
        group.add_argument("--cml_margin", type=float, default=0.0,
                           help="tolerance eps in relu(confidence increase - eps), a probability (the authors' "
                                "--epsilon) (default: %(default)s)")
        group.add_argument("--cml_impute", choices=IMPUTE, default="mean",
                           help="a removed modality's pooled feature becomes the batch mean of that modality's "
                                "features or zeros, without gradient (default: %(default)s)")
        group.add_argument("--cml_ce", choices=CE, default="all",
                           help="cross-entropy averaged over the full and every reduced input (the authors' code) "
                                "or on the full input only (default: %(default)s)")

    @classmethod
    def check_args(cls, args) -> None:
        super().check_args(args)
        require([(args.cml_lambda >= 0, f"--cml_lambda must be >= 0, got {args.cml_lambda}"),
                 (args.cml_margin >= 0, f"--cml_margin must be >= 0, got {args.cml_margin}")])

    def loss(self, out, labels, epoch):
        net = unwrap(self.model)
        orders = removal_orders(labels.shape[0], len(out.features), labels.device)
        chain = reduced_features(out.features, orders, self.args.cml_impute)
        logits = [out.logits] + [net.head(f).logits for f in chain[1:]]
        ce_terms = [F.cross_entropy(lg, labels) for lg in logits]
        ce = ce_terms[0] if self.args.cml_ce == "full" else torch.stack(ce_terms).mean()
        rank = ranking_loss(logits, labels, self.args.cml_rule, self.args.cml_margin)
        logs = {"loss_ce": float(ce.detach()), "cml_rank": float(rank.detach())}
        logs.update({f"cml_ce_drop{k}": float(t.detach()) for k, t in enumerate(ce_terms) if k > 0})
        return ce + self.args.cml_lambda * rank, logs
