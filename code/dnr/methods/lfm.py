"""LFM (Yang, Wan, Jiang, Xu, NeurIPS 2024, "Facilitating Multimodal Classification via Dynamically
Learning Modality Gap"): the supervised loss mixed with a modality-matching loss under a weight that
changes with the epoch.

Checked against the authors' released code: njustkmg/NeurIPS24-LFM at ad44fa0, `Crema_epoch.py`
(`Alignment` L38-45, `getAlpha_Learnable_Fitted` L47-53, `train_audio_video` L56-85, the epoch loop
L177-199; the README's command), `Crema_epoch_learnable.py` (`getAlpha_Learnable` L55-97, the held-out
batch L216-233, the loop L246-258), `model/AudioVideo.py` (`AVClassifier` L46-67: one Linear head per
modality) and `data/crema.json` (200 epochs, SGD lr 1e-2). The mechanics below are theirs unless a
flag says otherwise.

With s_m modality m's logits (their `o_a`, `o_v`: one Linear head per modality, our `--fusion sum`;
with concat fusion, its slice of the weight plus bias / M) and M modalities:
  fused logits   f = (1/M) sum_m s_m (their 0.5 o_a + 0.5 o_v, in training and evaluation alike: the
                 method wraps the fusion head so the model's own output is this mean);
  matching loss  A = 0.5 (KL(r || p_a) + KL(r || p_v)), p_m = softmax(s_m), r = (p_a + p_v) / 2,
                 averaged over the batch (their `Alignment`: F.kl_div(p.log(), r) is KL(r || p), so this
                 is not the Jensen-Shannon divergence, whose terms are KL(p || r));
  step loss      L = 2 (alpha_cls(e) CE(f, y) + alpha_match(e) A), e the 0-based epoch.
The paper presents the second term as contrastive learning; the released code has no other term
(no feature contrast, no temperature): this divergence is all of it. The paper's text was not
available here, so its equations were not compared; its heuristic weighting ("Ours-H", a
decreasing function of the epoch) is not in the released code and is not implemented.

The weights (`--lfm_weighting`):
  fitted (default; `Crema_epoch.py`, the README's command): alpha_cls(e) = sum_i c_i e^i, a degree-5
    polynomial they fitted to the learnt weights, alpha_match = 1 - alpha_cls (their second
    polynomial is exactly that). It rises from 0.205 at epoch 0 to 0.50 at epoch 80, passes 1 at
    epoch 178 (alpha_match down to -0.01 until epoch 189, as theirs), then falls: 0.90 at epoch 199,
    -2.3 at 250. Runs longer than their 200 epochs must therefore map their epochs onto the curve
    (`--lfm_fit_epochs N`: the curve at e * 200 / N); check_args refuses them otherwise.
  learnable (`Crema_epoch_learnable.py`): 16 random training samples are held out of training; before
    every epoch, on the first 8 of them, with L_v = alpha_cls CE + alpha_match A (no factor 2):
    g = dL_v/dtheta, g_cls = dCE/dtheta, h = d(g . g_cls)/dtheta (a Hessian-vector product, g_cls
    held constant); delta = mean of h over the *first parameter tensor* of the model (theirs: the
    audio encoder's first convolution; here the first modality's first encoder tensor);
    lr_alpha is halved at every epoch that is a positive multiple of 20 (before the update);
    alpha_match <- clip(alpha_match - lr_alpha delta, 0.05, 0.95), alpha_cls = 1 - alpha_match.
    Start: alpha_match 0.95, lr_alpha 1e-4. The batch passes through the model in training mode at
    epoch 0 (BatchNorm statistics updated) and in evaluation mode afterwards, as theirs (their
    evaluation leaves the model in eval mode).

Remaining differences and their flags:
  - `--lfm_fit_epochs` (default 0: the raw epoch, theirs) for runs that are not 200 epochs long.
  - The held-out batch (learnable) is drawn once with the training transform, like theirs, and kept
    in the method's state, so a resume uses the same samples; the 16 indices come from a generator
    seeded with --random_seed.
  - log p_m is log_softmax (theirs: log of softmax, which is -inf where a probability underflows).
  - Three or more modalities (their code has two): f is the mean of the M logits, A the mean of the
    pairwise terms; two modalities give exactly theirs. BalanceMM's LFM (4c1482f) also averages
    pairs, but uses the full fused logits, starts the learnt weights the other way round (0.95 on
    the supervised loss) and a quarter of a validation batch; none of that is taken here.
  - Concat fusion shares one bias over the modalities (bias / M each); their heads have one bias
    each, which `--fusion sum` reproduces.
  - Evaluation protocol (ours for every method): the model is selected on val (they report the test
    split's epochs); weight initialisation, optimiser and schedule are the run's (they re-initialise
    with their `weight_init` and step their StepLR before each epoch).
"""
from __future__ import annotations

import argparse
import itertools
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models import FusionOutput, unwrap
from ..stepping import to_device
from .base import Method, register_method
from .common import require

# Their degree-5 fit of the learnt supervised weight against the 0-based epoch (Crema_epoch.py L49).
FIT_COEFFICIENTS = (2.04623704e-01, 3.35472727e-03, 1.22989557e-04, -2.92947416e-06, 2.23835486e-08,
                    -5.39717505e-11)
FIT_EPOCHS = 200  # the length of the run the curve was fitted on (data/crema.json)
HOLDOUT_USED = 0.5  # the learnt weights look at the first half of the held-out samples
ALPHA_RANGE = (0.05, 0.95)  # alpha_match is clipped to this range
HALVE_EVERY = 20  # lr_alpha halves at every positive multiple of this epoch


def fitted_alpha_cls(epoch: float) -> float:
    return sum(c * epoch ** i for i, c in enumerate(FIT_COEFFICIENTS))


def matching_loss(logits: Sequence[Tensor]) -> Tensor:
    """Their `Alignment`, averaged over pairs: 0.5 (KL(r || p) + KL(r || q)), r = (p + q) / 2, batch mean."""
    terms = []
    for s, t in itertools.combinations(logits, 2):
        log_p, log_q = F.log_softmax(s, 1), F.log_softmax(t, 1)
        r = 0.5 * (log_p.exp() + log_q.exp())
        kl_r_p = F.kl_div(log_p, r, reduction="batchmean")
        kl_r_q = F.kl_div(log_q, r, reduction="batchmean")
        terms.append(0.5 * (kl_r_p + kl_r_q))
    return torch.stack(terms).mean()


class MeanFusion(nn.Module):
    """The fusion head with its fused logits divided by the number of modalities: the mean of the
    per-modality logits (for concat and sum fusion the fused logits are their sum)."""

    def __init__(self, inner: nn.Module, count: int):
        super().__init__()
        self.inner, self.count = inner, count

    def forward(self, feats: Dict[str, Tensor]) -> FusionOutput:
        out = self.inner(feats)
        return FusionOutput(out.logits / self.count, out.unimodal_logits)


@register_method
class LFM(Method):
    name = "lfm"
    help = ("LFM (NeurIPS 2024): 2 (a(e) CE(mean of modality logits) + (1 - a(e)) matching divergence of the "
            "modalities' predictions), a(e) fitted or learnt per epoch")
    min_modalities = 2

    @classmethod
    def add_args(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--lfm_weighting", choices=("fitted", "learnable"), default="fitted",
                           help="the weight of the supervised loss per epoch: their fitted polynomial "
                                "(Crema_epoch.py) or learnt by a hypergradient on held-out training samples "
                                "(Crema_epoch_learnable.py) (default: %(default)s)")
        group.add_argument("--lfm_fit_epochs", type=int, default=0,
                           help="fitted: evaluate their 200-epoch curve at epoch * 200 / this; 0 = at the raw "
                                "0-based epoch, theirs (default: %(default)s)")
        group.add_argument("--lfm_alpha_init", type=float, default=0.95,
                           help="learnable: the matching loss's weight before the first update, in [0.05, 0.95] "
                                "(default: %(default)s)")
        group.add_argument("--lfm_lr_alpha", type=float, default=1e-4,
                           help="learnable: step size of the weight's hypergradient, halved every 20 epochs "
                                "(default: %(default)s)")
        group.add_argument("--lfm_holdout", type=int, default=16,
                           help="learnable: training samples held out of training for the hypergradient; the "
                                "first half of them is used (default: %(default)s)")

    @classmethod
    def check_args(cls, args) -> None:
        super().check_args(args)
        epochs = getattr(args, "epochs", 0)
        require([(args.lfm_fit_epochs >= 0, f"--lfm_fit_epochs must be >= 0, got {args.lfm_fit_epochs}"),
                 (args.lfm_weighting != "fitted" or args.lfm_fit_epochs > 0 or epochs <= FIT_EPOCHS,
                  f"--lfm_weighting fitted: their curve was fitted on {FIT_EPOCHS} epochs and diverges after "
                  f"them; with --epochs {epochs} set --lfm_fit_epochs (e.g. {epochs})"),
                 (ALPHA_RANGE[0] <= args.lfm_alpha_init <= ALPHA_RANGE[1],
                  f"--lfm_alpha_init must lie in [0.05, 0.95], got {args.lfm_alpha_init}"),
                 (args.lfm_lr_alpha >= 0, f"--lfm_lr_alpha must be >= 0, got {args.lfm_lr_alpha}"),
                 (args.lfm_holdout >= 2, f"--lfm_holdout must be >= 2, got {args.lfm_holdout}")])

    @classmethod
    def build_model(cls, info, **model_args) -> nn.Module:
        model = super().build_model(info, **model_args)
        if model.fusion_name not in ("concat", "sum"):
            raise ValueError(f"--method lfm needs per-modality logits from the fusion head; use --fusion concat or "
                             f"sum, not {model.fusion_name}")
        # Their prediction is the mean of the modalities' logits, in training and evaluation alike.
        model.fusion = MeanFusion(model.fusion, len(info.modality_names))
        return model

    def __init__(self, args, model, info):
        super().__init__(args, model, info)
        self.alpha_match = float(args.lfm_alpha_init)
        self.lr_alpha = float(args.lfm_lr_alpha)
        self.holdout: Optional[List[int]] = None
        self.held_batch: Optional[dict] = None  # {"inputs": {m: tensor}, "label": tensor} on the CPU

    # ------------------------------------------------------------------ the weights
    def weights(self, epoch: int) -> Tuple[float, float]:
        """(alpha_cls, alpha_match) of this epoch."""
        if self.args.lfm_weighting == "learnable":
            return 1.0 - self.alpha_match, self.alpha_match
        e = epoch if self.args.lfm_fit_epochs == 0 else epoch * FIT_EPOCHS / self.args.lfm_fit_epochs
        a = fitted_alpha_cls(e)
        return a, 1.0 - a

    def before_training(self, ctx) -> None:
        if self.args.lfm_weighting != "learnable" or self.held_batch is not None:
            return  # a resumed run brings its held-out batch back with the method's state
        n = len(ctx.train_loader.dataset)
        if self.args.lfm_holdout >= n:
            raise ValueError(f"--lfm_holdout {self.args.lfm_holdout} leaves no training sample (the split has {n})")
        g = torch.Generator().manual_seed(int(getattr(self.args, "random_seed", 0)))
        self.holdout = torch.randperm(n, generator=g)[:self.args.lfm_holdout].tolist()
        used = self.holdout[:max(int(len(self.holdout) * HOLDOUT_USED), 1)]
        # Drawn once through the training transform, as theirs (next(iter(val_loader)) once).
        raw = ctx.train_loader.collate_fn([ctx.train_loader.dataset[i] for i in used])
        inputs = to_device(raw["inputs"], ctx.device, ctx.train_transform, train=True)
        self.held_batch = {"inputs": {m: x.detach().cpu() for m, x in inputs.items()},
                           "label": torch.as_tensor(raw["label"]).cpu()}

    def epoch_indices(self, epoch, ctx):
        if self.holdout is None:
            return None
        held = set(self.holdout)
        return [i for i in range(len(ctx.train_loader.dataset)) if i not in held]

    def on_epoch_start(self, epoch, ctx) -> None:
        if self.args.lfm_weighting != "learnable":
            return
        delta = hypergradient(ctx.model, self.held_batch, self.weights(epoch), ctx.device, train_mode=epoch == 0)
        if epoch % HALVE_EVERY == 0 and epoch != 0:
            self.lr_alpha /= 2
        alpha = min(max(self.alpha_match - self.lr_alpha * delta, ALPHA_RANGE[0]), ALPHA_RANGE[1])
        self.alpha_match = float(ctx.broadcast(alpha))  # every process steps with rank 0's weight

    # ------------------------------------------------------------------ the step
    def loss(self, out, labels, epoch) -> Tuple[Tensor, Dict[str, float]]:
        a_cls, a_match = self.weights(epoch)
        cls = F.cross_entropy(out.logits, labels)  # out.logits: the mean of the modality logits
        match = matching_loss(list(out.unimodal_logits.values()))
        loss = 2 * (a_cls * cls + a_match * match)
        return loss, {"lfm_alpha_cls": a_cls, "lfm_cls": float(cls.detach()), "lfm_match": float(match.detach())}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "alpha_match": self.alpha_match, "lr_alpha": self.lr_alpha,
                "holdout": self.holdout, "held_batch": self.held_batch}

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        self.alpha_match = float(state.get("alpha_match", self.alpha_match))
        self.lr_alpha = float(state.get("lr_alpha", self.lr_alpha))
        self.holdout = state.get("holdout", self.holdout)
        self.held_batch = state.get("held_batch", self.held_batch)


def hypergradient(model: nn.Module, batch: dict, weights: Tuple[float, float], device, train_mode: bool) -> float:
    """Their alpha gradient: the mean, over the model's first parameter tensor, of the Hessian of
    alpha_cls CE + alpha_match A applied to the gradient of CE, on the held-out batch."""
    net = unwrap(model)
    was_training = net.training
    net.train(train_mode)
    try:
        inputs = {m: x.to(device) for m, x in batch["inputs"].items()}
        labels = batch["label"].to(device)
        out = net(inputs)
        cls = F.cross_entropy(out.logits, labels)
        total = weights[0] * cls + weights[1] * matching_loss(list(out.unimodal_logits.values()))
        params = [p for p in net.parameters() if p.requires_grad]
        g_total = torch.autograd.grad(total, params, create_graph=True, allow_unused=True)
        g_cls = torch.autograd.grad(cls, params, retain_graph=True, allow_unused=True)
        used = [(gt, gc) for gt, gc in zip(g_total, g_cls) if gt is not None and gc is not None and gt.requires_grad]
        hvp = torch.autograd.grad([gt for gt, _ in used], params, grad_outputs=[gc.detach() for _, gc in used],
                                  allow_unused=True)
    finally:
        net.train(was_training)
    first = hvp[0] if hvp[0] is not None else torch.zeros_like(params[0])
    return float(first.mean())
