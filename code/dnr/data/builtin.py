"""The built-in audio-visual dataset: made on the fly from a seed, no download.

Ten classes, the digits 0-9.
  visual  a short clip of a handwritten digit (scikit-learn's bundled 8x8 digit images,
          upsampled, tinted, moving a little from frame to frame, with pixel noise), (T, 3, H, W);
  audio   the telephone-keypad (DTMF) dual tone of the digit, at a random time and loudness, with
          background noise, as a log-magnitude spectrogram (1, 32, 64);
  sensor  (optional third modality) a 32-d noisy vector around a random class prototype.

The digit images are split by image between train/val/test, so validation and test show
handwriting the model never saw. Per modality, `informativeness` p is the probability that the
content shows the sample's own class; otherwise it shows a class drawn uniformly at random
(p = 0: the modality carries no label information at all). `noise` scales the modality's noise.

Why these defaults (the regime of CREMA-D, where D&R is meant to help): the training set is small
for two ResNet-18s, and the audio is learnt first and is partly label-inconsistent, so the audio
encoder ends up memorising its training samples: it separates the training split far better than
the validation split (large purity gap, strong re-learning), while the visual encoder, informative
but slower to learn, is left under-trained in joint training.
"""
from __future__ import annotations

import argparse
import math
from typing import Dict, List

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .base import (
    DataSplits,
    DatasetInfo,
    ModalitySpec,
    MultimodalDataset,
    parse_per_modality,
    register_dataset,
    segment_indices,
)

AVAILABLE = ("audio", "visual", "sensor")
CLASSES = tuple(str(d) for d in range(10))
# Telephone keypad: (row tone, column tone) in Hz for each digit.
DTMF = {
    1: (697, 1209), 2: (697, 1336), 3: (697, 1477),
    4: (770, 1209), 5: (770, 1336), 6: (770, 1477),
    7: (852, 1209), 8: (852, 1336), 9: (852, 1477),
    0: (941, 1336),
}
SAMPLE_RATE = 8000
CLIP_SECONDS = 0.5
N_FFT = 128
HOP = 62  # 4000 samples -> 65 STFT frames, cropped to 64
SPEC_BINS = 32  # 0-1937 Hz at 62.5 Hz per bin: every keypad tone is inside
SPEC_FRAMES = 64
SENSOR_DIM = 32

DEFAULTS = dict(
    train_size=600,
    val_size=300,
    test_size=300,
    informativeness="audio=0.7,visual=1.0,sensor=1.0",
    noise="audio=1.0,visual=1.0,sensor=1.0",
)


def add_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--builtin_modalities", default="audio,visual",
                       help="built-in dataset: comma-separated modalities out of "
                            f"{','.join(AVAILABLE)} (default: %(default)s)")
    group.add_argument("--builtin_train_size", type=int, default=DEFAULTS["train_size"],
                       help="built-in dataset: training samples (default: %(default)s)")
    group.add_argument("--builtin_val_size", type=int, default=DEFAULTS["val_size"],
                       help="built-in dataset: validation samples (default: %(default)s)")
    group.add_argument("--builtin_test_size", type=int, default=DEFAULTS["test_size"],
                       help="built-in dataset: test samples (default: %(default)s)")
    group.add_argument("--builtin_informativeness", default=DEFAULTS["informativeness"],
                       help="built-in dataset: per modality, probability in [0, 1] that its content "
                            "shows the sample's class (else a random class; 0 = no label information), "
                            "as NAME=P pairs or one number for all (default: %(default)s)")
    group.add_argument("--builtin_noise", default=DEFAULTS["noise"],
                       help="built-in dataset: per-modality noise multiplier (>= 0; 1 = the default "
                            "noise level), as NAME=X pairs or one number (default: %(default)s)")
    group.add_argument("--builtin_frames", type=int, default=2,
                       help="built-in dataset: frames per sample fed to the visual encoder, one per "
                            "segment (default: %(default)s)")
    group.add_argument("--builtin_clip_frames", type=int, default=4,
                       help="built-in dataset: frames stored per clip, sampled by segment "
                            "(default: %(default)s)")
    group.add_argument("--builtin_image_size", type=int, default=32,
                       help="built-in dataset: frame height and width in pixels (default: %(default)s)")
    group.add_argument("--builtin_seed", type=int, default=0,
                       help="built-in dataset: seed of the data itself, kept apart from "
                            "--random_seed so that training seeds share one dataset (default: %(default)s)")


def _split_images(images: np.ndarray, targets: np.ndarray, rng: np.random.Generator) -> Dict[str, Dict[int, np.ndarray]]:
    """Partition the digit images of each class 60/20/20 into train/val/test pools."""
    pools: Dict[str, Dict[int, np.ndarray]] = {"train": {}, "val": {}, "test": {}}
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(targets == c))
        n_train, n_val = int(0.6 * len(idx)), int(0.2 * len(idx))
        pools["train"][c] = images[idx[:n_train]]
        pools["val"][c] = images[idx[n_train:n_train + n_val]]
        pools["test"][c] = images[idx[n_train + n_val:]]
    return pools


def _render_frames(digits: np.ndarray, n_frames: int, size: int, noise: float, rng: np.random.Generator) -> Tensor:
    """(N, 8, 8) digit images -> (N, n_frames, 3, size, size) float clips."""
    n = digits.shape[0]
    glyph = max(8, int(round(size * 0.7)))
    up = F.interpolate(torch.from_numpy(digits).float()[:, None] / 16.0, size=(glyph, glyph),
                       mode="bilinear", align_corners=False)[:, 0]  # (N, g, g)
    room = size - glyph
    clips = torch.zeros(n, n_frames, 3, size, size)
    start = rng.integers(0, room + 1, size=(n, 2))
    drift = rng.integers(-2, 3, size=(n, 2))  # pixels per frame: the digit moves across the clip
    tint = torch.from_numpy(rng.uniform(0.4, 1.0, size=(n, 3))).float()
    for i in range(n):
        for t in range(n_frames):
            y, x = np.clip(start[i] + drift[i] * t, 0, room)
            clips[i, t, :, y:y + glyph, x:x + glyph] = up[i][None] * tint[i][:, None, None]
    clips += torch.from_numpy(rng.normal(0.0, 0.35 * noise, size=clips.shape)).float()
    return (clips - 0.25) / 0.35


def _synth_audio(content: np.ndarray, noise: float, rng: np.random.Generator) -> Tensor:
    """Class ids (N,) -> (N, 1, 32, 64) log-magnitude spectrograms of keypad tones."""
    n = content.shape[0]
    length = int(SAMPLE_RATE * CLIP_SECONDS)
    t = np.arange(length) / SAMPLE_RATE
    waves = np.zeros((n, length), dtype=np.float64)
    for i, c in enumerate(content):
        f_row, f_col = DTMF[int(c)]
        onset = rng.uniform(0.0, 0.2)
        dur = rng.uniform(0.12, 0.3)
        on = (t >= onset) & (t < onset + dur)
        amp = rng.uniform(0.3, 1.0)
        for f in (f_row, f_col):
            f = f * (1.0 + rng.normal(0.0, 0.01))  # a slightly detuned keypad
            waves[i] += amp * on * np.sin(2 * math.pi * f * t + rng.uniform(0, 2 * math.pi))
    waves += rng.normal(0.0, 0.6 * noise, size=waves.shape)
    spec = torch.stft(torch.from_numpy(waves).float(), n_fft=N_FFT, hop_length=HOP,
                      window=torch.hann_window(N_FFT), return_complex=True).abs()  # (N, 65, 65)
    spec = torch.log(spec[:, :SPEC_BINS, :SPEC_FRAMES] + 1e-3)
    return ((spec - spec.mean()) / spec.std())[:, None]


def _sensor(content: np.ndarray, noise: float, prototypes: np.ndarray, rng: np.random.Generator) -> Tensor:
    x = prototypes[content] + rng.normal(0.0, 1.5 * noise, size=(content.shape[0], SENSOR_DIM))
    return torch.from_numpy(x).float()


class BuiltinAV(MultimodalDataset):
    """One split of the built-in dataset. All samples live in memory; `train=True` adds the
    training-time sampling and augmentation (a random frame per segment, a random shift)."""

    def __init__(self, info: DatasetInfo, split: str, data: Dict[str, Tensor], labels: Tensor,
                 train: bool, n_frames: int):
        self.info, self.split, self.data, self.labels = info, split, data, labels
        self.train, self.n_frames = train, n_frames

    def view(self, train: bool) -> "BuiltinAV":
        other = BuiltinAV(self.info, self.split, self.data, self.labels, train, self.n_frames)
        other.active = self.active
        return other

    def load(self, index: int) -> Dict[str, Tensor]:
        out = {}
        for name, tensor in self.data.items():
            if not self.wants(name):
                continue
            x = tensor[index]
            if name == "visual":
                x = x[segment_indices(x.shape[0], self.n_frames, self.train)]  # (T, 3, H, W)
                if self.train:
                    dy, dx = torch.randint(-2, 3, (2,)).tolist()
                    x = torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
            out[name] = x
        return out


@register_dataset("builtin", add_args, "digits (visual) + keypad tones (audio), generated from a seed")
def build(args: argparse.Namespace) -> DataSplits:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    names = [m.strip() for m in args.builtin_modalities.split(",") if m.strip()]
    unknown = [m for m in names if m not in AVAILABLE]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(f"--builtin_modalities: got {args.builtin_modalities!r}; use distinct names "
                         f"out of {list(AVAILABLE)}")
    info_p = parse_per_modality(args.builtin_informativeness, AVAILABLE, "--builtin_informativeness", 1.0)
    noise = parse_per_modality(args.builtin_noise, AVAILABLE, "--builtin_noise", 1.0)
    for m in names:
        if not 0.0 <= info_p[m] <= 1.0:
            raise ValueError(f"--builtin_informativeness: {m}={info_p[m]} is outside [0, 1]")
        if noise[m] < 0:
            raise ValueError(f"--builtin_noise: {m}={noise[m]} must be >= 0")
    sizes = {"train": args.builtin_train_size, "val": args.builtin_val_size, "test": args.builtin_test_size}
    for split, n in sizes.items():
        if n < len(CLASSES):
            raise ValueError(f"--builtin_{split}_size must be at least {len(CLASSES)} (one per class), got {n}")
    if not 1 <= args.builtin_frames <= args.builtin_clip_frames:
        raise ValueError(f"need 1 <= --builtin_frames ({args.builtin_frames}) <= "
                         f"--builtin_clip_frames ({args.builtin_clip_frames})")
    if args.builtin_image_size < 16:
        raise ValueError(f"--builtin_image_size must be >= 16, got {args.builtin_image_size}")

    size = args.builtin_image_size
    shapes = {
        "audio": ModalitySpec("audio", "spectrogram", (1, SPEC_BINS, SPEC_FRAMES)),
        "visual": ModalitySpec("visual", "frames", (args.builtin_frames, 3, size, size)),
        "sensor": ModalitySpec("sensor", "vector", (SENSOR_DIM,)),
    }
    info = DatasetInfo("builtin", CLASSES, tuple(shapes[m] for m in names))

    digits = load_digits()
    root = np.random.default_rng(args.builtin_seed)
    pools = _split_images(digits.images, digits.target, root)
    prototypes = root.normal(0.0, 1.0, size=(len(CLASSES), SENSOR_DIM))
    made: Dict[str, BuiltinAV] = {}
    for s, split in enumerate(("train", "val", "test")):
        rng = np.random.default_rng([args.builtin_seed, s])
        n = sizes[split]
        labels = rng.permutation(np.arange(n) % len(CLASSES))  # balanced classes
        data: Dict[str, Tensor] = {}
        for m in names:
            # Content class: the label with probability p, else uniform over all classes.
            keep = rng.random(n) < info_p[m]
            content = np.where(keep, labels, rng.integers(0, len(CLASSES), size=n))
            if m == "visual":
                picks = np.stack([pools[split][c][rng.integers(len(pools[split][c]))] for c in content])
                data[m] = _render_frames(picks, args.builtin_clip_frames, size, noise[m], rng)
            elif m == "audio":
                data[m] = _synth_audio(content, noise[m], rng)
            else:
                data[m] = _sensor(content, noise[m], prototypes, rng)
        made[split] = BuiltinAV(info, split, data, torch.from_numpy(labels).long(), train=False,
                                n_frames=args.builtin_frames)
    return DataSplits(info=info, train=made["train"].view(train=True), train_eval=made["train"],
                      val=made["val"], test=made["test"])
