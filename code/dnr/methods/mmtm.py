"""The mid-fusion model of the greedy-learner method (methods/greedy.py): two ResNet-18 encoders
with an MMTM block (Joze et al., CVPR 2020, as modified by Wu et al., ICML 2022) after their
stages 2, 3 and 4, and one classifier per branch whose logits are averaged.

Checked against nyukat/greedy_multimodal_learning at a190e03: `src/model.py` (`MMTM_MVCNN`,
L53-108) and `src/balanced_mmtm.py` (`MMTM_mitigate`, L16-154). For one block with channel
widths C_0, C_1 and stage outputs h_0, h_1:
    s_m = mean of h_m over its positions                          (B, C_m)
    e = relu(W_sq [s_0, s_1] + b_sq)                              (B, 2 (C_0 + C_1) / ratio)
    g_m = sigmoid(W_m e + b_m)                                    (B, C_m), ratio 4
    h_m <- h_m * g_m (broadcast over positions)
Every forward pass (training or evaluation, as their module has no mode check) updates the
running means of the gates, a_m <- (mean over the batch of g + a_m n) / (n + 1), n the passes
so far; their code feeds the gate of modality 0 into *both* running means (`vis_out` on L113 and
L114), which we reproduce unless `own_average` is set. In a re-balancing step for modality m
("curation mode, caring modality m" in their code) g_m is replaced by a_m (updated with this
batch first, no gradient): branch m gets no information from the other modality, while the
other branch still does. m's excitation layers then get a zero gradient (their PyTorch's
`zero_grad` filled zeros), so momentum and weight decay still move them.

Frames ((B, T, C, H, W), folded into the batch by the encoder): the squeeze averages over frames
and positions, one gate per clip applied to every frame (their views are single images).
"""
from __future__ import annotations

import contextlib
from typing import Dict, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.base import DatasetInfo
from ..models import ModelOutput
from ..models.encoders import ResNet18Encoder, create_encoder, default_encoder

# Their MMTM_MVCNN: blocks after layer2, layer3 and layer4 (widths 128, 256, 512), ratio 4. Fixed,
# not flags: a method's build_model sees only the model arguments a checkpoint stores.
MMTM_STAGES = (2, 3, 4)
SQUEEZE_RATIO = 4
AVERAGE_PASSES = ("all", "train")
ANALYSIS_MODES = ("record", "alone", "plain")


class MMTM(nn.Module):
    """One multi-modal transfer module between two modalities' feature maps (see the module
    docstring). Works on squeezed vectors: `forward({m: (B, C_m)}, caring)` -> gates {m: (B, C_m)}."""

    def __init__(self, names: Sequence[str], channels: Mapping[str, int], ratio: int = SQUEEZE_RATIO):
        super().__init__()
        if len(names) != 2:
            raise ValueError(f"an MMTM block joins two modalities, got {list(names)}")
        self.names = tuple(names)
        total = sum(channels[m] for m in self.names)
        hidden = int(2 * total / ratio)
        self.squeeze = nn.Linear(total, hidden)  # their fc_squeeze, shared by both modalities
        self.excite = nn.ModuleDict({m: nn.Linear(hidden, channels[m]) for m in self.names})  # fc_visual, fc_skeleton
        for m in self.names:
            self.register_buffer(f"average_{m}", torch.zeros(channels[m]))
        self.register_buffer("passes", torch.zeros((), dtype=torch.long))
        self.own_average = False  # True: a_1 follows g_1 (their code feeds g_0 into both)
        self.average_passes = "all"  # "train": only training-mode passes update the running means
        # Conditional utilisation (MMTMClassifier.analysis): "record" sums the squeezed vectors,
        # "alone" gives each modality's gates from its own squeeze and the others' recorded means,
        # "plain" is the plain model; none of them updates the running means.
        self.analysis: Optional[str] = None
        self.recorded: Dict[str, Tensor] = {}  # m -> (C_m + 1,) float64: sum of squeezes, then the count

    def average(self, m: str) -> Tensor:
        return getattr(self, f"average_{m}")

    def forward(self, squeezed: Mapping[str, Tensor], caring: Optional[str] = None) -> Dict[str, Tensor]:
        if self.analysis == "record":
            for m in self.names:
                s = squeezed[m].detach().double()
                total = torch.cat([s.sum(0), s.new_tensor([s.shape[0]])])
                self.recorded[m] = self.recorded[m] + total if m in self.recorded else total
        elif self.analysis == "alone":
            return self._gates_alone(squeezed)
        z = torch.cat([squeezed[m] for m in self.names], 1)  # (B, C_0 + C_1)
        excitation = F.relu(self.squeeze(z))
        gates = {m: torch.sigmoid(self.excite[m](excitation)) for m in self.names}
        if self.analysis is None and (self.training or self.average_passes == "all"):
            self._update_averages(gates)
        if caring is not None:
            if caring not in gates:
                raise KeyError(f"re-balancing modality {caring!r} is not one of {list(self.names)}")
            held = self.average(caring).clone().to(gates[caring].dtype)  # updated with this batch already
            # + 0 * gate: the same values, and a zero (not a missing) gradient for this modality's
            # excitation layer, as their PyTorch's zero_grad left it; DistributedDataParallel needs
            # every parameter in the graph.
            gates[caring] = held.expand_as(gates[caring]) + 0 * gates[caring]
        return gates

    def _gates_alone(self, squeezed: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        """Each modality's gates with the other modality's squeeze replaced by its recorded mean
        (their `turnoff_cross_modal_flow`, balanced_mmtm.py L72-91)."""
        gates = {}
        for m in self.names:
            parts = []
            for j in self.names:
                if j == m:
                    parts.append(squeezed[j])
                else:
                    mean = (self.recorded[j][:-1] / self.recorded[j][-1]).to(squeezed[m].dtype)
                    parts.append(mean.expand(squeezed[m].shape[0], -1))
            gates[m] = torch.sigmoid(self.excite[m](F.relu(self.squeeze(torch.cat(parts, 1)))))
        return gates

    @torch.no_grad()
    def _update_averages(self, gates: Mapping[str, Tensor]) -> None:
        n = float(self.passes)
        first = self.names[0]
        for m in self.names:
            source = gates[m] if self.own_average else gates[first]
            avg = self.average(m)
            avg.copy_((source.float().mean(0) + avg * n) / (n + 1))
        self.passes += 1


def squeeze_map(h: Tensor, frames: int) -> Tensor:
    """(B*T, C, H, W) -> (B, C): the mean over frames and positions of each clip."""
    return h.view(h.shape[0] // frames, frames, h.shape[1], -1).mean((1, 3))


def excite_map(h: Tensor, gate: Tensor, frames: int) -> Tensor:
    """(B*T, C, H, W) * (B, C) gate, repeated over the T frames of each clip."""
    if frames > 1:
        gate = gate.repeat_interleave(frames, 0)  # (B, C) -> (B*T, C)
    return h * gate[:, :, None, None]


class MMTMClassifier(nn.Module):
    """Two ResNet-18 encoders exchanging information through MMTM blocks, one Linear(512, C) head
    per branch; the fused logits are the mean of the two branches' (their `(x_0 + x_1) / 2`).
    `encoders` (ModuleDict) is what D&R's diagnosis reads; `encode` returns the branches' pooled
    features after the last block, the heads' inputs."""

    fusion_name = "mmtm"

    def __init__(self, info: DatasetInfo, encoders: Optional[Mapping[str, str]] = None,
                 encoder_options: Optional[Mapping[str, dict]] = None):
        super().__init__()
        names = info.modality_names
        if len(names) != 2:
            raise ValueError(f"--method greedy joins exactly two modalities with MMTM blocks (the authors' design); "
                             f"the data has {names}: choose two (built-in dataset: --builtin_modalities)")
        choice = dict(encoders or {})
        self.modalities = names
        self.encoder_names = {s.name: choice.get(s.name) or default_encoder(s) for s in info.modalities}
        opts = dict(encoder_options or {})
        built = {}
        for s in info.modalities:
            enc = create_encoder(self.encoder_names[s.name], s, **opts.get(self.encoder_names[s.name], {}))
            if not isinstance(enc, ResNet18Encoder):
                raise ValueError(f"--method greedy puts MMTM blocks between ResNet-18 stages; modality {s.name!r} "
                                 f"uses encoder {self.encoder_names[s.name]!r} (choose resnet18 with --encoders, "
                                 f"or image/spectrogram modalities, e.g. --builtin_modalities audio,visual)")
            built[s.name] = enc
        self.encoders = nn.ModuleDict(built)
        width = {i: {m: getattr(built[m].net, f"layer{i}")[-1].bn2.num_features for m in names} for i in MMTM_STAGES}
        self.mmtm = nn.ModuleDict({str(i): MMTM(names, width[i]) for i in MMTM_STAGES})
        self.heads = nn.ModuleDict({m: nn.Linear(built[m].out_dim, info.num_classes) for m in names})
        self.num_classes = info.num_classes

    def configure(self, own_average: bool = False, average_passes: str = "all") -> None:
        """How the blocks keep their running gate means (flags of --method greedy)."""
        if average_passes not in AVERAGE_PASSES:
            raise ValueError(f"average_passes must be one of {AVERAGE_PASSES}, got {average_passes!r}")
        for block in self.mmtm.values():
            block.own_average, block.average_passes = own_average, average_passes

    @contextlib.contextmanager
    def analysis(self, mode: str):
        """Passes inside run in an analysis mode of the blocks ("record" the squeezes, starting a
        new record; "alone" with the other modality's squeeze at its recorded mean; "plain" the
        model as it is) and leave the running gate means alone."""
        if mode not in ANALYSIS_MODES:
            raise ValueError(f"analysis mode must be one of {ANALYSIS_MODES}, got {mode!r}")
        for block in self.mmtm.values():
            if mode == "record":
                block.recorded = {}
            elif mode == "alone" and set(block.recorded) != set(block.names):
                raise RuntimeError("MMTM 'alone' passes need the squeezes recorded first (analysis('record'))")
            block.analysis = mode
        try:
            yield self
        finally:
            for block in self.mmtm.values():
                block.analysis = None

    def encode(self, inputs: Mapping[str, Tensor], caring: Optional[str] = None) -> Dict[str, Tensor]:
        missing = [m for m in self.modalities if m not in inputs]
        if missing:
            raise KeyError(f"model input lacks modalities {missing}; got {sorted(inputs)}")
        h, frames = {}, {}
        for m in self.modalities:
            enc, x = self.encoders[m], inputs[m]
            frames[m] = x.shape[1] if enc.frames else 1
            if enc.frames:
                x = x.flatten(0, 1)  # (B, T, C, H, W) -> (B*T, C, H, W)
            net = enc.net
            x = x.contiguous(memory_format=enc.memory_format)
            h[m] = net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(x)))))
        for i in MMTM_STAGES:
            for m in self.modalities:
                h[m] = getattr(self.encoders[m].net, f"layer{i}")(h[m])
            gates = self.mmtm[str(i)]({m: squeeze_map(h[m], frames[m]) for m in self.modalities}, caring)
            h = {m: excite_map(h[m], gates[m], frames[m]) for m in self.modalities}
        out = {}
        for m in self.modalities:
            z = torch.flatten(self.encoders[m].net.avgpool(h[m]), 1)  # (B*T, 512, h, w) -> (B*T, 512)
            out[m] = z.view(-1, frames[m], z.shape[1]).mean(1)  # (B*T, 512) -> (B, 512)
        return out

    def head(self, features: Mapping[str, Tensor]) -> ModelOutput:
        uni = {m: self.heads[m](features[m]) for m in self.modalities}
        fused = torch.stack([uni[m] for m in self.modalities]).mean(0)
        return ModelOutput(fused, dict(features), uni)

    def forward(self, inputs: Mapping[str, Tensor], feature_transform=None,
                caring: Optional[str] = None) -> ModelOutput:
        """`caring`: the modality of a re-balancing step (its gates held at their running means);
        None outside them and in evaluation."""
        feats = self.encode(inputs, caring)
        if feature_transform is not None:
            feats = feature_transform(feats)
        return self.head(feats)
