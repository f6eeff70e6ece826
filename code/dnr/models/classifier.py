"""The multimodal classifier: one encoder per modality (as the dataset lists them) + a fusion head."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Optional

from torch import Tensor, nn

from ..data.base import DatasetInfo
from .encoders import create_encoder, default_encoder
from .fusion import create_fusion


@dataclass
class ModelOutput:
    logits: Tensor  # (B, C) fused class logits
    features: Dict[str, Tensor]  # modality -> pooled feature (B, D_m)
    unimodal_logits: Optional[Dict[str, Tensor]] = None  # modality -> (B, C), concat/sum only


class MultimodalClassifier(nn.Module):
    """`encoders` is a ModuleDict keyed by modality: D&R and the comparison methods act on it."""

    def __init__(self, info: DatasetInfo, fusion: str = "concat",
                 encoders: Optional[Mapping[str, str]] = None,
                 encoder_options: Optional[Mapping[str, dict]] = None):
        super().__init__()
        choice = dict(encoders or {})
        unknown = set(choice) - set(info.modality_names)
        if unknown:
            raise ValueError(f"encoder choice names unknown modalities {sorted(unknown)}; "
                             f"the dataset has {info.modality_names}")
        self.modalities = info.modality_names
        self.encoder_names = {s.name: choice.get(s.name) or default_encoder(s) for s in info.modalities}
        opts = dict(encoder_options or {})
        self.encoders = nn.ModuleDict({
            s.name: create_encoder(self.encoder_names[s.name], s, **opts.get(self.encoder_names[s.name], {}))
            for s in info.modalities
        })
        dims = {m: self.encoders[m].out_dim for m in self.modalities}
        self.fusion_name = fusion
        self.fusion = create_fusion(fusion, dims, info.num_classes)
        self.num_classes = info.num_classes

    def encode(self, inputs: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        missing = [m for m in self.modalities if m not in inputs]
        if missing:
            raise KeyError(f"model input lacks modalities {missing}; got {sorted(inputs)}")
        return {m: self.encoders[m](inputs[m]) for m in self.modalities}

    def head(self, features: Mapping[str, Tensor]) -> ModelOutput:
        fused = self.fusion(dict(features))
        return ModelOutput(fused.logits, dict(features), fused.unimodal_logits)

    def forward(self, inputs: Mapping[str, Tensor],
                feature_transform: Optional[Callable[[Dict[str, Tensor]], Dict[str, Tensor]]] = None) -> ModelOutput:
        """`feature_transform` may change the pooled features before the head (e.g. OPM's
        feature dropping); it runs inside forward so DistributedDataParallel sees the whole step."""
        feats = self.encode(inputs)
        if feature_transform is not None:
            feats = feature_transform(feats)
        return self.head(feats)


def create_model(info: DatasetInfo, fusion: str = "concat",
                 encoders: Optional[Mapping[str, str]] = None,
                 encoder_options: Optional[Mapping[str, dict]] = None) -> MultimodalClassifier:
    return MultimodalClassifier(info, fusion=fusion, encoders=encoders, encoder_options=encoder_options)
