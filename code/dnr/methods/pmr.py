"""PMR: prototypical modal rebalance (Fan et al., CVPR 2023).

Checked against the authors' released code: fanyunfeng-bit/Modal-Imbalance-PMR at 3615e48,
`main_Prototype_grad.py` (`EU_dist` L69-75; `train_epoch` L91-288: prototype logits, scores and
losses L152-186; `calculate_prototype` L383-441; when prototypes are made L532-557) and `bash.sh`
(the CREMA-D commands). The mechanics below are theirs unless a flag says otherwise.

Prototypes: before every epoch (the authors: once before training and after every epoch's
training, which sees the same weights and BatchNorm statistics), with the model in evaluation mode
and no gradient, the pooled features z_m of the first len(loader) // 10 training batches (at least
one) are averaged per class: c_m^k. Those batches come from the training loader with the training
transform (augmentation); here they are the first batches of the epoch's own shuffled order, freshly
augmented (the authors' loader draws a new shuffle: another random tenth of the same kind). From the
third computation on (0-based epoch 2: the authors apply it when their call's epoch argument is
above 0), P <- (1 - momentum) P_new + momentum P_old with `--pmr_momentum` (their scripts: 0.0,
the default here; their argument default: 0.2).

Each step: prototype logits p_m[i, k] = -||z_m,i - c_m^k|| (Euclidean, not squared; prototypes
constant); S_m = sum over the batch of softmax(p_m)[y]; rho = S_m / S_other. Inside the window
(0-based epochs), loss = CE(fused logits) + alpha * CE(p_m) for the weaker modality (rho_m < 1;
nothing at an exact tie), alpha used as is (their scripts: 2.0 for CREMA-D with concat fusion).

Remaining differences and their flags:
  - `--pmr_prototypes full`: prototypes from every training sample with the evaluation transform
    (this project's earlier default) instead of the sampled tenth.
  - `--pmr_distance squared`: minus the squared distance (as prototypical networks do). Its
    gradient grows with the distance; on the built-in dataset with the demo settings (SGD, lr
    0.01) every seed diverged to a NaN loss by epoch 5. The Euclidean distance's gradient is
    bounded (a unit vector per prototype); its square root is clamped at 1e-12 so a feature sitting
    on a prototype has a finite gradient (theirs: NaN).
  - `--pmr_entropy mu > 0` adds mu * (-entropy of the prototype distribution) for the dominant
    modality: our reading of the paper's entropy regulariser, which the released code does not have.
  - A class absent from the sampled batches keeps its previous prototype (zero before the first);
    theirs becomes NaN (0 / 0).
  - Three or more modalities (their code has two): rho_m compares S_m with the mean S of the
    others; every modality with rho_m < 1 gets the prototype loss.
  - Under DistributedDataParallel the sampled features of every process are gathered, so all
    processes hold the same prototypes.
  - Evaluation protocol (ours for every method): the model is selected on val; the optimiser and
    schedule are the run's (their CREMA-D concat scripts use Adam or AdaGrad, lr 1e-3).
"""
from __future__ import annotations

import argparse
from typing import Dict, Iterable, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import distributed as dist
from ..models import unwrap
from ..stepping import Batch
from .base import Method, register_method
from .common import add_window_args, in_window, ratio_to_others, require, true_class_score, window_rules


def class_prototypes(features: Tensor, labels: Tensor, num_classes: int,
                     previous: Optional[Tensor] = None) -> Tensor:
    """(N, D) features and (N,) labels -> (C, D) class means; a class with no sample keeps its row
    of `previous` (zero without one)."""
    one_hot = F.one_hot(labels.to(features.device), num_classes).to(features.dtype)  # (N, C)
    counts = one_hot.sum(0)  # (C,)
    means = (one_hot.t() @ features) / counts.clamp_min(1)[:, None]
    fallback = torch.zeros_like(means) if previous is None else previous.to(means)
    return torch.where(counts[:, None] > 0, means, fallback)


@torch.no_grad()
def sampled_features(model, batches: Iterable[Batch], count: int) -> Tuple[Dict[str, Tensor], Tensor]:
    """Pooled features ({m: (N, D)}) and labels (N,) of the first `count` batches, the model in
    evaluation mode (and back in its former mode afterwards), gathered over processes."""
    net = unwrap(model)
    was_training = net.training
    net.eval()
    feats, labels = {}, []
    try:
        for i, batch in enumerate(batches):
            if i >= count:
                break
            for m, f in net.encode(batch.inputs).items():
                feats.setdefault(m, []).append(f.float())
            labels.append(batch.labels)
    finally:
        net.train(was_training)
    return ({m: dist.all_gather_cat(torch.cat(f)) for m, f in feats.items()},
            dist.all_gather_cat(torch.cat(labels)))


def prototype_logits(features: Tensor, prototypes: Tensor, squared: bool = False) -> Tensor:
    """-(Euclidean distance) of each feature (B, D) to each prototype (C, D) -> (B, C); its square
    with `squared`."""
    diff = features[:, None, :] - prototypes.to(features.dtype)[None]  # (B, C, D)
    d2 = (diff * diff).sum(-1)
    # The clamp keeps the square root's gradient finite for a feature sitting on a prototype.
    return -d2 if squared else -d2.clamp_min(1e-12).sqrt()


@register_method
class PMR(Method):
    name = "pmr"
    help = "PMR (CVPR 2023): prototype cross-entropy for the weaker modality"
    min_modalities = 2

    @classmethod
    def add_args(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--pmr_alpha", type=float, default=1.0,
                           help="weight of the weaker modality's prototype cross-entropy; the authors' CREMA-D "
                                "concat scripts use 2.0 (default: %(default)s)")
        group.add_argument("--pmr_momentum", type=float, default=0.0,
                           help="prototype momentum, P = (1 - m) P_new + m P_old from 0-based epoch 2 on; the "
                                "authors' scripts use 0.0, their argument default is 0.2 (default: %(default)s)")
        group.add_argument("--pmr_prototypes", choices=("sampled", "full"), default="sampled",
                           help="prototypes from the first tenth of the epoch's training batches, augmented, "
                                "BatchNorm in evaluation mode (the authors' code), or from every training "
                                "sample with the evaluation transform (default: %(default)s)")
        group.add_argument("--pmr_entropy", type=float, default=0.0,
                           help="weight mu of the dominant modality's entropy regulariser (the paper's; not in "
                                "the authors' code); 0 disables (default: %(default)s)")
        group.add_argument("--pmr_distance", choices=("euclidean", "squared"), default="euclidean",
                           help="prototype logits: minus the Euclidean distance (the authors' code) or "
                                "minus its square (default: %(default)s)")
        add_window_args(group, "pmr", 0, None)

    @classmethod
    def check_args(cls, args) -> None:
        super().check_args(args)
        require([(args.pmr_alpha >= 0, f"--pmr_alpha must be >= 0, got {args.pmr_alpha}"),
                 (0 <= args.pmr_momentum < 1, f"--pmr_momentum must lie in [0, 1), got {args.pmr_momentum}"),
                 (args.pmr_entropy >= 0, f"--pmr_entropy must be >= 0, got {args.pmr_entropy}")]
                + window_rules(args, "pmr"))

    def __init__(self, args, model, info):
        super().__init__(args, model, info)
        self.prototypes: Dict[str, Tensor] = {}

    def on_epoch_start(self, epoch, ctx):
        if self.args.pmr_prototypes == "sampled":
            count = max(len(ctx.train_loader) // 10, 1)
            feats, labels = sampled_features(ctx.model, ctx.train_batches(epoch), count)
        else:
            feats, labels = ctx.extract_features("train")
        self.prototypes = self.updated_prototypes(feats, labels, epoch)

    def updated_prototypes(self, feats: Mapping[str, Tensor], labels: Tensor, epoch: int) -> Dict[str, Tensor]:
        """This epoch's prototypes from the new features; the momentum from 0-based epoch 2 on (the
        authors' first two computations, before training and after epoch 0, take none)."""
        new = {m: class_prototypes(f, labels, self.info.num_classes, self.prototypes.get(m))
               for m, f in feats.items()}
        m = self.args.pmr_momentum
        if epoch < 2 or m == 0 or not self.prototypes:
            return new
        return {k: (1 - m) * p + m * self.prototypes[k].to(p) for k, p in new.items()}

    def loss(self, out, labels, epoch):
        loss = F.cross_entropy(out.logits, labels)
        if not self.prototypes or not in_window(epoch, self.args.pmr_starts, self.args.pmr_ends):
            return loss, {}
        squared = self.args.pmr_distance == "squared"
        proto = {m: prototype_logits(out.features[m], self.prototypes[m], squared) for m in out.features}
        rho = ratio_to_others({m: true_class_score(p, labels) for m, p in proto.items()})
        logs = {f"pmr_ratio_{m}": r for m, r in rho.items()}
        for m, r in rho.items():
            if r < 1:
                pce = F.cross_entropy(proto[m], labels)
                loss = loss + self.args.pmr_alpha * pce
                logs[f"pmr_pce_{m}"] = float(pce.detach())
            elif r > 1 and self.args.pmr_entropy > 0:
                p = torch.softmax(proto[m], 1)
                neg_entropy = (p * torch.log(p.clamp_min(1e-12))).sum(1).mean()
                loss = loss + self.args.pmr_entropy * neg_entropy
        return loss, logs

    def state_dict(self) -> dict:
        return {**super().state_dict(), "prototypes": self.prototypes}

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        self.prototypes = dict(state.get("prototypes", {}))
