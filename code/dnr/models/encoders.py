"""Per-modality encoders. Each maps one modality's batch to a pooled feature (B, out_dim).

The registry maps a name to a builder `build(spec, **options)` taking the modality's
`ModalitySpec`; `default_encoder` picks one from the modality's kind, so a new dataset needs no
model code. An encoder with its own flags registers `add_args(group)` and `options(args) -> dict`;
the trainer stores those options with the checkpoint so the model can be rebuilt.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
from torch import Tensor, nn
from torchvision.models import resnet18

from ..data.base import ModalitySpec

@dataclass
class EncoderEntry:
    build: Callable[..., nn.Module]
    add_args: Optional[Callable[[argparse._ArgumentGroup], None]] = None
    options: Optional[Callable[[argparse.Namespace], dict]] = None


ENCODERS: Dict[str, EncoderEntry] = {}
DEFAULT_FOR_KIND = {"spectrogram": "resnet18", "frames": "resnet18", "vector": "mlp",
                    "sequence": "transformer", "tokens": "transformer"}  # transformer, mean_mlp: models/sequence.py


def register_encoder(name: str, add_args=None, options=None):
    def wrap(fn):
        if name in ENCODERS:
            raise ValueError(f"encoder {name!r} registered twice")
        ENCODERS[name] = EncoderEntry(fn, add_args, options)
        return fn

    return wrap


def encoder_options(args: argparse.Namespace) -> Dict[str, dict]:
    """{encoder name: its options read from the parsed flags}, for encoders that have flags."""
    return {name: e.options(args) for name, e in sorted(ENCODERS.items()) if e.options is not None}


RESNET_INITS = ("torchvision", "official")


def official_resnet_init(net: nn.Module) -> None:
    """The initialisation of the official D&R backbone (GeWu-Lab/Diagnosing_Relearning_ECCV2024,
    code/models/backbone.py, ResNet.__init__): every convolution kaiming-normal (fan_out, relu),
    every BatchNorm weight drawn from N(1, 0.02) and its bias 0, no zero-initialised last
    BatchNorm. torchvision differs only in the BatchNorm weights (constant 1). It matters for D&R,
    whose re-initialisation pulls the weights back toward these starting values."""
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.normal_(module.weight, 1.0, 0.02)
            nn.init.zeros_(module.bias)


class ResNet18Encoder(nn.Module):
    """torchvision's ResNet-18 (randomly initialised, as the authors train from scratch) with the
    classifier removed: a 512-d globally pooled feature. `init` "torchvision" keeps torchvision's
    initialisation, "official" applies the official D&R backbone's (`official_resnet_init`).

    kind "spectrogram": input (B, C, F, T), C = 1 for audio (the first convolution takes C channels).
    kind "frames":      input (B, T, C, H, W); frames are folded into the batch and their pooled
                        features averaged, as the authors' visual encoder does.
    """

    out_dim = 512
    memory_format = torch.contiguous_format  # the trainer sets channels_last with --channels_last

    def __init__(self, in_channels: int, frames: bool, init: str = "torchvision"):
        super().__init__()
        if init not in RESNET_INITS:
            raise ValueError(f"--init must be one of {RESNET_INITS}, got {init!r}")
        net = resnet18(weights=None)
        if in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
            nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        net.fc = nn.Identity()
        if init == "official":
            official_resnet_init(net)
        self.net = net
        self.frames = frames

    def forward(self, x: Tensor) -> Tensor:
        if not self.frames:
            return self.net(x.contiguous(memory_format=self.memory_format))  # (B, C, F, T) -> (B, 512)
        b, t = x.shape[:2]
        x = x.flatten(0, 1).contiguous(memory_format=self.memory_format)  # (B, T, C, H, W) -> (B*T, C, H, W)
        feats = self.net(x)  # (B*T, C, H, W) -> (B*T, 512)
        return feats.view(b, t, -1).mean(1)  # (B*T, 512) -> (B, T, 512) -> (B, 512)


def _resnet18_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--init", choices=RESNET_INITS, default="torchvision",
                       help="ResNet-18 initialisation: 'torchvision' (BatchNorm weights 1) or 'official', the "
                            "official D&R backbone's (convolutions kaiming-normal fan_out, BatchNorm weights "
                            "from N(1, 0.02), biases 0), used by the CREMA-D reproduction settings "
                            "(default: %(default)s)")


@register_encoder("resnet18", add_args=_resnet18_args, options=lambda args: {"init": args.init})
def _resnet18(spec: ModalitySpec, init: str = "torchvision") -> nn.Module:
    if spec.kind == "spectrogram":
        if len(spec.shape) != 3:
            raise ValueError(f"modality {spec.name!r}: a spectrogram must be (C, F, T), got {spec.shape}")
        return ResNet18Encoder(spec.shape[0], frames=False, init=init)
    if spec.kind == "frames":
        if len(spec.shape) != 4:
            raise ValueError(f"modality {spec.name!r}: frames must be (T, C, H, W), got {spec.shape}")
        return ResNet18Encoder(spec.shape[1], frames=True, init=init)
    raise ValueError(f"encoder resnet18 takes spectrogram or frames, not {spec.kind!r} ({spec.name!r})")


class MLPEncoder(nn.Module):
    """Two-layer perceptron for a fixed-length vector (B, D) -> (B, hidden). LayerNorm rather
    than BatchNorm: a sample's feature does not depend on the rest of its batch."""

    def __init__(self, in_dim: int, hidden: int = 256):
        super().__init__()
        self.out_dim = hidden
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


@register_encoder("mlp")
def _mlp(spec: ModalitySpec) -> nn.Module:
    if spec.kind != "vector" or len(spec.shape) != 1:
        raise ValueError(f"encoder mlp takes a vector (D,), got kind {spec.kind!r} shape {spec.shape}")
    return MLPEncoder(spec.shape[0])


def default_encoder(spec: ModalitySpec) -> str:
    if spec.kind not in DEFAULT_FOR_KIND:
        raise ValueError(f"no default encoder for modality {spec.name!r} of kind {spec.kind!r}; "
                         f"registered encoders: {sorted(ENCODERS)}")
    return DEFAULT_FOR_KIND[spec.kind]


def create_encoder(name: str, spec: ModalitySpec, **options) -> nn.Module:
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r} for modality {spec.name!r}; choose one of {sorted(ENCODERS)}")
    enc = ENCODERS[name].build(spec, **options)
    if not isinstance(getattr(enc, "out_dim", None), int):
        raise TypeError(f"encoder {name!r} must expose an integer out_dim")
    return enc
