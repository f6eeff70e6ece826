"""MLA: alternating uni-modal adaptation through a shared head (Zhang, Yoon, Bansal, Yao, CVPR 2024,
"Multimodal Representation Learning by Alternating Unimodal Adaptation").

Checked against the authors' released code: Cecile-hi/Multimodal-Learning-with-Alternating-Unimodal-
Adaptation at ab6c184 (the code last changed in 11ae1ee, "Fix bugs"): `main.py` `train_epoch` gs_flag
branch (L419-476: one forward, then a loss, backward, projection, step and zero_grad per modality,
gradients deleted after the batch), `calculate_entropy` / `calculate_gating_weights(3)` (L65-106) and
`valid` (L622-651: the test-time fusion), `main` (L697-760: SGD momentum 0.9, weight decay 1e-4,
`weight_init` on the model, av_alpha 0.55 for the fixed fusion); `utils/utils.py` `GSPlugin`
(L12-41: the projection of the shared head's gradient) and `weight_init` (L106-114);
`models/basic_model.py` `AVClassifier` (L14-77: with gs_flag the head is Linear(512, C), the
encoders return their pooled features); `models/fusion_modules.py` `ConcatFusion` (L16-24);
`requirements.txt` (torch 1.8.1). The mechanics below are theirs unless a flag says otherwise.

Model: the method replaces the fusion head by one shared head h = Linear(D, C) (xavier-normal
weight, zero bias, as their `weight_init`) that every modality's pooled feature z_m goes through:
s_m = h(z_m). Features narrower than the widest modality's D are zero-padded to D.

Training, one batch (modalities in the dataset's order; their a, v, then t):
  1. one forward pass of every encoder (training mode): z_m for all m;
  2. for each modality m in turn: s_m = h(z_m) with the head as the previous sub-step left it,
     loss_m = CE(s_m, y), backward (into encoder m and the head), the gradient modification of the
     head's weight (below), then one optimiser step; after it the gradients are set to zero, not
     deleted (torch 1.8.1's `zero_grad`, their pinned version), so a later sub-step of the same
     batch moves the parameters stepped before it again, by momentum and weight decay alone;
  3. after the last modality every gradient is deleted, so the next batch starts from none.
Gradient modification (their `GSPlugin.before_update`, called after every sub-step's backward):
  their released code never changes the gradient. The plugin is handed the head itself, whose
  weight is named "weight", and it acts only on a parameter named "module.weight"; the "Fix bugs"
  commit (11ae1ee) narrowed the test to that name from `"module.weight" or "weight"` (4735bbc, which
  could not run: the plugin class was never instantiated). So by default (`--mla_projection off`)
  nothing is projected, as their code runs. `--mla_projection written` applies the rule in the body
  of that test, on every sub-step but the run's very first (their exp_count != 0):
    r = mean over the batch of z_m (1, D);  k = P r^T (D, 1);  alpha = 0.1 ** (1 + step / steps),
    step the 0-based batch index in the epoch and steps the batches per epoch;
    P <- P - (k k^T) / (alpha + k r), where k r is the (D, D) outer product and the division is
    element by element (their `torch.mm(k, r)`);  P <- P / ||P||_F;  grad W <- grad W P^T,
  P starting as the (D, D) identity; only the head's weight is projected, never its bias. That
  element-wise P is not symmetric and not positive semi-definite (after one update with
  non-negative features its symmetric part has an eigenvalue near -1, and grad W P^T is about
  orthogonal to grad W): on the built-in dataset (200 training samples, SGD lr 0.01) its training
  loss rose from 2.9 to 21 in three epochs, where `off` and `owm` fell. `--mla_projection owm`
  divides by the scalar alpha + r P r^T instead: the recursion of orthogonal weight modification
  (OWM, Zeng et al. 2019), P - P r^T r P / (alpha + r P r^T), on which the paper bases its
  gradient modification (the paper's own equation was not at hand when this was written); the
  rest (alpha, the Frobenius normalisation, the order) unchanged.
Test-time fusion (`valid` with --dynamic, the paper's uncertainty-based fusion), inside the model's
forward so that validation, model selection and the test numbers all use it:
  H_m = -sum over the batch and the classes of p log p with p = softmax(s_m) over the *batch*
  dimension (their `calculate_entropy`, dim=0): one number per modality and batch;
  w_m = exp(max_j H_j - H_m) / sum_k exp(max_j H_j - H_k);  fused logits = sum_m w_m s_m.
  The per-modality logits s_m are the model's uni-modal logits (acc_<modality>).

Remaining differences and their flags:
  - `--mla_projection written` / `owm`: see above (the default is their code as it runs).
  - `--mla_zero_grad none` deletes the gradients after each sub-step (PyTorch >= 2.0's default), so
    a sub-step moves only the parameters its own loss reached.
  - Their README's dynamic-fusion command passes `-dynamic`, which their argparse rejects; the flag
    is --dynamic. `--mla_fusion fixed` is their "fixed fusion" (weights `--mla_fixed_weights`; theirs 0.55, 0.45
    for two modalities and 0.35, 0.25, 0.4 for three, in their a, v, t order, here the dataset's).
  - `--mla_entropy sample` computes one entropy per sample over its classes (softmax over the
    classes: our reading of the paper's per-prediction uncertainty, and their commented-out line)
    and fuses sample by sample.
  - Their evaluation batches are as large as their training batches (64), and with the batch
    entropy a prediction depends on its batch: `--mla_entropy_group` (default: the run's
    --batch_size) splits every forward batch into consecutive groups of that many samples, each
    with its own weights; a training run refuses an --eval_batch_size that is not a multiple of it,
    so the result does not depend on how evaluation cuts its batches (--eval_only with another
    --eval_batch_size, or several processes, each evaluating its own shard, group differently).
    A group of one sample has zero batch entropy for every modality: equal weights.
  - p log p is computed with log_softmax: a probability that underflows to zero adds 0 (theirs NaN).
  - The model's fusion settings are buffers of the shared head (`fusion_mode`, `fixed_weights`,
    `entropy_group`), so best.pth evaluates (--eval_only) with the fusion it was selected with.
  - Three or more modalities: one sub-step per modality per batch in the dataset's order, the
    same P for all (as their --modal3 code); unequal feature widths are zero-padded (theirs are equal).
  - Under DistributedDataParallel the encoders run outside DDP's forward (several backward passes per
    forward); gradients are averaged over processes before each sub-step's projection and step, and
    r is the mean over every process's batch, so all processes keep the same P.
  - The training accuracy is that of the fused logits of the sub-steps' s_m (theirs is not logged).
  - Evaluation protocol (ours for every method): the model is selected on val; their StepLR (step
    70, ratio 0.1) and learning rate 1e-3 are the run's flags here; the rest of their model
    initialisation (`weight_init` on the encoders) is the encoder's own here.
"""
from __future__ import annotations

import argparse
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed as dist
from ..models import ModelOutput, unwrap
from ..models.fusion import FusionOutput
from ..stepping import Batch, StepResult, Updater, check_finite
from .base import Method, register_method
from .common import require

FUSION_MODES = {"dynamic/batch": 0, "dynamic/sample": 1, "fixed": 2}
# Their fixed-fusion weights (main.py: main(av_alpha=0.55); --a_alpha, --v_alpha, --t_alpha).
AUTHORS_FIXED = {2: (0.55, 0.45), 3: (0.35, 0.25, 0.4)}


def batch_entropy(logits: Tensor) -> Tensor:
    """-sum over the batch and classes of p log p, p = softmax over the batch dimension (their dim=0):
    (B, C) -> a scalar."""
    logp = torch.log_softmax(logits.float(), dim=0)
    return -(logp.exp() * logp).sum()


def sample_entropy(logits: Tensor) -> Tensor:
    """Each sample's entropy over its classes: (B, C) -> (B,)."""
    logp = torch.log_softmax(logits.float(), dim=1)
    return -(logp.exp() * logp).sum(1)


def entropy_weights(entropies: Tensor) -> Tensor:
    """w_m = exp(max H - H_m) / sum_k exp(max H - H_k) along dim 0 (the modalities)."""
    gated = torch.exp(entropies.max(0, keepdim=True).values - entropies)
    return gated / gated.sum(0, keepdim=True)


def fuse(uni: Sequence[Tensor], mode: str, fixed: Optional[Sequence[float]] = None, group: int = 0) -> Tensor:
    """Fused logits (B, C) from the modalities' logits of the shared head, by `mode` (FUSION_MODES)."""
    stacked = torch.stack([u.float() for u in uni])  # M x (B, C) -> (M, B, C)
    if mode == "fixed":
        return (torch.as_tensor(fixed, dtype=stacked.dtype, device=stacked.device)[:, None, None] * stacked).sum(0)
    if mode == "dynamic/sample":
        w = entropy_weights(torch.stack([sample_entropy(u) for u in stacked]))  # (M, B)
        return (w[:, :, None] * stacked).sum(0)
    size = stacked.shape[1] if group <= 0 else group
    parts = []
    for chunk in stacked.split(size, dim=1):  # consecutive groups of `size` samples
        w = entropy_weights(torch.stack([batch_entropy(u) for u in chunk]))  # (M,)
        parts.append((w[:, None, None] * chunk).sum(0))
    return torch.cat(parts)


class SharedHead(nn.Module):
    """One Linear(D, C) for every modality (features zero-padded to D) and the test-time fusion of its
    per-modality logits; the fusion settings are buffers, so they travel with the weights."""

    def __init__(self, dims: Dict[str, int], num_classes: int):
        super().__init__()
        self.names = list(dims)
        self.width = max(dims.values())
        self.fc = nn.Linear(self.width, num_classes)
        nn.init.xavier_normal_(self.fc.weight)  # their weight_init
        nn.init.zeros_(self.fc.bias)
        self.register_buffer("fusion_mode", torch.tensor(FUSION_MODES["dynamic/batch"]))
        self.register_buffer("fixed_weights", torch.full((len(dims),), 1.0 / len(dims)))
        self.register_buffer("entropy_group", torch.tensor(0))

    def configure(self, mode: str, fixed: Sequence[float], group: int) -> None:
        self.fusion_mode.fill_(FUSION_MODES[mode])
        self.fixed_weights.copy_(torch.as_tensor(list(fixed), dtype=torch.float32))
        self.entropy_group.fill_(int(group))

    @property
    def mode(self) -> str:
        code = int(self.fusion_mode)
        return next(k for k, v in FUSION_MODES.items() if v == code)

    def padded(self, z: Tensor) -> Tensor:
        """(B, D_m) -> (B, D): zeros after the modality's own columns."""
        return z if z.shape[1] == self.width else F.pad(z, (0, self.width - z.shape[1]))

    def logits(self, z: Tensor) -> Tensor:
        return self.fc(self.padded(z))

    def fused(self, uni: Dict[str, Tensor]) -> Tensor:
        return fuse([uni[m] for m in self.names], self.mode, self.fixed_weights.tolist(), int(self.entropy_group))

    def forward(self, feats: Dict[str, Tensor]) -> FusionOutput:
        uni = {m: self.logits(feats[m]) for m in self.names}
        return FusionOutput(self.fused(uni).to(uni[self.names[0]].dtype), uni)


def projection_alpha(step: int, steps: int) -> float:
    """alpha = 0.1 ** (1 + step / steps): 0.1 at an epoch's first batch, towards 0.01 at its last."""
    return 0.1 ** (step / steps + 1)


def update_projector(P: Tensor, r: Tensor, alpha: float, rule: str = "written") -> Tensor:
    """One update of the (D, D) projector with the (1, D) mean feature r, then P / ||P||_F."""
    k = P @ r.t()  # (D, D) @ (D, 1) -> (D, 1)
    denom = alpha + (r @ k if rule == "owm" else k @ r)  # (1, 1), or (D, D) divided element by element
    P = P - (k @ k.t()) / denom
    return P / torch.linalg.matrix_norm(P)


@register_method
class MLA(Method):
    name = "mla"
    help = ("MLA (CVPR 2024): alternating uni-modal steps through one shared head (its gradient projection a "
            "flag); entropy-weighted fusion at test time")
    min_modalities = 2

    @classmethod
    def add_args(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--mla_projection", choices=("off", "written", "owm"), default="off",
                           help="gradient modification of the shared head: none, as the authors' released code runs "
                                "(its parameter-name test never matches); their rule as written (element-wise "
                                "denominator); or the OWM recursion's scalar denominator, the paper's basis "
                                "(default: %(default)s)")
        group.add_argument("--mla_zero_grad", choices=("zeros", "none"), default="zeros",
                           help="after each modality's step set gradients to zero (torch 1.8.1, the authors': later "
                                "steps of the batch move the earlier-stepped parameters by momentum and weight "
                                "decay) or delete them (default: %(default)s)")
        group.add_argument("--mla_fusion", choices=("dynamic", "fixed"), default="dynamic",
                           help="test-time fusion of the shared head's per-modality logits: entropy weights or fixed "
                                "weights (default: %(default)s)")
        group.add_argument("--mla_entropy", choices=("batch", "sample"), default="batch",
                           help="dynamic fusion: one entropy per modality and batch, softmax over the batch (the "
                                "authors' code) or one per sample over the classes (our reading of the paper) "
                                "(default: %(default)s)")
        group.add_argument("--mla_entropy_group", type=int, default=0,
                           help="batch entropy over consecutive groups of this many samples; 0 = the run's "
                                "--batch_size (the authors evaluate in batches of their training size) "
                                "(default: %(default)s)")
        group.add_argument("--mla_fixed_weights", default="",
                           help="fixed fusion: comma-separated weights in the dataset's modality order; empty = the "
                                "authors' (0.55,0.45 for two modalities, 0.35,0.25,0.4 for three) "
                                "(default: %(default)r)")

    @classmethod
    def check_args(cls, args) -> None:
        super().check_args(args)
        require([(args.mla_entropy_group >= 0, f"--mla_entropy_group must be >= 0, got {args.mla_entropy_group}"),
                 (getattr(args, "fusion", "concat") == "concat",
                  f"--method mla brings its own shared head and test-time fusion; leave --fusion at concat, got "
                  f"{getattr(args, 'fusion', None)!r}")])
        cls.fixed_weights(args)  # parses (the count is checked once the modalities are known)
        if args.mla_fusion == "dynamic" and args.mla_entropy == "batch":
            batch = getattr(args, "batch_size", 0)
            group = args.mla_entropy_group or batch
            eval_bs = getattr(args, "eval_batch_size", 0) or 2 * batch
            if group and eval_bs % group:
                raise ValueError(f"--eval_batch_size ({eval_bs}) must be a multiple of --mla_entropy_group ({group}; "
                                 f"0 = --batch_size): the batch entropy's groups must not depend on how evaluation "
                                 f"cuts its batches")

    @staticmethod
    def fixed_weights(args, count: Optional[int] = None) -> Optional[List[float]]:
        text = args.mla_fixed_weights.strip()
        if not text:
            if count is None:
                return None
            if count not in AUTHORS_FIXED:
                raise ValueError(f"--mla_fixed_weights: the authors give weights for two or three modalities; "
                                 f"give {count} comma-separated weights")
            return list(AUTHORS_FIXED[count])
        try:
            weights = [float(w) for w in text.split(",")]
        except ValueError:
            raise ValueError(f"--mla_fixed_weights must be comma-separated numbers, got {text!r}") from None
        if count is not None and len(weights) != count:
            raise ValueError(f"--mla_fixed_weights has {len(weights)} weights for {count} modalities")
        return weights

    @classmethod
    def build_model(cls, info, **model_args) -> nn.Module:
        model = super().build_model(info, **model_args)
        # The shared head takes the fusion head's place: model.head / forward / evaluation use it.
        model.fusion = SharedHead({m: model.encoders[m].out_dim for m in info.modality_names}, info.num_classes)
        return model

    def __init__(self, args, model, info):
        super().__init__(args, model, info)
        head = unwrap(model).fusion
        n = len(info.modality_names)
        mode = "fixed" if args.mla_fusion == "fixed" else f"dynamic/{args.mla_entropy}"
        fixed = self.fixed_weights(args, n) if args.mla_fusion == "fixed" else [1.0 / n] * n
        head.configure(mode, fixed, args.mla_entropy_group or getattr(args, "batch_size", 0))
        self.projector = torch.eye(head.width, device=head.fc.weight.device)  # their Pl
        self.sub_steps = 0  # their gs_plugin.exp_count: modality steps over the whole run
        self.steps_per_epoch = 1

    def on_epoch_start(self, epoch, ctx):
        if ctx.train_loader is not None:
            self.steps_per_epoch = max(len(ctx.train_loader), 1)

    def project(self, head: SharedHead, z: Tensor, step: int) -> None:
        """Their before_update: update P with this modality's mean feature, then project the head's
        weight gradient (skipped on the run's first sub-step)."""
        if self.args.mla_projection == "off" or self.sub_steps == 0 or head.fc.weight.grad is None:
            return
        with torch.no_grad():
            r = head.padded(z.detach().float()).mean(0, keepdim=True)  # (B, D) -> (1, D)
            r = dist.all_gather_cat(r).mean(0, keepdim=True)  # every process's batch (same size each)
            P = self.projector.to(r.device)
            self.projector = update_projector(P, r, projection_alpha(step, self.steps_per_epoch),
                                              self.args.mla_projection)
            grad = head.fc.weight.grad
            grad.copy_(grad.float() @ self.projector.t())

    def train_step(self, model: nn.Module, batch: Batch, update: Updater) -> StepResult:
        net = unwrap(model)
        head = net.fusion
        update.zero_grad()
        with update.autocast():
            # Outside DDP's forward: each modality has its own backward pass (gradients averaged below).
            feats = net.encode(batch.inputs)
        uni, logs, losses = {}, {}, []
        params = [p for p in net.parameters() if p.requires_grad]
        for m in net.modalities:
            with update.autocast():
                logits = head.logits(feats[m])
                loss = F.cross_entropy(logits, batch.labels)
            check_finite(loss, batch)
            update.scale(loss).backward()
            update.unscale()
            dist.average_gradients(params)
            self.project(head, feats[m], batch.step)
            update.step()
            if self.args.mla_zero_grad == "zeros":
                update.optimizer.zero_grad(set_to_none=False)
            else:
                update.zero_grad()
            self.sub_steps += 1
            uni[m] = logits.detach()
            losses.append(loss.detach())
            logs[f"mla_loss_{m}"] = float(loss.detach())
        update.zero_grad()  # their `del p.grad` after the batch
        with torch.no_grad():
            fused = head.fused(uni)
        out = ModelOutput(fused, {m: z.detach() for m, z in feats.items()}, uni)
        return StepResult(torch.stack(losses).mean(), out, logs)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "projector": self.projector, "sub_steps": self.sub_steps}

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        if "projector" in state:
            self.projector = state["projector"].to(self.projector.device)
        self.sub_steps = int(state.get("sub_steps", 0))
