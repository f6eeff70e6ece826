"""Fusion heads: a dict of per-modality features -> class logits (and, where the head allows it,
each modality's own logits).

concat  Linear over the concatenated features. A modality's logits are its slice of the weight
        plus bias / M (the usual "uni-modal output" of OGM-GE and its successors).
sum     one Linear per modality, logits summed; a modality's logits are its own Linear's output.
film    the last modality's feature is scaled and shifted (FiLM) by a projection of the others.
gated   the last modality's projected feature is gated by a sigmoid of the others' projection.
film and gated mix modalities before the classifier, so they have no per-modality logits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
from torch import Tensor, nn

FUSIONS = ("concat", "sum", "film", "gated")


@dataclass
class FusionOutput:
    logits: Tensor  # (B, C)
    unimodal_logits: Optional[Dict[str, Tensor]]  # modality -> (B, C), None if the head mixes


class ConcatFusion(nn.Module):
    def __init__(self, dims: Dict[str, int], num_classes: int):
        super().__init__()
        self.names = list(dims)
        self.slices, start = {}, 0
        for m, d in dims.items():
            self.slices[m] = (start, start + d)
            start += d
        self.fc = nn.Linear(start, num_classes)

    def forward(self, feats: Dict[str, Tensor]) -> FusionOutput:
        z = torch.cat([feats[m] for m in self.names], dim=1)  # (B, sum D_m)
        logits = self.fc(z)
        share = self.fc.bias / len(self.names)
        uni = {m: feats[m] @ self.fc.weight[:, a:b].t() + share for m, (a, b) in self.slices.items()}
        return FusionOutput(logits, uni)


class SumFusion(nn.Module):
    def __init__(self, dims: Dict[str, int], num_classes: int):
        super().__init__()
        self.heads = nn.ModuleDict({m: nn.Linear(d, num_classes) for m, d in dims.items()})

    def forward(self, feats: Dict[str, Tensor]) -> FusionOutput:
        uni = {m: head(feats[m]) for m, head in self.heads.items()}
        return FusionOutput(torch.stack(list(uni.values())).sum(0), uni)


class _ConditionedFusion(nn.Module):
    """Shared plumbing of FiLM and gated fusion: the last modality is the one modulated."""

    def __init__(self, dims: Dict[str, int], num_classes: int, hidden: int, kind: str):
        super().__init__()
        if len(dims) < 2:
            raise ValueError(f"--fusion {kind} needs at least two modalities, got {list(dims)}")
        self.names = list(dims)
        self.target = self.names[-1]
        self.others = self.names[:-1]
        cond_dim = sum(dims[m] for m in self.others)
        self.value = nn.Linear(dims[self.target], hidden)
        self.cond = nn.Linear(cond_dim, 2 * hidden if kind == "film" else hidden)
        self.fc_out = nn.Linear(hidden, num_classes)

    def condition(self, feats: Dict[str, Tensor]) -> Tensor:
        return self.cond(torch.cat([feats[m] for m in self.others], dim=1))


class FiLMFusion(_ConditionedFusion):
    def __init__(self, dims, num_classes, hidden=512):
        super().__init__(dims, num_classes, hidden, "film")

    def forward(self, feats: Dict[str, Tensor]) -> FusionOutput:
        gamma, beta = self.condition(feats).chunk(2, dim=1)  # (B, 2H) -> 2 x (B, H)
        return FusionOutput(self.fc_out(gamma * self.value(feats[self.target]) + beta), None)


class GatedFusion(_ConditionedFusion):
    def __init__(self, dims, num_classes, hidden=512):
        super().__init__(dims, num_classes, hidden, "gated")

    def forward(self, feats: Dict[str, Tensor]) -> FusionOutput:
        gate = torch.sigmoid(self.condition(feats))
        return FusionOutput(self.fc_out(gate * self.value(feats[self.target])), None)


def create_fusion(name: str, dims: Dict[str, int], num_classes: int) -> nn.Module:
    table = {"concat": ConcatFusion, "sum": SumFusion, "film": FiLMFusion, "gated": GatedFusion}
    if name not in table:
        raise ValueError(f"unknown --fusion {name!r}; choose one of {list(FUSIONS)}")
    return table[name](dims, num_classes)
