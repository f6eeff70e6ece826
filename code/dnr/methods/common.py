"""Pieces shared by the imbalance methods (SPEC notation: s_m are modality m's uni-modal logits,
S_m = sum over the batch of softmax(s_m)[y])."""
from __future__ import annotations

import argparse
from typing import Dict, Mapping, Optional

import torch
from torch import Tensor, nn

from ..models.classifier import ModelOutput


def true_class_score(logits: Tensor, labels: Tensor) -> float:
    """S = sum over the batch of softmax(logits)[y] (no gradient)."""
    with torch.no_grad():
        return float(torch.softmax(logits.detach().float(), 1).gather(1, labels[:, None]).sum())


def ratio_to_others(scores: Mapping[str, float], eps: float = 1e-12) -> Dict[str, float]:
    """rho_m = S_m / mean of the other modalities' S. With two modalities this is the usual
    S_a / S_v and S_v / S_a; with more it compares each modality with the average of the rest."""
    names = list(scores)
    if len(names) < 2:
        raise ValueError("a modality ratio needs at least two modalities")
    out = {}
    for m in names:
        others = sum(scores[j] for j in names if j != m) / (len(names) - 1)
        out[m] = scores[m] / max(others, eps)
    return out


def require_unimodal_logits(out: ModelOutput, method: str) -> Dict[str, Tensor]:
    if out.unimodal_logits is None:
        raise ValueError(f"--method {method} needs per-modality logits from the fusion head; "
                         f"use --fusion concat or sum (film and gated mix modalities before the classifier)")
    return out.unimodal_logits


def in_window(epoch: int, starts: int, ends: Optional[int]) -> bool:
    """Modulation is active for starts <= epoch <= ends (0-based; ends None = to the end)."""
    return epoch >= starts and (ends is None or epoch <= ends)


def require(rules) -> None:
    """Raise ValueError with the message of the first (ok, message) rule that fails."""
    for ok, message in rules:
        if not ok:
            raise ValueError(message)


def window_rules(args: argparse.Namespace, prefix: str):
    """The checks of the --<prefix>_starts / --<prefix>_ends pair."""
    starts, ends = getattr(args, f"{prefix}_starts"), getattr(args, f"{prefix}_ends")
    return [(starts >= 0, f"--{prefix}_starts must be >= 0, got {starts}"),
            (ends is None or ends >= starts, f"--{prefix}_ends ({ends}) must be >= --{prefix}_starts ({starts})")]


def add_window_args(group: argparse._ArgumentGroup, prefix: str, starts: int, ends: Optional[int]) -> None:
    group.add_argument(f"--{prefix}_starts", type=int, default=starts,
                       help="first 0-based epoch of the modulation (default: %(default)s)")
    group.add_argument(f"--{prefix}_ends", type=int, default=ends,
                       help="last 0-based epoch of the modulation, inclusive; unset = to the end "
                            "(default: %(default)s)")



def add_unimodal_heads(model: nn.Module, num_classes: int, modalities) -> nn.Module:
    """Give `model` the method's own uni-modal classifiers, one Linear(D_m, C) per modality in
    `model.unimodal_heads` (PyTorch's default initialisation), beside the fusion head."""
    model.unimodal_heads = nn.ModuleDict({m: nn.Linear(model.encoders[m].out_dim, num_classes) for m in modalities})
    return model
