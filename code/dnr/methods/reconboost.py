"""ReconBoost (Hua, Xu, Bao, Yang, Huang; ICML 2024): "ReconBoost: Boosting Can Achieve Modality
Reconcilement". Modality-alternating boosting of per-modality learners.

Checked against the authors' released code: huacong/ReconBoost at 14ab57a, `train.py` (`main`,
L156-452: phase 1 L295-366, phase 2 L369-402, the learning-rate steps L445-451; `test` L109-153;
flag defaults L51-90), `models/dynamic_net.py` (`Head` L5-15, `DynamicNet` L26-182: `add`
L45-57, `parameters` L59-73, `forward` L96-135, `forward_grad` L137-170), `schedule.py`
(`schedule_model`, fixed mode L33-61), `models/CREMA/basic_model.py` (the learners: encoder and
`fc`, L7-50) and `train_MSA.py` (the three-modality variant, L202-312). The mechanics below are
theirs unless a flag says otherwise.

The model. Each modality's learner is its encoder followed by a classifier f_m = head(z_m). The
authors' code (`--common_space`, always on) gives every learner the same head, an MLP
D -> 256 -> ReLU -> C (`Head`); that needs one feature size, so when the encoders' sizes differ
(e.g. the built-in sensor's 256 beside 512) each learner gets its own Linear(D_m, C), their branch
without a common space. The prediction is the ensemble F = r * sum over the learners in the
ensemble of f_m, with a learnable boost rate r (initial value 1.0, their scripts' --boost_rate).
That is what the model's forward returns, so validation, selection and the test number use it
(their `test` takes the argmax of the same sum); `unimodal_logits` are the f_m. A learner joins
the ensemble after its first boosting phase (their `add`); the membership is a buffer of the
model, so a checkpoint evaluates as it trained. An empty ensemble predicts zeros (theirs: a
constant).

The schedule, in epochs of this trainer. A stage is `--reconboost_boost_epochs` (4) epochs of
phase 1 followed by `--reconboost_correct_epochs` (4) epochs of phase 2; stage s boosts the
learner of modality order[s mod M], in the dataset's modality order (their fixed mode: audio
then visual; text, visual, audio for MOSEI).
  Phase 1 (boosting; only encoder m and its head learn): with q = softmax(F_-m), F_-m the
  ensemble of the other members computed without gradient in training mode (their BatchNorm
  statistics move), and p = softmax(f_m),
      L = mean over the batch of -(w1 - w2 q_y) log p_y / C     (w1 5.0, w2 1.0; C classes)
  (their `boosting_loss`: -w1 mean_c(y log p) + w2 mean_c(y q log p)); q_y = 1 while no other
  learner is in the ensemble (their constant c0 through a one-column softmax). From stage 1 on,
  the learner boosted in the stage before (their `pre_model`) runs once more in training mode and
  the memory-consolidation term alpha * MSE(p, softmax(f_pre)) (alpha 0.5) is added, both sides
  detached: in their code it is logged and moves the previous learner's BatchNorm statistics, but
  no gradient reaches any learner.
  Phase 2 (global rectification; every member's encoder, the head(s) and r learn):
      L = CE(r * sum over the members of f_j, y).
Every phase starts with a fresh optimiser state (they build a new SGD per phase), the epoch-based
rule making this resume-exact. One batch is one optimiser step of the current phase.

Remaining differences and their flags:
  - `--reconboost_consolidation gradient` lets the consolidation term's gradient reach the
    current learner (our reading of the paper's memory consolidation, which aligns the current
    learner's functional gradient, softmax - y, with the previous learner's); default `detached`
    as their code.
  - `--no-reconboost_reset_optimizer` keeps one optimiser state across phases (momentum carries).
  - `--reconboost_pretrain_epochs N` (default 0, their argument default) first trains each
    modality alone for N epochs (`--method unimodal` stages in <out>/reconboost_pretrain_<m>,
    selected on val), starts the encoders from them, and puts every learner in the ensemble from
    stage 0, as their `--use_pretrain` runs (their CREMA-D, AVE and ModelNet40 commands; their
    uni-modal checkpoints are named after the epoch of their best accuracy, their runs evaluating
    on test). The uni-modal heads are dropped: the learners' head starts fresh, as theirs (`fc`
    replaced by the shared head).
  - Weights w1, w2: defaults are their `train.py` (CREMA-D) values; their AVE and ModelNet40
    commands use 4.0 and 1.0, their MSA script 1.0 and 0.25.
  - Three modalities: their `train_MSA.py` cannot run as released (`schedule_model` has no
    branch for its dataset name 'MSA' and returns None); with its 'MOSEI' branch the learners
    cycle, the previous learner being the one boosted in the stage before, and every other member
    enters F_-m: that is what runs here. Their MSA head is a shared Linear(128, 3), not the MLP.
  - Evaluation protocol (ours for every method): the model is evaluated after every epoch (theirs:
    after every stage, on test, keeping the best from stage 3) and selected on val; optimiser,
    learning rate, weight decay and schedule are the run's (theirs: SGD, momentum 0.9, weight decay
    5e-4, lr 0.01 for both phases, x0.1 every 30 stages on CREMA-D), one optimiser whose steps touch
    only the phase's parameters (the others have no gradient, so no decay or momentum either).
  - Under DistributedDataParallel the learners run outside the wrapper's forward; their gradients
    are averaged over processes before each step.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed as dist
from ..models import ModelOutput, unwrap
from ..models.fusion import FusionOutput
from ..stepping import StepResult, check_finite
from .base import Method, register_method
from .common import require


class SharedHead(nn.Module):
    """The authors' common classifier `Head`: Linear(D, 256), ReLU, Linear(256, C)."""

    def __init__(self, dim: int, num_classes: int, hidden: int = 256):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, z: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(z)))


class BoostedEnsemble(nn.Module):
    """The model's head under ReconBoost: each learner's logits f_m = head_m(z_m) (one shared MLP
    when every feature has the same size, else one Linear per modality) and the ensemble
    F = rate * sum of f_m over the members (`members`, a 0/1 buffer in modality order)."""

    def __init__(self, dims: Mapping[str, int], num_classes: int):
        super().__init__()
        self.names = list(dims)
        self.shared = len(set(dims.values())) == 1
        if self.shared:
            self.head = SharedHead(next(iter(dims.values())), num_classes)
        else:
            self.heads = nn.ModuleDict({m: nn.Linear(d, num_classes) for m, d in dims.items()})
        self.rate = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("members", torch.zeros(len(self.names)))

    def learner(self, m: str, z: Tensor) -> Tensor:
        return self.head(z) if self.shared else self.heads[m](z)

    def member_names(self) -> Tuple[str, ...]:
        return tuple(m for m, on in zip(self.names, self.members.tolist()) if on)

    def set_members(self, names: Sequence[str]) -> None:
        self.members.copy_(torch.tensor([float(m in names) for m in self.names]))

    def ensemble(self, logits: Mapping[str, Tensor]) -> Optional[Tensor]:
        """rate * sum of the given learners' logits; None for none."""
        return self.rate * sum(logits.values()) if logits else None

    def forward(self, feats: Dict[str, Tensor]) -> FusionOutput:
        uni = {m: self.learner(m, feats[m]) for m in self.names}
        members = self.member_names()
        fused = self.ensemble({m: uni[m] for m in members})
        if fused is None:  # no learner yet: every class alike
            fused = torch.zeros_like(uni[self.names[0]])
        return FusionOutput(fused, uni)


@dataclass(frozen=True)
class Phase:
    """Where an epoch sits in the ReconBoost schedule."""

    stage: int
    kind: str  # "boost" (phase 1) or "rectify" (phase 2, global rectification)
    modality: str  # the learner this stage boosts
    members: Tuple[str, ...]  # the learners in the ensemble during this epoch
    previous: Optional[str]  # the learner boosted in the stage before (memory consolidation)
    opens: bool  # this epoch is the first of its phase (fresh optimiser state)


def phase_of(epoch: int, order: Sequence[str], boost_epochs: int, correct_epochs: int,
             pretrained: bool = False) -> Phase:
    """Stage s = epoch // (boost + correct epochs) boosts order[s mod M]; a learner joins the
    ensemble after its first boosting phase (all from the start with pretrained learners)."""
    stage, pos = divmod(epoch, boost_epochs + correct_epochs)
    m = order[stage % len(order)]
    kind = "boost" if pos < boost_epochs else "rectify"
    if pretrained:
        joined = set(order)
    else:
        joined = set(order[:min(stage, len(order))]) | ({m} if kind == "rectify" else set())
    return Phase(stage=stage, kind=kind, modality=m, members=tuple(j for j in order if j in joined),
                 previous=order[(stage - 1) % len(order)] if stage > 0 else None,
                 opens=pos in (0, boost_epochs))


def boosting_loss(logits: Tensor, labels: Tensor, others: Optional[Tensor], w1: float, w2: float) -> Tensor:
    """Mean over the batch of -(w1 - w2 q_y) log softmax(logits)_y / C, q = softmax(others)
    (constant), q_y = 1 without others."""
    log_p = torch.log_softmax(logits.float(), 1).gather(1, labels[:, None]).squeeze(1)  # (B,)
    if others is None:
        q = torch.ones_like(log_p)
    else:
        q = torch.softmax(others.detach().float(), 1).gather(1, labels[:, None]).squeeze(1)
    return (-(w1 - w2 * q) * log_p / logits.shape[1]).mean()


def consolidation_loss(logits: Tensor, previous: Tensor, keep_gradient: bool) -> Tensor:
    """MSE between the current and the previous learner's class probabilities (mean over B x C);
    the authors detach both sides."""
    p = torch.softmax(logits.float(), 1)
    return F.mse_loss(p if keep_gradient else p.detach(), torch.softmax(previous.detach().float(), 1))


@register_method
class ReconBoost(Method):
    name = "reconboost"
    help = ("ReconBoost (ICML 2024): one modality's learner boosted at a time against the others' ensemble, "
            "then global rectification of the ensemble")
    min_modalities = 2

    @classmethod
    def add_args(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--reconboost_boost_epochs", type=int, default=4,
                           help="epochs per stage that boost one modality's learner (phase 1); the authors' "
                                "epochs_per_stage (default: %(default)s)")
        group.add_argument("--reconboost_correct_epochs", type=int, default=4,
                           help="epochs of global rectification after each boosting phase (phase 2); 0 skips "
                                "it; the authors' correct_epoch (default: %(default)s)")
        group.add_argument("--reconboost_weight1", type=float, default=5.0,
                           help="w1, weight of the learner's cross-entropy in the boosting loss; the authors' "
                                "CREMA-D value (AVE, ModelNet40: 4.0; MSA: 1.0) (default: %(default)s)")
        group.add_argument("--reconboost_weight2", type=float, default=1.0,
                           help="w2, weight of the reconcilement term, the others' ensemble's true-class "
                                "probability times the learner's log-likelihood (MSA: 0.25) (default: %(default)s)")
        group.add_argument("--reconboost_alpha", type=float, default=0.5,
                           help="weight of the memory-consolidation MSE to the previous learner (default: "
                                "%(default)s)")
        group.add_argument("--reconboost_consolidation", choices=("detached", "gradient"), default="detached",
                           help="detached: the consolidation term carries no gradient (the authors' code); "
                                "gradient: it reaches the current learner (our reading of the paper) "
                                "(default: %(default)s)")
        group.add_argument("--reconboost_reset_optimizer", action=argparse.BooleanOptionalAction, default=True,
                           help="fresh optimiser state (momentum) at the start of every phase, as the authors "
                                "build a new SGD per phase (default: %(default)s)")
        group.add_argument("--reconboost_pretrain_epochs", type=int, default=0,
                           help="first train each modality alone for this many epochs (--method unimodal "
                                "stages) and start from those encoders with every learner in the ensemble, "
                                "as the authors' --use_pretrain runs; 0: from scratch (default: %(default)s)")

    @classmethod
    def check_args(cls, args) -> None:
        super().check_args(args)
        require([
            (args.reconboost_boost_epochs >= 1,
             f"--reconboost_boost_epochs must be >= 1, got {args.reconboost_boost_epochs}"),
            (args.reconboost_correct_epochs >= 0,
             f"--reconboost_correct_epochs must be >= 0, got {args.reconboost_correct_epochs}"),
            (args.reconboost_weight1 >= 0, f"--reconboost_weight1 must be >= 0, got {args.reconboost_weight1}"),
            (args.reconboost_weight2 >= 0, f"--reconboost_weight2 must be >= 0, got {args.reconboost_weight2}"),
            (args.reconboost_alpha >= 0, f"--reconboost_alpha must be >= 0, got {args.reconboost_alpha}"),
            (args.reconboost_pretrain_epochs >= 0,
             f"--reconboost_pretrain_epochs must be >= 0, got {args.reconboost_pretrain_epochs}"),
            (getattr(args, "fusion", "concat") == "concat",
             f"--method reconboost builds its own head (the learners' classifiers summed with a boost rate); "
             f"leave --fusion at its default concat, got {getattr(args, 'fusion', None)!r}"),
        ])

    @classmethod
    def build_model(cls, info, **model_args) -> nn.Module:
        model = super().build_model(info, **model_args)
        # The ensemble of per-modality learners replaces the fusion head: model(inputs) is its prediction.
        model.fusion = BoostedEnsemble({m: model.encoders[m].out_dim for m in model.modalities}, info.num_classes)
        return model

    def __init__(self, args, model, info):
        super().__init__(args, model, info)
        self.order = list(unwrap(model).modalities)
        self.pretrained = False  # encoders started from the uni-modal stages (carried by a resume)

    def phase(self, epoch: int) -> Phase:
        return phase_of(epoch, self.order, self.args.reconboost_boost_epochs, self.args.reconboost_correct_epochs,
                        pretrained=self.args.reconboost_pretrain_epochs > 0)

    def before_training(self, ctx) -> None:
        epochs = self.args.reconboost_pretrain_epochs
        if epochs == 0 or self.pretrained:  # a resumed run keeps its own weights
            return
        net = unwrap(ctx.model)
        for m in self.order:
            folder = ctx.run_stage(f"reconboost_pretrain_{m}", method="unimodal", unimodal_modality=m, epochs=epochs,
                                   track_purity=False, track_purity_every=0)
            saved = torch.load(folder / "best.pth", map_location="cpu", weights_only=True)
            prefix = f"encoders.{m}."
            net.encoders[m].load_state_dict({k[len(prefix):]: v for k, v in saved["model"].items()
                                             if k.startswith(prefix)})
        self.pretrained = True

    def on_epoch_start(self, epoch, ctx) -> None:
        unwrap(ctx.model).fusion.set_members(self.phase(epoch).members)

    def train_step(self, model, batch, update) -> StepResult:
        net = unwrap(model)
        where = self.phase(batch.epoch)
        net.fusion.set_members(where.members)
        if where.opens and batch.step == 0 and self.args.reconboost_reset_optimizer:
            update.optimizer.state.clear()  # what a freshly built optimiser holds
        with update.autocast():
            if where.kind == "boost":
                loss, out, logs = self.boost_loss(net, batch.inputs, batch.labels, where)
            else:
                loss, out, logs = self.rectify_loss(net, batch.inputs, batch.labels, where)
        check_finite(loss, batch)
        update.zero_grad()
        update.scale(loss).backward()
        # The learners ran outside any DistributedDataParallel wrapper: average their gradients here.
        dist.average_gradients([p for p in net.parameters() if p.grad is not None])
        update.unscale()
        update.step()
        logs["reconboost_stage"] = float(where.stage)
        logs["reconboost_rate"] = float(net.fusion.rate.detach())
        return StepResult(loss, out, logs)

    def boost_loss(self, net, inputs, labels, where: Phase):
        m, ens = where.modality, net.fusion
        feats = {m: net.encoders[m](inputs[m])}
        uni = {m: ens.learner(m, feats[m])}
        with torch.no_grad():  # the other members' ensemble, in training mode as theirs
            for j in where.members:
                if j != m:
                    feats[j] = net.encoders[j](inputs[j])
                    uni[j] = ens.learner(j, feats[j])
            others = ens.ensemble({j: uni[j] for j in where.members if j != m})
        args = self.args
        boost = boosting_loss(uni[m], labels, others, args.reconboost_weight1, args.reconboost_weight2)
        loss, logs = boost, {"reconboost_boost": float(boost.detach())}
        if where.previous is not None:
            with torch.no_grad():  # their second, detached pass of the previous learner
                previous = ens.learner(where.previous, net.encoders[where.previous](inputs[where.previous]))
            mse = consolidation_loss(uni[m], previous, args.reconboost_consolidation == "gradient")
            loss = loss + args.reconboost_alpha * mse
            logs["reconboost_consolidation"] = float(mse.detach())
        with torch.no_grad():  # what the ensemble predicts now (training accuracy)
            fused = ens.ensemble({j: uni[j] for j in where.members})
            fused = torch.zeros_like(uni[m]) if fused is None else fused
        return loss, ModelOutput(fused.detach(), feats, {j: u.detach() for j, u in uni.items()}), logs

    def rectify_loss(self, net, inputs, labels, where: Phase):
        ens = net.fusion
        feats = {j: net.encoders[j](inputs[j]) for j in where.members}
        uni = {j: ens.learner(j, feats[j]) for j in where.members}
        fused = ens.ensemble(uni)
        loss = F.cross_entropy(fused, labels)
        return loss, ModelOutput(fused, feats, uni), {"reconboost_rectify": float(loss.detach())}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "pretrained": self.pretrained}

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        self.pretrained = bool(state.get("pretrained", False))
