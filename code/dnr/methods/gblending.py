"""Gradient-Blending (Wang, Tran & Feiszli, CVPR 2020, "What Makes Training Multi-Modal
Classification Networks Hard?").

What the authors released: facebookresearch/VMZ at 4cc542d, the Caffe2 code of the paper's
audio-visual models: `c2/lib/models/audio_visual_model.py` L458-499 (with g_blend, one extra FC
classifier on each modality's pooled feature, `a_last_out` and `v_last_out`, beside the fused
classifier), `c2/lib/models/loss/loss_creator.py` `add_weighted_loss` L119-200 (three softmax
cross-entropies, each scaled by its weight, summed; as released, L147 passes `prefix=` to
`add_loss`, whose keyword is `loss_prefix` (L28-40), which Python refuses: we read it as the
prefix of the fused loss's name, no effect on the numbers), `c2/lib/models/model_builder.py` L172-185 and
`c2/tools/train_net.py` L277-280, L578-585 (the weights are the hand-given flags --audio_weight,
--visual_weight, --av_weight), `c2/tools/test_net.py` L226 (evaluation reads the fused head's
softmax), and `c2/tutorials/gradient_blending.md` (weights computed by Gradient-Blending, given as
fixed numbers: Kinetics R3D-50 audio 0.014, visual 0.630, AV 0.356; each set sums to 1). The code
that *estimates* the weights was never released, so the estimation follows the paper (CVPR
version: Sec. 2.2 Eq. 3, Proposition 1 Eq. 6, Sec. 2.4 and Algorithms 1-3, Sec. 3.1 and 3.3).

The model: the method builds one uni-modal head per modality, Linear(D_m, C) on the pooled feature
(`unimodal_heads`, as theirs), beside the run's fusion head. Each step (the authors' loss):
    L = sum over heads k of w_k CE(logits_k, y),   heads = every modality's head and "fused".
Evaluation and model selection use the fused head only (as their test_net), so inference is the
run's own. Because the uni-modal logits come from the method's own heads, it works with every fusion.

The weights (paper, Algorithm 1 "GB Estimate", from the checkpoint phi_N for n epochs): for each
head k, a copy of phi_N trained for n epochs on the training split with head k's loss alone (a
uni-modal network: encoder m and its head; the naive multimodal one: every encoder and the fusion
head), with the run's optimiser, learning rate schedule, clipping and precision. With L^T the
loss on the training split (evaluation transform) and L^V the loss on the held-out split, both of
head k, measured on phi_N and on the copy after n epochs:
    O = L^V - L^T;  dO = O_{N+n} - O_N;  dG = L^V_N - L^V_{N+n}   (Eq. 3)
    w_k = (dG_k / dO_k^2) / Z,  Z = the sum over heads of dG / dO^2 (sum of weights 1)   (Alg. 1)
`--gblending_metric accuracy` uses the error rate (1 - accuracy) in place of the loss (the paper:
"equally effective"). Schedule (`--gblending_schedule`): online (Algorithm 3, the paper's full
version): the weights are re-estimated at the start of every super-epoch: 0-based epochs 0,
W, W + n, W + 2n, ... with W = `--gblending_warmup` (the paper's Kinetics runs: 10) and
n = `--gblending_super_epoch` (theirs: 5); each estimate looks as many epochs ahead as the
super-epoch it serves lasts (the last one up to the end of the run). Algorithm 3 as printed
calls GB Estimate(phi_{N_i}, N_i + n), whose second argument Algorithm 1 names "# of epochs"; we
read N_i + n as the epoch the copies train up to (n epochs), as the text says weights are computed
"when training from N for n epochs". Offline (Algorithm 2): one estimate at epoch 0 looking over
the whole run (GB Estimate(phi_0, N)), then fixed weights. The paper gives super-epochs for
Kinetics only; they are the defaults here for every dataset.

Remaining differences and their flags:
  - Held-out data: the paper holds out part of the *training* set (8% on Kinetics); here it is our
    validation split, which also selects the model (the evaluation protocol is ours). The training
    loss L^T is measured on the whole training split with the evaluation transform (the paper
    allows a subset T').
  - Proposition 1 writes Z = sum_k G_k / (2 sigma_k^2), which would make the weights sum to 2; we
    normalise to 1, as its constraint sum_k w_k = 1 and every weight set the authors published.
  - A head whose validation measure got worse (dG <= 0) gets weight 0 (the formula would make it
    negative, i.e. ascend that loss); if no head improved, the previous weights stay (uniform
    1/(k+1) before the first estimate). dO^2 is floored at 1e-12.
  - The paper does not say what the copies' optimiser starts from: here a fresh one (no momentum),
    with the run's settings; every copy's epoch e sees the same sample order as the run's epoch e.
  - `--gblending_estimate joint` (not the paper's): no copies; dG and dO of each head of the
    blended model itself between the previous estimate and now (the first super-epoch uses uniform
    weights). It costs two evaluation passes per estimate instead of (k+1) x n training epochs.
  - `--gblending_weights audio=0.014,visual=0.63,fused=0.356`: fixed, hand-given weights and no
    estimation (the authors' released training, whose weights come from elsewhere).
  - A resume in the middle of an estimate redoes it (its copies are not checkpointed); the weights
    in use and the last estimate's measures are in the checkpoint.
  - The fused classifier is the run's --fusion head, as for every method (theirs: two FC layers
    with ReLU on the concatenated features, then the prediction layer).
  - On tiny held-out splits the accuracy metric often gives dO = 0 exactly, and the floor then
    hands that head nearly all the weight (the formula's own behaviour; the paper's held-out sets
    have thousands of clips).
  - Under DistributedDataParallel every process trains its copies on its shard of each batch with
    gradients averaged, and the measures use every process's samples, so all hold the same weights.
  - Three or more modalities: the paper's Table 4 has RGB + flow + audio; every modality gets its
    own head and copy, the weights run over k + 1 heads.
  - Cost: a step costs the baseline's (the extra heads are linear layers). Each estimate trains
    k + 1 copies for the super-epoch's length (a uni-modal copy runs one encoder) and runs two
    evaluation passes (training split, val) per copy plus two on the model; over a run the copies
    add about (k + 1) x epochs of single-head training: roughly 3x the baseline's training time
    with two modalities, online or offline alike. `joint` adds only the two passes per estimate.
  - Evaluation protocol (ours for every method): the model is selected on val; the optimiser and
    schedule are the run's.
"""
from __future__ import annotations

import argparse
import copy
import functools
from typing import Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed as dist
from ..models import unwrap
from ..runtime import epoch_seed
from ..stepping import AMP_DTYPES, Updater, build_optimizer, check_finite, learning_rate_at
from .base import Method, register_method
from .common import add_unimodal_heads, require

FUSED = "fused"  # the name of the multimodal head among the blended heads
EPS = 1e-12


def schedule(epochs: int, kind: str, warmup: int, super_epoch: int) -> Dict[int, int]:
    """{0-based epoch at which the weights are estimated: how many epochs that estimate looks ahead
    (the super-epoch it serves)}. Online: 0, warmup, warmup + n, ...; offline: 0 only, the whole run."""
    if kind == "offline":
        return {0: epochs}
    starts = [0] + list(range(warmup, epochs, super_epoch)) if warmup > 0 else list(range(0, epochs, super_epoch))
    ends = starts[1:] + [epochs]
    return {s: e - s for s, e in zip(starts, ends)}


def overfit_generalise(before: Tuple[float, float], after: Tuple[float, float]) -> Tuple[float, float]:
    """(dO, dG) of one head from its (train, val) measure at checkpoint N and at N + n (Eq. 3)."""
    (t0, v0), (t1, v1) = before, after
    return (v1 - t1) - (v0 - t0), v0 - v1


def blend_weights(before: Mapping[str, Tuple[float, float]], after: Mapping[str, Tuple[float, float]],
                  previous: Optional[Mapping[str, float]] = None) -> Tuple[Dict[str, float], Dict[str, dict]]:
    """w_k = (dG_k / dO_k^2) / Z over the heads (Algorithm 1), negative ones set to 0, summing to 1;
    `previous` (uniform without it) when no head generalised. Also {head: {dO, dG, OGR}}."""
    raw, parts = {}, {}
    for k in before:
        d_o, d_g = overfit_generalise(before[k], after[k])
        raw[k] = max(d_g, 0.0) / max(d_o * d_o, EPS)
        parts[k] = {"dO": d_o, "dG": d_g, "ogr": abs(d_o) / max(abs(d_g), EPS)}
    total = sum(raw.values())
    if total <= 0:
        return dict(previous or {k: 1.0 / len(raw) for k in raw}), parts
    return {k: v / total for k, v in raw.items()}, parts


def parse_weights(text: str, heads: Optional[List[str]] = None) -> Dict[str, float]:
    """'audio=0.014,visual=0.63,fused=0.356' -> {head: weight}, one entry per head of `heads`
    (when given)."""
    out = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--gblending_weights: {item!r} is not head=weight")
        out[name.strip()] = float(value)
    if heads is not None and sorted(out) != sorted(heads):
        raise ValueError(f"--gblending_weights names {sorted(out)}; the heads are {sorted(heads)}")
    if any(v < 0 for v in out.values()):
        raise ValueError(f"--gblending_weights must be >= 0, got {out}")
    return out


def head_logits(net: nn.Module, head: str, features: Mapping[str, Tensor]) -> Tensor:
    """The logits of one blended head from the pooled features."""
    if head == FUSED:
        return net.fusion(dict(features)).logits
    return net.unimodal_heads[head](features[head])


def head_params(net: nn.Module, head: str) -> List[nn.Parameter]:
    """What a copy trained on `head`'s loss alone learns: encoder m and its head, or every encoder
    and the fusion head."""
    if head == FUSED:
        mods = [net.encoders, net.fusion]
    else:
        mods = [net.encoders[head], net.unimodal_heads[head]]
    return [p for m in mods for p in m.parameters() if p.requires_grad]


@torch.no_grad()
def measures(net: nn.Module, heads: List[str], source, metric: str) -> Dict[str, Tuple[float, float]]:
    """{head: (train, val)} mean cross-entropy (or error rate) of each head on the two splits, from
    `source(split)` -> (pooled features in evaluation mode, labels)."""
    out: Dict[str, list] = {k: [] for k in heads}
    for split in ("train", "val"):
        feats, labels = source(split)
        feats = {m: f.float() for m, f in feats.items()}
        labels = labels.to(next(iter(feats.values())).device)
        for k in heads:
            logits = head_logits(net, k, feats)
            if metric == "loss":
                out[k].append(float(F.cross_entropy(logits, labels)))
            else:
                out[k].append(1.0 - float((logits.argmax(1) == labels).float().mean()))
    return {k: (v[0], v[1]) for k, v in out.items()}


@register_method
class GradientBlending(Method):
    name = "gblending"
    help = "Gradient-Blending (CVPR 2020): uni-modal and fused losses weighted by dG / dO^2 on held-out data"
    min_modalities = 2

    @classmethod
    def add_args(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--gblending_schedule", choices=("online", "offline"), default="online",
                           help="re-estimate the weights every super-epoch (the paper's Algorithm 3) or once "
                                "at epoch 0 over the whole run (Algorithm 2) (default: %(default)s)")
        group.add_argument("--gblending_warmup", type=int, default=10,
                           help="length in epochs of the first super-epoch (online); the paper's Kinetics "
                                "runs: 10 (default: %(default)s)")
        group.add_argument("--gblending_super_epoch", type=int, default=5,
                           help="length in epochs of every later super-epoch (online); the paper's: 5 "
                                "(default: %(default)s)")
        group.add_argument("--gblending_metric", choices=("loss", "accuracy"), default="loss",
                           help="measure overfitting and generalisation with the cross-entropy (the paper's "
                                "definition) or the error rate (default: %(default)s)")
        group.add_argument("--gblending_estimate", choices=("separate", "joint"), default="separate",
                           help="estimate from copies trained on each head's loss alone (the paper's "
                                "Algorithm 1) or from the blended model's own heads over the last super-epoch "
                                "(cheap; not the paper's) (default: %(default)s)")
        group.add_argument("--gblending_weights", default=None,
                           help="fixed weights 'audio=0.014,visual=0.63,fused=0.356' (one per modality and "
                                "'fused'), no estimation: the authors' released training (default: estimate)")

    @classmethod
    def check_args(cls, args) -> None:
        super().check_args(args)
        require([(args.gblending_warmup >= 0, f"--gblending_warmup must be >= 0, got {args.gblending_warmup}"),
                 (args.gblending_super_epoch >= 1,
                  f"--gblending_super_epoch must be >= 1, got {args.gblending_super_epoch}")])
        if args.gblending_weights is not None:
            parse_weights(args.gblending_weights)  # the head names are checked against the model's later

    @classmethod
    def build_model(cls, info, **model_args) -> nn.Module:
        model = super().build_model(info, **model_args)
        # The uni-modal classifiers are the method's (the authors' a_last_out / v_last_out FC layers).
        return add_unimodal_heads(model, info.num_classes, info.modality_names)

    def __init__(self, args, model, info):
        super().__init__(args, model, info)
        self.heads = list(info.modality_names) + [FUSED]
        if args.gblending_weights is not None:
            self.weights = parse_weights(args.gblending_weights, self.heads)
        else:
            self.weights = {k: 1.0 / len(self.heads) for k in self.heads}
        self.reference: Optional[Dict[str, Tuple[float, float]]] = None  # joint: the last estimate's measures
        self.last_estimate: Optional[dict] = None  # what the latest estimate measured (logged once)
        self.history: List[dict] = []

    # ------------------------------------------------------------------ the weights
    def schedule(self) -> Dict[int, int]:
        a = self.args
        return schedule(a.epochs, a.gblending_schedule, a.gblending_warmup, a.gblending_super_epoch)

    def on_epoch_start(self, epoch, ctx):
        if self.args.gblending_weights is not None:
            return
        plan = self.schedule()
        if epoch not in plan:
            return
        net = unwrap(ctx.model)
        now = measures(net, self.heads, ctx.extract_features, self.args.gblending_metric)
        if self.args.gblending_estimate == "joint":
            before, after = self.reference, now
            self.reference = now
            if before is None:  # nothing to compare with yet: the first super-epoch keeps uniform weights
                return
        else:
            before, after = now, self.separate_measures(net, ctx, epoch, plan[epoch])
        weights, parts = blend_weights(before, after, self.weights)
        self.weights = ctx.broadcast(weights)
        self.last_estimate = {"epoch": epoch, "epochs_ahead": plan[epoch], "weights": dict(self.weights),
                              "before": before, "after": after, "measures": parts}
        self.history.append(self.last_estimate)

    def separate_measures(self, net, ctx, epoch: int, n: int) -> Dict[str, Tuple[float, float]]:
        """Algorithm 1: each head's (train, val) measure after a copy of the model trained n epochs
        on that head's loss alone."""
        after = {}
        for k in self.heads:
            side = copy.deepcopy(net)
            self.train_side(side, k, ctx, epoch, n)
            after[k] = measures(side, [k], functools.partial(ctx.extract_features_of, side),
                                self.args.gblending_metric)[k]
            del side
        return after

    def train_side(self, side: nn.Module, head: str, ctx, start: int, n: int) -> None:
        """Train `side` for epochs start .. start + n - 1 on `head`'s cross-entropy alone, with the
        run's optimiser settings, schedule, clipping and precision; every epoch in the run's order."""
        a = self.args
        params = head_params(side, head)
        amp = AMP_DTYPES[getattr(a, "amp", "off")]
        scaler = torch.amp.GradScaler(torch.device(ctx.device).type) if getattr(a, "amp", "off") == "fp16" else None
        update = Updater(side, build_optimizer(a, params)[0], ctx.device, amp=amp, scaler=scaler,
                         grad_clip=getattr(a, "grad_clip", 0.0))
        sampler = getattr(ctx.train_loader, "batch_sampler", None) if ctx.train_loader is not None else None
        saved = (sampler.seed, sampler.indices) if hasattr(sampler, "set_epoch") else None
        side.train()
        try:
            for e in range(start, start + n):
                if saved is not None:
                    sampler.set_epoch(epoch_seed(a.random_seed, e), self.epoch_indices(e, ctx))
                for group in update.optimizer.param_groups:
                    group["lr"] = learning_rate_at(a, e)
                for batch in ctx.train_batches(e):
                    with update.autocast():
                        if head == FUSED:
                            feats = side.encode(batch.inputs)
                        else:
                            feats = {head: side.encoders[head](batch.inputs[head])}
                        loss = F.cross_entropy(head_logits(side, head, feats), batch.labels)
                    check_finite(loss, batch)
                    update.zero_grad()
                    update.scale(loss).backward()
                    update.unscale()
                    dist.average_gradients(params)  # the copy is not wrapped in DistributedDataParallel
                    update.step()
        finally:
            if saved is not None:
                sampler.set_epoch(*saved)

    # ------------------------------------------------------------------ the step
    def loss(self, out, labels, epoch):
        heads = unwrap(self.model).unimodal_heads
        losses = {m: F.cross_entropy(heads[m](out.features[m]), labels) for m in heads}
        losses[FUSED] = F.cross_entropy(out.logits, labels)
        total = sum(self.weights[k] * losses[k] for k in self.heads)
        logs = {f"loss_{k}": float(v.detach()) for k, v in losses.items()}
        logs.update({f"gblending_w_{k}": w for k, w in self.weights.items()})
        return total, logs

    def on_epoch_end(self, epoch, ctx):
        extra = super().on_epoch_end(epoch, ctx)
        extra["gblending_weights"] = dict(self.weights)
        if self.last_estimate is not None and self.last_estimate["epoch"] == epoch:
            extra["gblending_estimate"] = self.last_estimate
        return extra

    def state_dict(self) -> dict:
        return {**super().state_dict(), "gblending": {"weights": dict(self.weights), "reference": self.reference,
                                                     "history": list(self.history)}}

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        saved = state.get("gblending")
        if saved is None:
            raise KeyError("the checkpoint holds no Gradient-Blending state (weights); it was written by "
                           "another method")
        if self.args.gblending_weights is None:
            self.weights = dict(saved["weights"])
        self.reference = saved["reference"]
        self.history = list(saved["history"])
        self.last_estimate = self.history[-1] if self.history else None
