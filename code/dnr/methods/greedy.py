"""Greedy learner: balanced multi-modal learning (Wu, Jastrzebski, Cho, Geras, ICML 2022,
"Characterizing and Overcoming the Greedy Nature of Learning in Multi-modal Deep Neural Networks").

Checked against the authors' released code: nyukat/greedy_multimodal_learning at a190e03,
`src/model.py` (`MMTM_MVCNN`, L15-108: the model), `src/balanced_mmtm.py` (`MMTM_mitigate`,
L16-154: the blocks and re-balancing steps), `src/callbacks.py` (`Bias_Mitigation_Strong`,
L173-267: conditional learning speed and the switch; `Bias_Mitigation_Random`, L269-302),
`src/framework.py` (`Model_.train_loop`, L270-345: zero_grad, forward, backward, callback,
step), `train.py` (`blend_loss`, L21-28) and `configs/training_guided.gin` (defaults). The paper
itself was not available to us; its text is not what this follows.

The model (methods/mmtm.py, built by `build_model`): two ResNet-18 encoders with MMTM blocks after
stages 2, 3 and 4 (squeeze ratio 4), one Linear(512, C) head per branch, fused logits = mean of
the two branches' logits. Loss = CE(branch 0) + CE(branch 1) (their `blend_loss`).

Conditional learning speed, after every backward pass (before the optimiser step, on the gradient
of the loss alone): for each modality m, with |.|^2 summed over a group of parameters,
    bypass_m = MMTM squeeze layers (shared: counted for both) + modality m's excitation layers,
    main_m   = modality m's encoder and head,
    M_b,m += |grad(bypass_m)|^2 / |bypass_m|^2,   M_main,m += |grad(main_m)|^2 / |main_m|^2
(sums over every such step of the run, never reset), BDR_m = log10(M_b,m / M_main,m) and
d = BDR_0 - BDR_1. The switch (their callback, `--greedy_threshold` 0.01, `--greedy_window` 5):
  - before `--greedy_starts` (0-based 1: their starting_epoch 2 counts from 1): d is computed
    every step, never acted upon;
  - afterwards, outside re-balancing: d is computed; if |d| > threshold the next `window` steps are
    re-balancing steps for modality 0 if d > 0, modality 1 if d < 0; inside them d is neither
    computed nor accumulated, and the step after the last one computes it again.
A re-balancing step for m holds m's MMTM gates at their running means (nothing flows back through
them), so branch m learns from its own modality only. Modality 0 is the dataset's first modality.

Remaining differences and their flags:
  - `--greedy_own_average`: their code feeds modality 0's gates into both running means (the
    `vis_out` of `balanced_mmtm.py` L114); by default we do the same, the flag uses each
    modality's own gates.
  - `--greedy_average_passes train`: their running means also count evaluation passes (their
    module has no mode check; val and test run each epoch); by default ours do too, every pass of
    the model included (with --track_purity, the diagnosis's feature passes; the final
    evaluations come after training and change nothing used).
  - `--greedy_mode random`: their `Bias_Mitigation_Random`: after the start, each step draws
    uniformly among a plain step and a re-balancing step for either modality (seeded by
    --random_seed and the step number).
  - Evaluation (ours for every method) always runs the plain model; their evaluation passes take
    whatever re-balancing state training ended the epoch in.
  - The squeeze ratio (4) and the stages (2, 3, 4) are the authors' and fixed: the model is rebuilt
    from the checkpoint's model arguments, which do not hold method flags.
  - Their encoders see single images; for frames (B, T, C, H, W) folded into the batch, the
    squeeze averages over frames and positions and the gate applies to every frame.
  - In a re-balancing step the held modality's excitation layers get a zero gradient, so the
    optimiser's momentum and weight decay still move them: their code under the PyTorch of its
    time (zero_grad filled zeros); with their optimiser (no momentum, no weight decay) the layers
    stay put either way.
  - Parameters without a gradient count as zero in the speeds (their code would fail on them);
    with --amp fp16, a step whose gradients overflow (the scaler skips it) adds nothing to them.
  - Under DistributedDataParallel the gradients are averaged before d is computed, so every
    process switches alike; the running means are broadcast from rank 0 with the buffers.
  - `--greedy_utilization val|test` (off by default) logs the conditional utilisation rates
    after every epoch (`conditional_utilization`); their code records the squeezes with a
    separate evaluation run on a trained model and leaves the rate's arithmetic to the reader:
    u(other | m) = (A_m - A_m,alone) / A_m is our reading. Its passes leave the running means
    alone (theirs update them, which does not matter in a separate run).
  - Evaluation protocol (ours for every method): the model is selected on val, with the run's
    optimiser and schedule (theirs: SGD lr 0.1 without momentum, ReduceLROnPlateau, early stop).
Three or more modalities, or an encoder that is not a staged ResNet-18 (the built-in `sensor`
MLP): refused. MMTM blocks and the switch d = BDR_0 - BDR_1 are defined for two modalities.
"""
from __future__ import annotations

import argparse
import math
import random
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed as dist
from ..metrics import accuracy
from ..models import unwrap
from .base import Method, register_method
from .common import require
from .mmtm import AVERAGE_PASSES, MMTMClassifier

MODES = ("guided", "random")


def squared_norms(params: Sequence[Tensor]) -> Tuple[Tensor, Tensor]:
    """(|theta|^2, |grad|^2) summed over a group of parameters, as float64 tensors on their device
    (a missing gradient counts as zero)."""
    weights = torch.stack([p.detach().double().pow(2).sum() for p in params]).sum()
    grads = [p.grad.detach().double().pow(2).sum() for p in params if p.grad is not None]
    return weights, (torch.stack(grads).sum() if grads else torch.zeros_like(weights))


def speed_ratios(net: MMTMClassifier) -> Dict[str, Dict[str, float]]:
    """{"bypass": {m: |grad|^2 / |theta|^2}, "main": {m: ...}} of this step's gradients (module
    docstring); one transfer from the device for all of them."""
    shared = [p for block in net.mmtm.values() for p in block.squeeze.parameters()]
    keys, sums = [], []
    for m in net.modalities:
        own = [p for block in net.mmtm.values() for p in block.excite[m].parameters()]
        groups = {"bypass": shared + own,
                  "main": list(net.encoders[m].parameters()) + list(net.heads[m].parameters())}
        for kind, params in groups.items():
            keys.append((kind, m))
            sums.extend(squared_norms(params))
    values = torch.stack(sums).tolist()  # [w, g, w, g, ...]
    out: Dict[str, Dict[str, float]] = {"bypass": {}, "main": {}}
    for i, (kind, m) in enumerate(keys):
        out[kind][m] = values[2 * i + 1] / values[2 * i]
    return out


def conditional_utilization(net: MMTMClassifier, evaluate, split: str, device) -> Dict[str, float]:
    """The conditional utilisation rates of the paper, measured as their released code allows
    (`configs/recording.gin`, `configs/eval.gin`, `MMTM_mitigate`'s `turnoff_cross_modal_flow`):
    the mean squeeze of every block and modality over the training split (evaluation transform),
    then on `split` each branch's accuracy A_m with both modalities and A_m,alone with the other
    modality's squeeze replaced by that mean; u(other | m) = (A_m - A_m,alone) / A_m, the
    accuracy branch m owes to the other modality. None of these passes moves the running means."""
    with net.analysis("record"):
        evaluate("train")
    for block in net.mmtm.values():  # several processes: every shard's squeezes
        for m, total in block.recorded.items():
            block.recorded[m] = total.new_tensor(dist.all_reduce_sum(total.tolist(), device))
    with net.analysis("plain"):
        both = evaluate(split)
    with net.analysis("alone"):
        alone = evaluate(split)
    out = {}
    for m in net.modalities:
        other = next(j for j in net.modalities if j != m)
        a = accuracy(both.unimodal_logits[m], both.labels)
        a_alone = accuracy(alone.unimodal_logits[m], alone.labels)
        out[f"greedy_acc_{m}"] = a
        out[f"greedy_acc_{m}_alone"] = a_alone
        out[f"greedy_utilization_{other}_given_{m}"] = (a - a_alone) / a if a > 0 else 0.0
    return out


class Rebalancer:
    """The authors' switch between plain and re-balancing steps (`Bias_Mitigation_Strong` and
    `Bias_Mitigation_Random`). `caring` is the modality whose next forward pass is a re-balancing
    step, None for a plain step; `after_backward` decides it for the next step."""

    def __init__(self, names, threshold: float, window: int, mode: str = "guided", seed: int = 0):
        self.names = list(names)
        self.threshold, self.window, self.mode, self.seed = threshold, window, mode, seed
        self.bypass = {m: 0.0 for m in self.names}  # cumulative sums M
        self.main = {m: 0.0 for m in self.names}
        self.caring: Optional[str] = None
        self.rebalanced = 0  # re-balancing steps taken in the current window
        self.d: Optional[float] = None
        self.steps = 0

    def speed_difference(self, ratios: Mapping[str, Mapping[str, float]]) -> Optional[float]:
        values = [ratios[kind][m] for kind in ("bypass", "main") for m in self.names]
        if not all(math.isfinite(v) for v in values):  # --amp fp16 overflow: the scaler skips this step
            return self.d
        for m in self.names:
            self.bypass[m] += ratios["bypass"][m]
            self.main[m] += ratios["main"][m]
        bdr = [math.log10(self.bypass[m] / self.main[m]) for m in self.names]
        self.d = bdr[0] - bdr[1]
        return self.d

    def after_backward(self, ratios, unlocked: bool) -> None:
        """`ratios`: a callable giving `speed_ratios` of this step (only called when needed)."""
        self.steps += 1
        if self.mode == "random":
            choice = random.Random(f"greedy/{self.seed}/{self.steps}").choice([0, 1, 2]) if unlocked else 0
            self.caring = {0: None, 1: self.names[1], 2: self.names[0]}[choice]
            return
        if not unlocked:
            self.speed_difference(ratios())
            self.caring = None
        elif self.caring is None:
            d = self.speed_difference(ratios())
            if d is not None and abs(d) > self.threshold:
                self.caring, self.rebalanced = (self.names[0] if d > 0 else self.names[1]), 0
        else:
            self.rebalanced += 1
            if self.rebalanced == self.window:
                self.caring = None

    def state_dict(self) -> dict:
        return {"bypass": dict(self.bypass), "main": dict(self.main), "caring": self.caring,
                "rebalanced": self.rebalanced, "d": self.d, "steps": self.steps}

    def load_state_dict(self, state: Mapping) -> None:
        self.bypass, self.main = dict(state["bypass"]), dict(state["main"])
        self.caring, self.rebalanced = state["caring"], int(state["rebalanced"])
        self.d, self.steps = state["d"], int(state["steps"])


@register_method
class Greedy(Method):
    name = "greedy"
    help = ("greedy learner (ICML 2022): MMTM mid-fusion; re-balancing steps hold a modality's gates at their "
            "running means when the conditional learning speeds differ")
    min_modalities = 2

    @classmethod
    def add_args(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--greedy_threshold", type=float, default=0.01,
                           help="re-balance when |d| = |BDR_0 - BDR_1| (log10 units) exceeds this "
                                "(default: %(default)s)")
        group.add_argument("--greedy_window", type=int, default=5,
                           help="optimisation steps in each run of re-balancing steps (default: %(default)s)")
        group.add_argument("--greedy_starts", type=int, default=1,
                           help="first 0-based epoch in which re-balancing may happen; before it d is only "
                                "accumulated (default: %(default)s, the authors' starting_epoch 2 counted from 1)")
        group.add_argument("--greedy_mode", choices=MODES, default="guided",
                           help="'guided': switch on the conditional learning speed; 'random': the authors' random "
                                "variant, a uniform draw each step among plain and re-balancing for either "
                                "modality (default: %(default)s)")
        group.add_argument("--greedy_own_average", action="store_true",
                           help="each modality's held gates are the running mean of its own gates (the authors' "
                                "code uses modality 0's for both) (default: off)")
        group.add_argument("--greedy_utilization", choices=("off", "val", "test"), default="off",
                           help="after each epoch, the conditional utilisation rates on this split: each "
                                "branch's accuracy with the other modality's squeeze replaced by its mean over "
                                "the training split (3 extra passes: train, twice this split) (default: %(default)s)")
        group.add_argument("--greedy_average_passes", choices=AVERAGE_PASSES, default="all",
                           help="which forward passes update the running gate means: 'all' (the authors', "
                                "evaluation included) or 'train' (default: %(default)s)")

    @classmethod
    def check_args(cls, args) -> None:
        super().check_args(args)
        require([(args.greedy_threshold >= 0, f"--greedy_threshold must be >= 0, got {args.greedy_threshold}"),
                 (args.greedy_window >= 1, f"--greedy_window must be >= 1, got {args.greedy_window}"),
                 (args.greedy_starts >= 0, f"--greedy_starts must be >= 0, got {args.greedy_starts}"),
                 (getattr(args, "fusion", "concat") == "concat",
                  f"--fusion {getattr(args, 'fusion', None)}: --method greedy fuses through MMTM blocks and averages "
                  f"one head per branch (the authors' model); leave --fusion at its default")])

    @classmethod
    def build_model(cls, info, fusion: str = "concat", encoders=None, encoder_options=None) -> nn.Module:
        return MMTMClassifier(info, encoders=encoders, encoder_options=encoder_options)

    def __init__(self, args, model, info):
        super().__init__(args, model, info)
        net = unwrap(model)
        if not isinstance(net, MMTMClassifier):
            raise TypeError("--method greedy trains the model its build_model makes (MMTMClassifier)")
        net.configure(own_average=args.greedy_own_average, average_passes=args.greedy_average_passes)
        self.switch = Rebalancer(net.modalities, args.greedy_threshold, args.greedy_window, args.greedy_mode,
                                 args.random_seed)
        self._caring: Optional[str] = None

    def forward(self, model, inputs, labels):
        self._caring = self.switch.caring  # what this step's forward pass does
        return model(inputs, caring=self._caring)

    def loss(self, out, labels, epoch):
        losses = {m: F.cross_entropy(u, labels) for m, u in out.unimodal_logits.items()}
        logs = {f"greedy_loss_{m}": float(v.detach()) for m, v in losses.items()}
        return sum(losses.values()), logs

    def before_step(self, model, out, labels, epoch):
        net = unwrap(model)
        self.switch.after_backward(lambda: speed_ratios(net), unlocked=epoch >= self.args.greedy_starts)
        logs = {f"greedy_rebalance_{m}": float(self._caring == m) for m in net.modalities}
        if self.switch.d is not None:
            logs["greedy_d_speed"] = self.switch.d
        return logs

    def on_epoch_end(self, epoch, ctx):
        out = super().on_epoch_end(epoch, ctx)
        if self.args.greedy_utilization != "off":
            if ctx.evaluate is None:
                raise ValueError("--greedy_utilization needs a TrainContext with `evaluate` (the trainer's)")
            out.update(conditional_utilization(unwrap(ctx.model), ctx.evaluate, self.args.greedy_utilization,
                                               ctx.device))
        return out

    def state_dict(self) -> dict:
        return {**super().state_dict(), "switch": self.switch.state_dict()}

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        if "switch" in state:
            self.switch.load_state_dict(state["switch"])
