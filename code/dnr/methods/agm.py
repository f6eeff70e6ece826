"""AGM: adaptive gradient modulation (Li et al., ICCV 2023).

Checked against the authors' released code: lihong2303/AGM_ICCV2023 at 5a65542,
`model/CREMAD_net.py` (`GradMod`, L25-72: the response modules and their backward hooks) and
`run/CREMAD_main.py` (`train`, L44-248: scores, coefficients, running means, clipping; `CREMAD_main`
L612-613: running means start at 0); three modalities: `model/URFunny_net.py` and
`run/URFunny_main.py`. The mechanics below are theirs unless a flag says otherwise.

One step, with h(S) the fusion head applied to the features of the modalities in S and the
features of an all-zero input for the others:
  1. the ordinary forward pass in training mode gives the fused logits T = h(all);
  2. the model is switched to evaluation mode (BatchNorm uses, and leaves, its running statistics)
     and h(S) is computed for every proper, non-empty subset S, *with* gradient: the real
     modalities' features are recomputed in evaluation mode, the absent ones come from zero inputs;
  3. mono-modal responses by exact Shapley attribution,
         o_m = sum over subsets S of the others of |S|! (M - |S| - 1)! / M! (h(S + {m}) - h(S)) + h({}) / M,
     in which h({}) cancels (so it is never computed) and the o_m add up to T;
  4. scores s_m = mean over the batch of -log softmax(o_m)[y], each probability floored at 1e-8;
     ratio_m = exp(mean of the others' s - s_m); the "optimal" ratio is the same formula on the
     running means R_m; k_m = exp(alpha * min(optimal_m - ratio_m, 10)) (`--agm_cap`);
  5. R_m <- R_m (t - 1) / t + s_m / t, t the 1-based step count of the run: a cumulative mean over
     every step, inside the window or not, starting from R = 0 (so the first step's optimal ratio
     is 1);
  6. loss = CE(sum_m o_m, y), where the gradient flowing into o_m is multiplied by k_m (their
     backward hooks on the responses). The fusion head's slices are therefore scaled too, and both
     encoders get gradient through the evaluation-mode passes, the zero-input ones included;
  7. after the backward pass (and fp16 unscaling): if any element of the fusion head's weight
     gradients exceeds 1 in magnitude, the gradient norm of the whole model is clipped to 1
     (`--agm_clip`; the authors check `fc_out.weight`, the concat head's one weight matrix).
Inside the window (0-based epochs here) the hooks get this step's k; outside it they keep the last
k set (1 before the first), as the authors' hooks do. Evaluation uses the plain fused logits,
which the responses add up to.

Remaining differences and their flags:
  - Windows: the authors count epochs from 1 (their default window, epochs 1-20, is our
    `--agm_starts 0 --agm_ends 19`); our default window runs to the end.
  - Each encoder runs once per pass kind (training mode, evaluation mode, one all-zero sample in
    evaluation mode, expanded to the batch) instead of once per subset: the same values and
    gradients (in evaluation mode a sample's features do not depend on the rest of its batch).
  - Three modalities: the authors' UR-Funny code uses a cap of 7 and clips at 5 (`--agm_cap 7
    --agm_clip 5`); defaults are their CREMA-D values.
  - The fusion head's weight gradients: for sum, FiLM and gated fusion every weight matrix of the
    head is checked (their code has the concat head only).
  - Under DistributedDataParallel the scores are averaged over processes, so all scale alike.
  - Earlier versions of this project scaled only the encoders' gradients, from responses computed
    without gradient on training-mode features, without clipping, and claimed the code was not
    available; that variant is gone.
  - Evaluation protocol (ours for every method): the model is selected on val.
"""
from __future__ import annotations

import argparse
import itertools
import math
from typing import Callable, Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed as dist
from ..models import unwrap
from .base import Method, register_method
from .common import add_window_args, in_window, require, window_rules


def shapley_responses(names: Sequence[str], full: Tensor, h: Callable[[tuple], Tensor]) -> Dict[str, Tensor]:
    """Exact Shapley responses o_m (+ h({}) / M, which cancels) from the fused logits `full` = h(all)
    and `h(subset)` for the proper, non-empty subsets of `names`."""
    n = len(names)
    cache = {}

    def value(subset):
        if len(subset) == n:
            return full
        key = frozenset(subset)
        if key not in cache:
            cache[key] = h(tuple(m for m in names if m in key))
        return cache[key]

    out = {}
    for m in names:
        others = [j for j in names if j != m]
        terms = []
        for size in range(len(others) + 1):
            weight = math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)
            for subset in itertools.combinations(others, size):
                terms.append(weight * value(subset + (m,)))
                if subset:  # h({}) enters with -1/M and the +h({})/M term removes it
                    terms.append(-weight * value(subset))
        out[m] = torch.stack(terms).sum(0)
    return out


def response_passes(net, inputs: Dict[str, Tensor], names: Sequence[str]) -> Callable[[tuple], Tensor]:
    """h(subset) for the subsets of `names`: the head on evaluation-mode features of the modalities in
    the subset and of an all-zero input for the others, all with gradient. The model is in evaluation
    mode while the encoders run and back in its former mode afterwards."""
    was_training = net.training
    net.eval()
    try:
        real = {m: net.encoders[m](inputs[m]) for m in names}
        zero = {m: net.encoders[m](torch.zeros_like(inputs[m][:1])) for m in names}  # (1, D_m)
    finally:
        net.train(was_training)
    batch = next(iter(real.values())).shape[0]
    return lambda subset: net.head({m: real[m] if m in subset else zero[m].expand(batch, -1)
                                    for m in names}).logits


def mono_scores(responses: Dict[str, Tensor], labels: Tensor) -> Dict[str, float]:
    """s_m = mean over the batch of -log softmax(o_m)[y], each probability floored at 1e-8."""
    with torch.no_grad():
        return {m: float(-(torch.log_softmax(o.detach().float(), 1).gather(1, labels[:, None])
                           .clamp_min(math.log(1e-8))).mean())
                for m, o in responses.items()}


def agm_coefficients(scores: Dict[str, float], running: Dict[str, float], alpha: float,
                     cap: float = 10.0) -> Dict[str, float]:
    """k_m = exp(alpha * min(optimal_m - ratio_m, cap)) from this step's and the running mono scores."""
    def ratios(values):
        names = list(values)
        return {m: math.exp(sum(values[j] for j in names if j != m) / (len(names) - 1) - values[m])
                for m in names}

    now, optimal = ratios(scores), ratios(running)
    return {m: math.exp(alpha * min(optimal[m] - now[m], cap)) for m in scores}


def head_weights(net) -> List[Tensor]:
    """The fusion head's weight matrices, whose gradient decides AGM's clipping."""
    return [p for p in net.fusion.parameters() if p.dim() >= 2]


@register_method
class AGM(Method):
    name = "agm"
    help = "AGM (ICCV 2023): Shapley mono-modal responses, their gradients scaled from running score ratios"
    min_modalities = 2

    @classmethod
    def add_args(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--agm_alpha", type=float, default=1.0,
                           help="alpha in k_m = exp(alpha * (optimal ratio - current ratio)) (default: %(default)s)")
        group.add_argument("--agm_cap", type=float, default=10.0,
                           help="upper bound of optimal ratio - current ratio in the exponent; the authors' "
                                "CREMA-D code uses 10, their UR-Funny code 7 (default: %(default)s)")
        group.add_argument("--agm_clip", type=float, default=1.0,
                           help="when a fusion-head weight gradient exceeds this in magnitude, clip the "
                                "model's gradient norm to it; 0 disables; the authors' CREMA-D code uses 1, "
                                "their UR-Funny code 5 (default: %(default)s)")
        add_window_args(group, "agm", 0, None)

    @classmethod
    def check_args(cls, args) -> None:
        super().check_args(args)
        require([(args.agm_alpha >= 0, f"--agm_alpha must be >= 0, got {args.agm_alpha}"),
                 (args.agm_cap > 0, f"--agm_cap must be > 0, got {args.agm_cap}"),
                 (args.agm_clip >= 0, f"--agm_clip must be >= 0, got {args.agm_clip}")]
                + window_rules(args, "agm"))

    def __init__(self, args, model, info):
        super().__init__(args, model, info)
        self.running = {m: 0.0 for m in info.modality_names}
        self.steps = 0
        self.scale = {m: 1.0 for m in info.modality_names}  # what the authors' hooks hold

    def forward(self, model, inputs, labels):
        net = unwrap(model)
        names = list(net.modalities)
        passes = {}

        def keep_passes(feats):
            # Inside the model's forward (so DistributedDataParallel sees the whole step), after the
            # training-mode encoders ran: the evaluation-mode passes use the updated BatchNorm statistics.
            passes["h"] = response_passes(net, inputs, names)
            return feats

        out = model(inputs, feature_transform=keep_passes)
        self._responses = shapley_responses(names, out.logits, passes["h"])
        return out

    def loss(self, out, labels, epoch):
        responses, self._responses = self._responses, None  # this step's graph, used once
        # Mean over every process's batch: all processes scale by the same k.
        scores = dist.all_reduce_dict(mono_scores(responses, labels), labels.device, mean=True)
        coeff = agm_coefficients(scores, self.running, self.args.agm_alpha, self.args.agm_cap)
        self.steps += 1
        t = self.steps
        self.running = {m: self.running[m] * (t - 1) / t + scores[m] / t for m in scores}
        if in_window(epoch, self.args.agm_starts, self.args.agm_ends):
            self.scale = dict(coeff)
        scaled = []
        for m, o in responses.items():
            if o.requires_grad:
                o.register_hook(lambda g, k=self.scale[m]: g * k)
            scaled.append(o)
        logs = {f"agm_coeff_{m}": k for m, k in self.scale.items()}
        logs.update({f"agm_score_{m}": v for m, v in scores.items()})
        return F.cross_entropy(torch.stack(scaled).sum(0), labels), logs

    def before_step(self, model, out, labels, epoch):
        net = unwrap(model)
        clip = self.args.agm_clip
        if clip <= 0:
            return {}
        grads = [p.grad for p in head_weights(net) if p.grad is not None]
        clipped = bool(grads) and max(float(g.abs().max()) for g in grads) > clip
        if clipped:
            nn.utils.clip_grad_norm_(net.parameters(), max_norm=clip)
        return {"agm_clipped": float(clipped)}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "running": self.running, "steps": self.steps, "scale": self.scale}

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        self.running = dict(state.get("running", self.running))
        self.steps = int(state.get("steps", 0))
        self.scale = dict(state.get("scale", self.scale))
