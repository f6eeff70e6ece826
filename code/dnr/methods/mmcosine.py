"""MMCosine: multi-modal cosine loss (Xu, Feng, Zhang & Hu, ICASSP 2023, "MMCosine: Multi-Modal
Cosine Loss Towards Balanced Audio-Visual Fine-Grained Learning").

Checked against the authors' released code: GeWu-Lab/MMCosine_ICASSP23 at 00ba0a9, `main_CD.py`
(`get_arguments` L52-87: `--scaling` 10; `train_epoch` L103-146: the cosine logits and the loss;
`valid` L165-217: what is evaluated), `models/fusion_modules.py` (`ConcatFusion` L20-28) and
`models/basic_model.py` (L45-66); `main_vox2.py` L123-128 and L182-193 for their other dataset;
their README's command (`--scaling 10`) and their answer in issue #1 (FiLM and gated fusion need a
much larger scale, e.g. 50). The mechanics below are theirs unless a flag says otherwise.

Training: for each modality m, with z_m its pooled feature and W_m its class weights (its slice of
the concat head's weight, (C, D_m); the per-modality Linear's weight for sum fusion), both
L2-normalised (the feature over its dimensions, each class row of W_m on its own):
    logits = s * sum_m  normalize(z_m) . normalize(W_m[c])         (cosine logits, no bias)
    loss   = CE(logits, y),   s = `--mmcosine_scale` (their `--scaling`, 10).
The head's bias takes no part, so it gets no gradient and keeps its initial value: here it is
frozen (requires_grad False), which is the same for SGD and Adam (both skip a parameter without a
gradient, weight decay included) and keeps DistributedDataParallel from waiting for it.

Evaluation, in their CREMA-D code: the fused prediction is the model's plain output, the head's
linear logits W [z_a; z_v] + b with the untrained bias (`valid` L181 and L196), while each
modality's accuracy uses its cosine logits s * cos(z_m, W_m) (L185-189). That is the default here
(`--mmcosine_eval linear`); `--mmcosine_eval cosine` predicts with the cosine logits of training,
as their VoxCeleb code does (`main_vox2.py` L192-193) and as the paper's classifier reads. The
model's head is wrapped (`CosineFusion`, built by `build_model`), so val selection, the test
numbers and --eval_only all use the chosen logits; s and the choice are buffers of the head, saved
with the model.

Remaining differences and their flags:
  - `--mmcosine_eval cosine`: see above.
  - Their `--lam` adds a supervised contrastive (NCE) loss between the two modalities' features
    (their supplementary material); its default is 0, it is not part of MMCosine and is not
    implemented here.
  - Fusion: concat and sum (a per-modality weight to normalise). Their FiLM and gated heads are
    symmetric (both modalities modulate each other and each keeps its own half of the output
    layer); ours modulate only the last modality, so there is no per-modality classifier and
    `--fusion film` / `gated` are refused.
  - Three or more modalities (their code has two): the cosine logits of every modality are summed,
    each with the same scale s.
  - Evaluation protocol (ours for every method): the model is selected on val; their optimiser
    (SGD, lr 1e-3, batch 32, 200 epochs, StepLR 100 / 0.1) is replaced by the run's.
"""
from __future__ import annotations

import argparse
from typing import Dict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models import unwrap
from ..models.fusion import ConcatFusion, FusionOutput, SumFusion
from .base import Method, register_method

FUSIONS = ("concat", "sum")
EVALS = ("linear", "cosine")


def class_weights(base: nn.Module) -> Dict[str, Tensor]:
    """Each modality's class weights (C, D_m): its slice of the concat head, or its own Linear."""
    if isinstance(base, ConcatFusion):
        return {m: base.fc.weight[:, a:b] for m, (a, b) in base.slices.items()}
    return {m: head.weight for m, head in base.heads.items()}


def cosine_logits(features: Dict[str, Tensor], weights: Dict[str, Tensor], scale) -> Dict[str, Tensor]:
    """s * cos(z_m, W_m[c]) for every modality: (B, D_m) features, (C, D_m) weights -> (B, C)."""
    return {m: scale * (F.normalize(features[m], dim=1) @ F.normalize(w, dim=1).t()) for m, w in weights.items()}


class CosineFusion(nn.Module):
    """A concat or sum head whose logits are the summed per-modality cosine logits in training (and
    in evaluation with `cosine_eval`); in evaluation without it, the wrapped head's own linear
    logits. The per-modality logits are always the cosine ones."""

    def __init__(self, base: nn.Module, scale: float = 10.0, cosine_eval: bool = False):
        super().__init__()
        if not isinstance(base, (ConcatFusion, SumFusion)):
            raise ValueError(f"--method mmcosine needs --fusion {' or '.join(FUSIONS)}, got a "
                             f"{type(base).__name__}")
        self.base = base
        self.register_buffer("scale", torch.tensor(float(scale)))
        # 1.0: predict with the cosine logits in evaluation too (a float, like every other model tensor)
        self.register_buffer("cosine_eval", torch.tensor(float(cosine_eval)))
        for name, p in base.named_parameters():
            if name.endswith("bias"):  # unused by the cosine logits: it keeps its initial value
                p.requires_grad_(False)

    def forward(self, feats: Dict[str, Tensor]) -> FusionOutput:
        uni = cosine_logits(feats, class_weights(self.base), self.scale)
        if self.training or bool(self.cosine_eval > 0):
            return FusionOutput(torch.stack(list(uni.values())).sum(0), uni)
        return FusionOutput(self.base(feats).logits, uni)


@register_method
class MMCosine(Method):
    name = "mmcosine"
    help = "MMCosine (ICASSP 2023): per-modality cosine logits s * cos(z_m, W_m) summed, cross-entropy"
    min_modalities = 2

    @classmethod
    def add_args(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--mmcosine_scale", type=float, default=10.0,
                           help="scale s of the cosine logits (the authors' --scaling; their README uses 10 "
                                "for concat; for FiLM/gated they advise about 50) (default: %(default)s)")
        group.add_argument("--mmcosine_eval", choices=EVALS, default="linear",
                           help="fused prediction in evaluation: the head's linear logits with its untrained "
                                "bias (the authors' CREMA-D code) or the cosine logits of training (their "
                                "VoxCeleb code, the paper) (default: %(default)s)")

    @classmethod
    def check_args(cls, args) -> None:
        super().check_args(args)
        if args.mmcosine_scale <= 0:
            raise ValueError(f"--mmcosine_scale must be > 0, got {args.mmcosine_scale}")
        fusion = getattr(args, "fusion", "concat")
        if fusion not in FUSIONS:
            raise ValueError(f"--method mmcosine needs per-modality class weights: --fusion {' or '.join(FUSIONS)}, "
                             f"got --fusion {fusion} (our film and gated heads modulate one modality by the others)")

    @classmethod
    def build_model(cls, info, **model_args) -> nn.Module:
        model = super().build_model(info, **model_args)
        # s and the evaluation choice are buffers: set from the flags in __init__, saved with the model.
        model.fusion = CosineFusion(model.fusion)
        return model

    def __init__(self, args, model, info):
        super().__init__(args, model, info)
        head = unwrap(model).fusion
        if not isinstance(head, CosineFusion):
            raise ValueError("--method mmcosine needs the model its build_model makes (a CosineFusion head)")
        head.scale.fill_(args.mmcosine_scale)
        head.cosine_eval.fill_(float(args.mmcosine_eval == "cosine"))
