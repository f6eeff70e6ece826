"""Sample-level modality valuation with re-sampling (Wei, Feng, Wang, Hu, CVPR 2024, "Enhancing
Multimodal Cooperation via Sample-level Modality Valuation").

Checked against the authors' released code: GeWu-Lab/Valuate-and-Enhance-Multimodal-Cooperation at
7ed12b0, `code/sample_level.py` (`execute_modulation` L75-153: the valuation and when the re-sampled
set is built; `train_epoch` L156-181; `main` L300-341: the schedule), `code/modality_level.py`
(`execute_modulation` L79-179: the modality-level variant), `code/datasets/dataloader.py`
(`AV_KS_Dataset_sample_level` L116-187 and `AV_KS_Dataset_modality_level` L259-318: the copies and
their roles) and `code/models/models.py` (`AVClassifier.forward` L29-72 and `exec_drop` L74-86: the
zeroed features). The mechanics below are theirs unless a difference is listed.

Valuation (once per epoch from the warm-up on, the model in evaluation mode, no gradient, over the
whole training split): for every subset S of the modalities, the fusion head is applied to the
pooled features with those of the modalities outside S set to zero, and the sample's value is
    v_i(S) = |S| if that prediction (argmax) is the label, else 0     (so v_i({}) = 0).
Each modality's contribution is its exact Shapley value for that sample,
    phi_i(m) = sum over S not holding m of |S|! (M - |S| - 1)! / M! (v_i(S + m) - v_i(S)),
which for two modalities is (v(m) + v(all) - v(other)) / 2, in [-0.5, 1.5], and adds up to
v_i(all) (M for a correctly classified sample: a fair share is 1).

Sample level (their main method, `--sample_valuation_level sample`): the epoch trains on every
sample once plus, for each sample and each modality m, copies in which only m's features are kept
(the others' pooled features zeroed before the head, so only m's encoder learns from them):
    1 copy if 0.4 < phi(m) < 1, 2 copies if -0.1 < phi(m) < 0.4, 3 if phi(m) < -0.1, else none.
Modality level (`--sample_valuation_level modality`, their coarse variant): the contributions are
averaged over a random part Z of the training split (`--sample_valuation_part_ratio` of its size,
drawn with replacement); gap_m = 1 - mean phi(m); d = |gap_a - gap_v| * 2/3 * alpha (`linear`;
`tanh` of it, or (|gap_a - gap_v| * 2/3)^1.5 * alpha for `square`, `--sample_valuation_func`);
int(d N) random samples (with replacement) are added as copies keeping only the modality with the
larger gap (a tie: the later modality, as theirs picks visual).

Schedule: epochs 0 .. warmup - 1 train on every sample once (their warm-up); the set of each later
epoch comes from the valuation of the weights that ended the epoch before (theirs runs it after
that epoch's training, on the same weights). Training is ordinary cross-entropy on the fused
logits of each (possibly masked) sample.

Remaining differences and their flags:
  - `--sample_valuation_pass eval`: value the training samples with the evaluation transform
    (the diagnosis's pass) instead of the training transform the authors' valuation loader uses
    (their `train_val_dataset` is a mode="train" dataset: random crops and flips).
  - The valuation also runs during their warm-up epochs, for the log only; here it runs only when
    a set is built (from the end of epoch warmup - 1 on).
  - Three or more modalities (their code has two): the same definition with the exact Shapley
    value over all subsets; a copy keeps one modality and zeroes all others; the modality level
    uses the largest minus the smallest gap and copies for the modality with the largest.
  - Random draws (modality level) come from a generator seeded by (seed, epoch), the same on
    every process and after a resume; theirs from numpy's global state.
  - Evaluation protocol (ours for every method): the model is selected on val; the optimiser and
    schedule are the run's (theirs: Adam, lr 5e-5, step decay by 0.1 every 30 epochs, 60 epochs).
"""
from __future__ import annotations

import argparse
import itertools
import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from .. import distributed as dist
from ..models import unwrap
from ..runtime import epoch_seed, worker_init
from ..stepping import AMP_DTYPES
from .base import Method, register_method
from .common import require

ALL = -1  # role of an original sample: every modality kept; role j >= 0 keeps modality j only


def subset_values(head, features: Mapping[str, Tensor], labels: Tensor, names: Sequence[str],
                  chunk: int = 4096) -> Dict[frozenset, Tensor]:
    """v(S) per sample, (N,) float, for every non-empty subset S of `names`: |S| when the head's
    argmax on the features of S (the others zeroed) is the label, else 0."""
    n = labels.shape[0]
    out = {}
    for size in range(1, len(names) + 1):
        for subset in itertools.combinations(names, size):
            correct = []
            for start in range(0, n, chunk):
                part = {m: features[m][start:start + chunk].float() for m in names}
                part = {m: f if m in subset else torch.zeros_like(f) for m, f in part.items()}
                pred = head(part).logits.argmax(1)
                correct.append((pred == labels[start:start + chunk].to(pred.device)).float().cpu())
            out[frozenset(subset)] = size * torch.cat(correct)
    return out


def shapley_weights(names: Sequence[str]) -> Dict[frozenset, Dict[str, float]]:
    """The coefficient of v(T) in each modality's exact Shapley value, for every subset T: the
    Shapley value is linear in v, so feeding imbalance.shapley_values the indicator of T gives it."""
    from ..imbalance import shapley_values  # here: imbalance imports the engine, which imports methods

    subsets = [frozenset(s) for k in range(len(names) + 1) for s in itertools.combinations(names, k)]
    return {t: shapley_values(lambda s, t=t: float(s == t), names) for t in subsets}


def sample_contributions(values: Mapping[frozenset, Tensor], names: Sequence[str]) -> Tensor:
    """(N, M) per-sample Shapley contributions from `subset_values` (v({}) = 0)."""
    weights = shapley_weights(names)
    n = next(iter(values.values())).shape[0]
    phi = torch.zeros(n, len(names), dtype=torch.float64)
    for t, v in values.items():
        for j, m in enumerate(names):
            phi[:, j] += weights[t][m] * v.double()
    return phi


def copies_for(c: float) -> int:
    """The authors' number of extra copies for a contribution c (their dataset's if/elif chain)."""
    if 0.4 < c < 1:
        return 1
    if -0.1 < c < 0.4:
        return 2
    if c < -0.1:
        return 3
    return 0


def sample_level_pool(phi: Tensor) -> Tuple[List[int], List[int]]:
    """Every sample once (role ALL), then per sample and modality its copies (role = modality)."""
    n, m = phi.shape
    pool, roles = list(range(n)), [ALL] * n
    for i, row in enumerate(phi.tolist()):
        for j in range(m):
            k = copies_for(row[j])
            pool += [i] * k
            roles += [j] * k
    return pool, roles


def modality_level_pool(phi: Tensor, part_ratio: float, alpha: float, func: str,
                        gen: torch.Generator) -> Tuple[List[int], List[int], float]:
    """Every sample once, then int(d N) random samples keeping only the modality with the largest
    gap (1 - its mean contribution over a random part of the split). Returns pool, roles, d."""
    n = phi.shape[0]
    num = int(n * part_ratio)
    part = torch.randint(n, (num,), generator=gen)  # with replacement, as numpy's choice
    gaps = (1.0 - phi[part].mean(0)).tolist()
    spread = (max(gaps) - min(gaps)) / 3 * 2
    if func == "linear":
        d = spread * alpha
    elif func == "tanh":
        d = math.tanh(spread * alpha)
    else:  # square
        d = spread ** 1.5 * alpha
    weak = max(range(len(gaps)), key=lambda j: (gaps[j], j))  # a tie goes to the later modality
    extra = torch.randint(n, (int(d * n),), generator=gen).tolist()
    return list(range(n)) + extra, [ALL] * n + [weak] * len(extra), d


@register_method
class SampleValuation(Method):
    name = "sample_valuation"
    help = ("sample-level modality valuation (CVPR 2024): per-sample Shapley contributions, extra copies "
            "of each sample that train only its low-contributing modality")
    min_modalities = 2

    @classmethod
    def add_args(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--sample_valuation_level", choices=("sample", "modality"), default="sample",
                           help="copies per sample from its own contributions (the authors' main method) or a "
                                "number of random copies from the split's mean contributions (default: %(default)s)")
        group.add_argument("--sample_valuation_warmup", type=int, default=5,
                           help="epochs of plain training before the first re-sampled epoch (default: %(default)s)")
        group.add_argument("--sample_valuation_pass", choices=("train", "eval"), default="train",
                           help="transform of the valuation pass over the training split: the training one "
                                "(the authors') or the evaluation one (default: %(default)s)")
        group.add_argument("--sample_valuation_part_ratio", type=float, default=0.2,
                           help="modality level: fraction of the training split averaged for the mean "
                                "contributions (default: %(default)s)")
        group.add_argument("--sample_valuation_alpha", type=float, default=1.0,
                           help="modality level: scale of the number of copies (default: %(default)s)")
        group.add_argument("--sample_valuation_func", choices=("linear", "tanh", "square"), default="linear",
                           help="modality level: how the gap difference becomes a fraction of copies "
                                "(default: %(default)s)")

    @classmethod
    def check_args(cls, args) -> None:
        super().check_args(args)
        require([(args.sample_valuation_warmup >= 0,
                  f"--sample_valuation_warmup must be >= 0, got {args.sample_valuation_warmup}"),
                 (0 < args.sample_valuation_part_ratio <= 1,
                  f"--sample_valuation_part_ratio must lie in (0, 1], got {args.sample_valuation_part_ratio}"),
                 (args.sample_valuation_alpha >= 0,
                  f"--sample_valuation_alpha must be >= 0, got {args.sample_valuation_alpha}")])

    def __init__(self, args, model, info):
        super().__init__(args, model, info)
        self.pool: Optional[List[int]] = None
        self.roles: Optional[List[int]] = None
        self.step_positions: List[List[int]] = []
        self.step_roles: List[Tensor] = []
        self.keep: Optional[Tensor] = None
        self.summary: Dict[str, object] = {}

    # ------------------------------------------------------------------ valuation
    def valuation_features(self, ctx) -> Tuple[Dict[str, Tensor], Tensor]:
        """Pooled features of every training sample (dataset order, all processes), evaluation mode."""
        if self.args.sample_valuation_pass == "eval":
            return ctx.extract_features("train")
        if ctx.train_loader is None:
            raise ValueError("--method sample_valuation needs the training loader in its TrainContext")
        from ..engine import forward_pass  # the engine imports the methods package

        d = dist.info()
        dataset = ctx.train_loader.dataset
        bs = getattr(self.args, "eval_batch_size", 0) or 2 * self.args.batch_size
        loader = DataLoader(dataset, batch_size=bs, sampler=dist.ShardSampler(len(dataset), d.rank, d.world_size),
                            num_workers=getattr(self.args, "num_workers", 0), worker_init_fn=worker_init)
        transform = ctx.train_transform
        # forward_pass hands its device transform train=False; the valuation sees training inputs.
        augment = None if transform is None else (lambda inputs, train: transform(inputs, True))
        amp = AMP_DTYPES.get(getattr(self.args, "amp", "off"))
        out = forward_pass(ctx.model, loader, ctx.device, head=False, amp=amp, device_transform=augment,
                           desc="valuation")
        return out.features, out.labels

    @torch.no_grad()
    def contributions(self, ctx) -> Tensor:
        net = unwrap(ctx.model)
        feats, labels = self.valuation_features(ctx)
        names = list(net.modalities)
        was_training = net.training
        net.eval()
        try:
            values = subset_values(net.head, feats, labels, names)
        finally:
            net.train(was_training)
        return sample_contributions(values, names)

    def epoch_indices(self, epoch, ctx):
        self.pool, self.roles, self.summary = None, None, {}
        if epoch < self.args.sample_valuation_warmup:
            return None
        names = list(unwrap(ctx.model).modalities)
        phi = self.contributions(ctx)
        self.summary = {"contribution": {m: float(phi[:, j].mean()) for j, m in enumerate(names)}}
        if self.args.sample_valuation_level == "sample":
            pool, roles = sample_level_pool(phi)
        else:
            gen = torch.Generator().manual_seed(epoch_seed(self.args.random_seed, epoch))
            pool, roles, d = modality_level_pool(phi, self.args.sample_valuation_part_ratio,
                                                 self.args.sample_valuation_alpha, self.args.sample_valuation_func, gen)
            self.summary["fraction"] = d
        # Every process trains on rank 0's set (they agree already: the features are gathered).
        self.pool, self.roles = ctx.broadcast((pool, roles) if ctx.is_main else None)
        self.summary["samples"] = len(self.pool)
        self.summary["copies"] = {m: sum(1 for r in self.roles if r == j) for j, m in enumerate(names)}
        return self.pool

    def on_epoch_start(self, epoch, ctx):
        self.step_roles = []
        if self.roles is None:
            return
        sampler = getattr(ctx.train_loader, "batch_sampler", None)
        if not hasattr(sampler, "batch_positions"):
            raise ValueError("--method sample_valuation needs the trainer's EpochBatchSampler (batch_positions)")
        self.step_positions = sampler.batch_positions()
        self.step_roles = [torch.tensor([self.roles[p] for p in batch]) for batch in self.step_positions]

    # ------------------------------------------------------------------ training
    def train_step(self, model, batch, update):
        self.keep = None
        if self.step_roles:
            positions = self.step_positions[batch.step]
            if [self.pool[p] for p in positions] != batch.index.tolist():
                raise RuntimeError(f"sample_valuation: batch {batch.step} of epoch {batch.epoch} is not the one "
                                   f"the sampler planned; the copies' roles would be wrong")
            roles = self.step_roles[batch.step].to(batch.labels.device)
            names = list(unwrap(model).modalities)
            # (B, M): 1 where a modality is kept (originals keep all, a copy only its own)
            self.keep = torch.stack([(roles == ALL) | (roles == j) for j in range(len(names))], 1)
        return super().train_step(model, batch, update)

    def forward(self, model, inputs, labels):
        if self.keep is None:
            return model(inputs)
        keep = self.keep
        names = list(unwrap(model).modalities)

        def mask(feats):
            return {m: f * keep[:, names.index(m), None].to(f.dtype) for m, f in feats.items()}

        # Inside the model's forward, so DistributedDataParallel sees the whole step.
        return model(inputs, feature_transform=mask)

    def loss(self, out, labels, epoch):
        loss, logs = super().loss(out, labels, epoch)
        if self.keep is not None:
            logs["sample_valuation_copies"] = float((~self.keep.all(1)).float().mean())
        return loss, logs

    def on_epoch_end(self, epoch, ctx):
        extra = super().on_epoch_end(epoch, ctx)
        if self.summary:
            extra["sample_valuation"] = dict(self.summary)
        return extra
