"""The interface every dataset implements, so the trainer, the models and D&R never name a modality.

A dataset module provides a builder `build(args) -> DataSplits` and registers it with
`register_dataset`. Each split is a `MultimodalDataset` whose items are

    {"inputs": {modality: Tensor}, "label": int, "index": int}

with every input's shape equal to its `ModalitySpec.shape`. The default collate function stacks
that into {"inputs": {modality: (B, ...)}, "label": (B,), "index": (B,)}.

A dataset may leave part of the input transform to the training device: `DataSplits.device_transform`
(inputs on the device, train) -> inputs runs on every batch after it is moved there (engine.py);
the spec's shapes are then those of its output, the model's input shapes.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.utils.data import Dataset

# What an encoder can expect from a modality's tensor (shapes are per sample, without batch):
#   "spectrogram": (C, F, T) time-frequency image
#   "frames":      (T, C, H, W) a few video frames
#   "vector":      (D,) a fixed-length feature vector
#   "sequence":    (T, D) a sequence of feature vectors
#   "tokens":      (T,) int64 token ids in [0, vocab_size), 0 = padding (e.g. a tokenised text)
MODALITY_KINDS = ("spectrogram", "frames", "vector", "sequence", "tokens")


@dataclass(frozen=True)
class ModalitySpec:
    name: str
    kind: str
    shape: Tuple[int, ...]
    vocab_size: int = 0  # kind "tokens" only: the number of token ids (the embedding's size)

    def __post_init__(self):
        if self.kind not in MODALITY_KINDS:
            raise ValueError(
                f"modality {self.name!r}: unknown kind {self.kind!r}; expected one of {MODALITY_KINDS}"
            )
        if (self.kind == "tokens") != (self.vocab_size > 0):
            raise ValueError(f"modality {self.name!r}: a vocab_size (> 0) goes with kind 'tokens' and only with "
                             f"it; got kind {self.kind!r}, vocab_size {self.vocab_size}")
        if self.kind == "tokens" and (len(self.shape) != 1 or self.vocab_size < 2):
            raise ValueError(f"modality {self.name!r}: tokens are (T,) ids with a vocabulary of at least 2 "
                             f"(padding and one token); got shape {self.shape}, vocab_size {self.vocab_size}")

    def to_dict(self) -> dict:
        out = {"name": self.name, "kind": self.kind, "shape": list(self.shape)}
        if self.kind == "tokens":
            out["vocab_size"] = self.vocab_size
        return out


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    classes: Tuple[str, ...]
    modalities: Tuple[ModalitySpec, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def modality_names(self) -> List[str]:
        return [m.name for m in self.modalities]

    def restrict(self, names: Sequence[str]) -> "DatasetInfo":
        """The same dataset seen through a subset of its modalities (e.g. a uni-modal baseline)."""
        unknown = [n for n in names if n not in self.modality_names]
        if unknown or not names:
            raise ValueError(f"dataset {self.name!r} has modalities {self.modality_names}; "
                             f"cannot restrict to {list(names)}")
        return DatasetInfo(self.name, self.classes, tuple(m for m in self.modalities if m.name in names))

    def spec(self, name: str) -> ModalitySpec:
        for m in self.modalities:
            if m.name == name:
                return m
        raise KeyError(f"dataset {self.name!r} has no modality {name!r}; it has {self.modality_names}")

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "classes": list(self.classes),
            "modalities": [m.to_dict() for m in self.modalities],
        }


class MultimodalDataset(Dataset):
    """Base class of every split. Subclasses set `info`, `split`, `labels` and `load(i)`.

    `active`, when set, limits the items to those modalities; `load` may consult `wants(m)` to
    skip reading the others."""

    info: DatasetInfo
    split: str
    labels: Tensor  # (N,) long, so diagnosis and stratification never iterate the data
    active: Optional[Tuple[str, ...]] = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def wants(self, modality: str) -> bool:
        return self.active is None or modality in self.active

    def load(self, index: int) -> Dict[str, Tensor]:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict:
        inputs = self.load(index)
        if self.active is not None:
            inputs = {m: inputs[m] for m in self.active}
        return {"inputs": inputs, "label": int(self.labels[index]), "index": index}


DeviceTransform = Callable[[Dict[str, Tensor], bool], Dict[str, Tensor]]


@dataclass
class DataSplits:
    """Train (with training augmentation), the same training samples with the evaluation
    transform (used by the D&R diagnosis and the linear probe), validation and test.

    `device_transform`, when set, finishes the input transform on the training device, batched:
    called as device_transform(inputs, train) with train=True on training batches (augmentation)
    and False on evaluation and feature-extraction batches."""

    info: DatasetInfo
    train: MultimodalDataset
    train_eval: MultimodalDataset
    val: MultimodalDataset
    test: MultimodalDataset
    device_transform: Optional[DeviceTransform] = None

    def items(self):
        return [("train", self.train), ("val", self.val), ("test", self.test)]

    def restrict(self, names: Sequence[str]) -> "DataSplits":
        """Only these modalities from now on (in the info and in every split's items)."""
        info = self.info.restrict(names)
        for ds in (self.train, self.train_eval, self.val, self.test):
            ds.active = tuple(info.modality_names)
        return DataSplits(info, self.train, self.train_eval, self.val, self.test, self.device_transform)


def through_device_transform(sample: dict, transform: Optional[DeviceTransform], train: bool) -> dict:
    """One sample as the model sees it: through the device transform as a batch of one (on the CPU)."""
    if transform is None:
        return sample
    batch = {m: torch.as_tensor(x).unsqueeze(0) for m, x in sample["inputs"].items()}  # (...) -> (1, ...)
    with torch.no_grad():
        out = transform(batch, train)
    return {**sample, "inputs": {m: x.squeeze(0) for m, x in out.items()}}


def check_sample(sample: dict, info: DatasetInfo, where: str) -> None:
    """Fail early, naming the split and modality, when a sample disagrees with the dataset's spec."""
    inputs = sample.get("inputs")
    if not isinstance(inputs, dict):
        raise TypeError(f"{where}: a sample must hold a dict 'inputs', got {type(inputs).__name__}")
    expected = set(info.modality_names)
    if set(inputs) != expected:
        raise ValueError(f"{where}: sample has modalities {sorted(inputs)}, expected {sorted(expected)}")
    for spec in info.modalities:
        x = inputs[spec.name]
        shape = tuple(x.shape)
        if shape != tuple(spec.shape):
            raise ValueError(
                f"{where}: modality {spec.name!r} has shape {shape}, expected {tuple(spec.shape)}"
            )
        if spec.kind == "tokens" and (x.dtype != torch.int64 or int(x.min()) < 0 or int(x.max()) >= spec.vocab_size):
            raise ValueError(f"{where}: modality {spec.name!r} must hold int64 token ids in [0, {spec.vocab_size}), "
                             f"got {x.dtype} in [{int(x.min())}, {int(x.max())}]")
    label = sample["label"]
    if not 0 <= int(label) < info.num_classes:
        raise ValueError(
            f"{where}: label {label} outside [0, {info.num_classes}) for classes {list(info.classes)}"
        )


@dataclass
class DatasetEntry:
    name: str
    build: Callable[[argparse.Namespace], DataSplits]
    add_args: Callable[[argparse._ArgumentGroup], None]
    description: str


DATASETS: Dict[str, DatasetEntry] = {}


def register_dataset(name: str, add_args: Callable, description: str):
    def wrap(build):
        if name in DATASETS:
            raise ValueError(f"dataset {name!r} registered twice")
        DATASETS[name] = DatasetEntry(name, build, add_args, description)
        return build

    return wrap


def build_datasets(name: str, args: argparse.Namespace) -> DataSplits:
    if name not in DATASETS:
        raise ValueError(f"unknown --dataset {name!r}; choose one of {sorted(DATASETS)}")
    splits = DATASETS[name].build(args)
    cache = getattr(args, "frame_cache", "off")
    if cache != "off" and getattr(splits.train, "frame_cache", "off") != cache:
        from .clips import PREPARED  # the datasets read from prepare.py's folders, which `pack` caches

        raise ValueError(f"--frame_cache {cache}: dataset {name!r} does not read packed frames; the option "
                         f"applies to the datasets prepared by script/prepare.py ({', '.join(sorted(PREPARED))})")
    for split, ds in splits.items():
        if len(ds) == 0:
            raise ValueError(f"dataset {name!r}: split {split!r} is empty")
        sample = through_device_transform(ds[0], splits.device_transform, train=split == "train")
        check_sample(sample, splits.info, f"dataset {name!r}, split {split!r}, sample 0")
    return splits


def segment_indices(n_frames: int, n_segments: int, train: bool, gen: torch.Generator = None) -> List[int]:
    """Pick one frame in each of `n_segments` equal segments of a clip of `n_frames` frames:
    a random one in training, the middle one in evaluation (the authors' CREMA-D sampling)."""
    if n_frames < 1 or n_segments < 1:
        raise ValueError(f"need at least one frame and one segment, got {n_frames} and {n_segments}")
    picks = []
    for s in range(n_segments):
        lo = s * n_frames // n_segments
        hi = max(lo + 1, (s + 1) * n_frames // n_segments)
        if train:
            picks.append(lo + int(torch.randint(hi - lo, (1,), generator=gen)))
        else:
            picks.append((lo + hi - 1) // 2)
    return picks


def parse_per_modality(text: str, names: Sequence[str], flag: str, default: float) -> Dict[str, float]:
    """Parse 'audio=0.5,visual=1' (or a single number for all) into {modality: value}."""
    values = {n: default for n in names}
    if text is None or text == "":
        return values
    text = text.strip()
    try:
        return {n: float(text) for n in names}
    except ValueError:
        pass
    for part in text.split(","):
        if "=" not in part:
            raise ValueError(f"{flag}: expected NAME=VALUE pairs or one number, got {text!r}")
        key, value = part.split("=", 1)
        key = key.strip()
        if key not in values:
            raise ValueError(f"{flag}: unknown modality {key!r}; the dataset has {list(names)}")
        try:
            values[key] = float(value)
        except ValueError:
            raise ValueError(f"{flag}: value for {key!r} is not a number: {value!r}") from None
    return values
