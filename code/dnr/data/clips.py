"""The loader of every prepared dataset (CREMA-D, Kinetics-Sounds, UCF-101, VGGSound, Food-101):
it reads exactly what `prepare.py` writes (layout in manifest.py) and checks it all on start-up.

A dataset module says which inputs it wants (`AudioInput`, `FramesInput`, `TextInput`) and calls
`build_prepared`; classes, the audio shape, the vocabulary and the clip list come from the manifest.
A text is the manifest's per-clip 'text', encoded once on start-up with the vocabulary file the
preparation built (text.py): (length,) token ids.
Frames are sampled by segment (SPEC section 2): a random frame in each of n equal segments of the
clip's stored frames in training, the middle one in evaluation.

`frame_cache` (the trainer's --frame_cache) says where frames come from:
  off  the JPEG files, decoded and transformed with Pillow (transforms.rgb_transform);
  cpu  the packed cache (cache.py, built by `script/prepare.py pack`), transformed on tensors in
       the loader: same augmentation, no JPEG decode;
  gpu  the packed cache, returned raw as (T, C, H, W) uint8; DataSplits.device_transform
       (transforms.BatchedFrames) cuts, flips, resizes and normalises whole batches on the
       training device.
Either cache mode gives values that differ slightly from the JPEG path (another resampling
filter, and a second resize where the cache's size differs from the stored frames').

A prepared dataset is one module that declares a `PreparedDataset` (its modalities, split schemes,
raw input and `collect`) and calls `register_prepared`: that makes both its trainer entry (--dataset
NAME and the flags --NAME_audio, --NAME_frames, --NAME_image_size, --NAME_split, --NAME_flow_channels,
--NAME_text_len that apply) and its `script/prepare.py NAME` sub-command.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .base import DataSplits, DatasetInfo, ModalitySpec, MultimodalDataset, register_dataset, segment_indices
from .cache import FrameCache, find_size, open_cache
from .manifest import (FLOW_DIR, FRAMES_DIR, MANIFEST, SPLITS_DIR, audio_dir, flow_names, frame_name,
                       read_manifest, split_path)
from .prepare import Preparer, register_preparer
from .splits import SPLITS, read_split_csv
from .text import digest, encode, read_vocabulary
from .transforms import BatchedFrames, flow_from_uint8, flow_to_tensor, rgb_from_uint8, rgb_transform

FRAME_CACHE_MODES = ("off", "cpu", "gpu")


@dataclass(frozen=True)
class AudioInput:
    name: str    # modality name, e.g. "audio"
    recipe: str  # "fbank" or "stft": the folder audio_<recipe>/


@dataclass(frozen=True)
class FramesInput:
    name: str      # modality name, e.g. "visual", "rgb", "flow"
    kind: str      # "rgb" or "flow"
    frames: int    # frames per sample (segments)
    size: int      # output height and width in pixels
    channels: int = 3  # rgb: 3; flow: 2 ([u, v]) or 3 ([u, v, u])


@dataclass(frozen=True)
class TextInput:
    name: str    # modality name, e.g. "text"
    length: int  # tokens per sample (truncated / zero-padded)


Input = Union[AudioInput, FramesInput, TextInput]


def choose_recipe(manifest: dict, requested: str, flag: str, root: Path) -> str:
    """'auto' takes the only recipe prepared, else 'fbank' (the D&R authors' features)."""
    available = sorted(manifest["audio"])
    if not available:
        raise ValueError(f"{Path(root) / MANIFEST}: no audio features were prepared")
    if requested == "auto":
        return available[0] if len(available) == 1 else "fbank"
    if requested not in available:
        raise ValueError(f"{flag} {requested}: {root} holds audio features {available} only; pass one "
                         f"of them, or prepare the folder again with --audio {requested}")
    return requested


class PreparedClips(MultimodalDataset):
    """One split of a prepared dataset. `train=True`: random frame per segment and the training
    augmentation; otherwise the middle frame per segment and the deterministic resize."""

    def __init__(self, info: DatasetInfo, split: str, root: Path, clips: List[str], labels: Tensor,
                 stored_frames: List[int], inputs: Dict[str, Input], train: bool,
                 frame_cache: str = "off", caches: Optional[Dict[str, FrameCache]] = None,
                 tokens: Optional[Dict[str, Tensor]] = None):
        self.info, self.split, self.root = info, split, Path(root)
        self.clips, self.labels, self.stored_frames = clips, labels, stored_frames
        self.inputs, self.train = inputs, train
        self.frame_cache, self.caches = frame_cache, dict(caches or {})  # modality -> FrameCache
        self.tokens = dict(tokens or {})  # text modality -> (N, length) int64 token ids
        self.shapes = {m.name: tuple(m.shape) for m in info.modalities}
        self._rgb = {n: rgb_transform(i.size, train) for n, i in inputs.items()
                     if isinstance(i, FramesInput) and i.kind == "rgb"}

    def view(self, train: bool) -> "PreparedClips":
        other = PreparedClips(self.info, self.split, self.root, self.clips, self.labels, self.stored_frames,
                              self.inputs, train, self.frame_cache, self.caches, self.tokens)
        other.active = self.active
        return other

    def _audio(self, inp: AudioInput, clip: str) -> Tensor:
        path = self.root / audio_dir(inp.recipe) / f"{clip}.npy"
        x = np.load(path, allow_pickle=False)
        if tuple(x.shape) != self.shapes[inp.name] or x.dtype != np.float32:
            raise ValueError(f"{path}: shape {tuple(x.shape)} {x.dtype}, expected "
                             f"{self.shapes[inp.name]} float32 (manifest)")
        return torch.from_numpy(x)

    def _frames(self, inp: FramesInput, clip: str, stored: int) -> Tensor:
        picks = segment_indices(stored, inp.frames, self.train)
        if inp.name in self.caches:
            raw = torch.from_numpy(self.caches[inp.name].frames(clip, picks)).permute(0, 3, 1, 2)  # (T, H, W, C) -> (T, C, H, W)
            if self.frame_cache == "gpu":
                return raw  # uint8; transformed per batch on the device (transforms.BatchedFrames)
            if inp.kind == "rgb":
                return rgb_from_uint8(raw, inp.size, self.train)
            return flow_from_uint8(raw, inp.size, self.train, inp.channels)
        out = []
        for k in picks:
            if inp.kind == "rgb":
                with Image.open(self.root / FRAMES_DIR / clip / frame_name(k)) as im:
                    out.append(self._rgb[inp.name](im.convert("RGB")))
            else:
                u_name, v_name = flow_names(k)
                with Image.open(self.root / FLOW_DIR / clip / u_name) as u, \
                        Image.open(self.root / FLOW_DIR / clip / v_name) as v:
                    out.append(flow_to_tensor(u.convert("L"), v.convert("L"), inp.size, self.train, inp.channels))
        return torch.stack(out)  # (T, C, S, S)

    def load(self, index: int) -> Dict[str, Tensor]:
        clip = self.clips[index]
        out = {}
        for name, inp in self.inputs.items():
            if not self.wants(name):
                continue
            if isinstance(inp, AudioInput):
                out[name] = self._audio(inp, clip)
            elif isinstance(inp, TextInput):
                out[name] = self.tokens[name][index]
            else:
                out[name] = self._frames(inp, clip, self.stored_frames[index])
        return out


def _spec(inp: Input, manifest: dict, root: Path, vocabulary: Optional[List[str]] = None) -> ModalitySpec:
    if isinstance(inp, TextInput):
        return ModalitySpec(inp.name, "tokens", (inp.length,), vocab_size=len(vocabulary))
    if isinstance(inp, AudioInput):
        return ModalitySpec(inp.name, "spectrogram", tuple(int(s) for s in manifest["audio"][inp.recipe]["shape"]))
    if inp.kind == "flow" and not manifest.get("flow"):
        raise ValueError(f"{Path(root) / MANIFEST}: no optical flow was prepared in this folder")
    return ModalitySpec(inp.name, "frames", (inp.frames, inp.channels, inp.size, inp.size))


def _missing_files(root: Path, clip: str, entry: dict, inputs: Sequence[Input]) -> List[str]:
    missing = []
    n = entry["frames"]
    for inp in inputs:
        if isinstance(inp, TextInput):
            continue  # the text is in the manifest
        if isinstance(inp, AudioInput):
            rel = f"{audio_dir(inp.recipe)}/{clip}.npy"
            if not (root / rel).is_file():
                missing.append(rel)
            continue
        folder = FRAMES_DIR if inp.kind == "rgb" else FLOW_DIR
        names = [frame_name(k) for k in range(n)] if inp.kind == "rgb" else \
            [name for k in range(n) for name in flow_names(k)]
        try:
            present = set(p.name for p in (root / folder / clip).iterdir())
        except FileNotFoundError:
            present = set()
        missing.extend(f"{folder}/{clip}/{name}" for name in names if name not in present)
    return missing


def open_prepared(dataset: str, data_path: Optional[str]) -> dict:
    """The checked manifest of the folder given with --data_path."""
    if not data_path:
        raise ValueError(f"--dataset {dataset} needs --data_path: the folder written by "
                         f"'python script/prepare.py {dataset} --root RAW --out FOLDER'")
    return read_manifest(Path(data_path), dataset)


def check_positive(value: int, flag: str, minimum: int = 1) -> None:
    if value < minimum:
        raise ValueError(f"{flag} must be >= {minimum}, got {value}")


def build_prepared(dataset: str, data_path: str, scheme: str, inputs: Sequence[Input],
                   manifest: dict, frame_cache: str = "off") -> DataSplits:
    """Check the prepared folder against its manifest and the requested inputs, then build the
    four splits. Every problem raises naming the file and what was expected. `frame_cache`:
    module docstring."""
    if frame_cache not in FRAME_CACHE_MODES:
        raise ValueError(f"--frame_cache {frame_cache!r}: choose one of {FRAME_CACHE_MODES}")
    root = Path(data_path)
    m = manifest
    classes = tuple(m["classes"])
    index = {c: i for i, c in enumerate(classes)}
    vocabulary = read_text_vocabulary(root, m) if any(isinstance(i, TextInput) for i in inputs) else None
    info = DatasetInfo(dataset, classes, tuple(_spec(i, m, root, vocabulary) for i in inputs))

    scheme_dir = root / SPLITS_DIR / scheme
    if not scheme_dir.is_dir():
        have = sorted(p.name for p in (root / SPLITS_DIR).iterdir()) if (root / SPLITS_DIR).is_dir() else []
        raise FileNotFoundError(f"{scheme_dir} does not exist; {root / SPLITS_DIR} has the split "
                                f"schemes {have}")
    rows: Dict[str, List[str]] = {}
    seen: Dict[str, str] = {}
    for split in SPLITS:
        path = split_path(root, scheme, split)
        ids = []
        for n, (clip, label) in enumerate(read_split_csv(path), 2):
            entry = m["clips"].get(clip)
            if entry is None:
                raise ValueError(f"{path}:{n}: clip {clip!r} is not in {root / MANIFEST} (not prepared, or "
                                 f"its preparation failed)")
            if label != entry["label"]:
                raise ValueError(f"{path}:{n}: clip {clip!r} has label {label!r}, the manifest says "
                                 f"{entry['label']!r}")
            if clip in seen:
                raise ValueError(f"{path}:{n}: clip {clip!r} is already in the {seen[clip]} split")
            seen[clip] = split
            ids.append(clip)
        if not ids:
            raise ValueError(f"{path} lists no clips")
        rows[split] = ids

    caches: Dict[str, FrameCache] = {}
    frame_inputs = [i for i in inputs if isinstance(i, FramesInput)]
    if frame_cache != "off" and frame_inputs:
        size = find_size(root)
        caches = {i.name: open_cache(root, m, "frames" if i.kind == "rgb" else "flow", size) for i in frame_inputs}
    missing: List[str] = []
    for clip in seen:  # frames read from a cache need no JPEG files
        missing.extend(_missing_files(root, clip, m["clips"][clip], [i for i in inputs if i.name not in caches]))
    if missing:
        raise FileNotFoundError(f"{root}: {len(missing)} file(s) that the manifest promises are missing, "
                                f"e.g. {', '.join(missing[:3])}; rerun script/prepare.py {dataset} with "
                                f"the same --out to complete the folder")
    for inp in inputs:  # the stored feature shape against the manifest, once per split
        if isinstance(inp, AudioInput):
            want = tuple(info.spec(inp.name).shape)
            for split, ids in rows.items():
                path = root / audio_dir(inp.recipe) / f"{ids[0]}.npy"
                got = np.load(path, mmap_mode="r", allow_pickle=False)
                if tuple(got.shape) != want or got.dtype != np.float32:
                    raise ValueError(f"{path}: shape {tuple(got.shape)} {got.dtype}, the manifest says "
                                     f"{want} float32")

    named = {i.name: i for i in inputs}
    lookup = {w: k for k, w in enumerate(vocabulary or ())}
    made = {}
    for split, ids in rows.items():
        labels = torch.tensor([index[m["clips"][c]["label"]] for c in ids], dtype=torch.long)
        stored = [int(m["clips"][c]["frames"]) for c in ids]
        tokens = {}
        for inp in inputs:
            if isinstance(inp, TextInput):
                tokens[inp.name] = torch.tensor([encode(_clip_text(root, m, c), lookup, inp.length) for c in ids],
                                                dtype=torch.long).view(len(ids), inp.length)
        made[split] = PreparedClips(info, split, root, ids, labels, stored, named, train=False,
                                    frame_cache=frame_cache, caches=caches, tokens=tokens)
    device_transform = None
    if frame_cache == "gpu" and caches:
        device_transform = BatchedFrames({i.name: (i.kind, i.size, i.channels) for i in frame_inputs})
    return DataSplits(info=info, train=made["train"].view(train=True), train_eval=made["train"],
                      val=made["val"], test=made["test"], device_transform=device_transform)


def read_text_vocabulary(root: Path, manifest: dict) -> List[str]:
    """The vocabulary file the manifest names, checked against the digest and size it records."""
    entry = manifest.get("text")
    if not isinstance(entry, dict) or "vocabulary" not in entry:
        raise ValueError(f"{Path(root) / MANIFEST}: no 'text' entry naming a vocabulary: prepare the folder "
                         f"again with this version")
    path = Path(root) / entry["vocabulary"]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the vocabulary that {Path(root) / MANIFEST} names is missing; rerun "
                                f"script/prepare.py with the same --out")
    text = path.read_text(encoding="utf-8")
    if digest(text) != entry.get("sha256") or len(text.splitlines()) != entry.get("size"):
        raise ValueError(f"{path}: not the vocabulary the manifest describes ({entry.get('size')} words, sha256 "
                         f"{str(entry.get('sha256'))[:12]}...): it was changed; rerun script/prepare.py")
    try:
        return read_vocabulary(text)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def _clip_text(root: Path, manifest: dict, clip: str) -> str:
    text = manifest["clips"][clip].get("text")
    if not isinstance(text, str):
        raise ValueError(f"{Path(root) / MANIFEST}: clip {clip!r} has no 'text' (got {text!r})")
    return text


# ---------------------------------------------------------------------------------------------
# Registration: one declaration per prepared dataset
# ---------------------------------------------------------------------------------------------

# What feeds a modality: audio features, RGB frames (or a still image), optical flow, a text.
AUDIO, RGB, FLOW, TEXT = "audio", "rgb", "flow", "text"
KINDS = (AUDIO, RGB, FLOW, TEXT)
TEXT_LENGTH = 40  # default of --NAME_text_len: BalanceBenchmark's max_length for Food-101 titles


@dataclass(frozen=True)
class PreparedDataset:
    """What a prepared dataset's module declares; `register_prepared` does the rest."""
    name: str                                # --dataset NAME, prepare.py NAME, the flags' prefix
    title: str                               # the dataset in help texts, e.g. "CREMA-D"
    description: str                         # one line for --dataset's help
    modalities: Tuple[Tuple[str, str], ...]  # (modality name, AUDIO | RGB | FLOW | TEXT), in the model's order
    frames: int                              # default of --NAME_frames (frames per clip, one per segment)
    schemes: Tuple[str, ...]                 # the split schemes prepare.py writes; the first is the default
    scheme_help: str                         # what the schemes are (help of --NAME_split, when several)
    raw: str                                 # prepare.py's one-line description of the raw input
    add_prepare_args: Callable[[argparse._ArgumentGroup], None]  # prepare.py NAME's own flags
    collect: Callable                        # args -> prepare.Collected
    short_side: int = 0                      # default of prepare.py's --short_side
    image: bool = False                      # still images (one frame each): no --NAME_frames, no --fps

    def kinds(self) -> List[str]:
        return [kind for _, kind in self.modalities]


PREPARED: Dict[str, PreparedDataset] = {}


def register_prepared(spec: PreparedDataset) -> PreparedDataset:
    """Register the trainer's loader of `spec` (its flags and build) and its preparation sub-command."""
    bad = [k for k in spec.kinds() if k not in KINDS]
    if bad or not spec.modalities:
        raise ValueError(f"dataset {spec.name!r}: modality kinds must be out of {KINDS}, got {bad}")
    if not spec.schemes:
        raise ValueError(f"dataset {spec.name!r}: at least one split scheme")
    if spec.name in PREPARED:
        raise ValueError(f"prepared dataset {spec.name!r} registered twice")
    PREPARED[spec.name] = spec
    register_dataset(spec.name, partial(_add_args, spec),
                     f"{spec.description}; prepared with script/prepare.py {spec.name}")(partial(_build, spec))
    register_preparer(Preparer(name=spec.name, description=spec.raw, add_args=spec.add_prepare_args,
                               collect=spec.collect, audio=AUDIO in spec.kinds(), flow=FLOW in spec.kinds(),
                               short_side=spec.short_side, image=spec.image))
    return spec


def _add_args(spec: PreparedDataset, group: argparse._ArgumentGroup) -> None:
    n, t = spec.name, spec.title
    if AUDIO in spec.kinds():
        group.add_argument(f"--{n}_audio", choices=("auto", "fbank", "stft"), default="auto",
                           help=f"{t} audio features: fbank (1 x 128 x 1024 Kaldi-style filterbank, the D&R "
                                f"authors'), stft (1 x 257 x 188 OGM-GE log-STFT); auto = the one prepared, "
                                f"fbank when both are (default: %(default)s)")
    if len(spec.schemes) > 1:
        group.add_argument(f"--{n}_split", choices=spec.schemes, default=spec.schemes[0],
                           help=f"{t} split scheme: {spec.scheme_help} (default: %(default)s)")
    framed = [m for m, kind in spec.modalities if kind in (RGB, FLOW)]
    if not spec.image:
        group.add_argument(f"--{n}_frames", type=int, default=spec.frames,
                           help=f"{t} frames per clip fed to the {' and '.join(framed)} encoder"
                                f"{'s' if len(framed) > 1 else ''}, one per segment (default: %(default)s)")
    group.add_argument(f"--{n}_image_size", type=int, default=224,
                       help=f"{t} frame height and width in pixels after crop/resize (default: %(default)s)")
    if TEXT in spec.kinds():
        group.add_argument(f"--{n}_text_len", type=int, default=TEXT_LENGTH,
                           help=f"{t} text: words per sample as token ids, the first ones kept, zero-padded "
                                f"(default: %(default)s)")
    if FLOW in spec.kinds():
        group.add_argument(f"--{n}_flow_channels", type=int, choices=(2, 3), default=2,
                           help=f"{t} flow channels: 2 = [u, v], 3 = [u, v, u] for three-channel encoders "
                                f"(default: %(default)s)")


def _build(spec: PreparedDataset, args: argparse.Namespace) -> DataSplits:
    def flag(key: str):
        return getattr(args, f"{spec.name}_{key}")

    frames = 1 if spec.image else flag("frames")
    check_positive(frames, f"--{spec.name}_frames")
    check_positive(flag("image_size"), f"--{spec.name}_image_size", 16)
    if TEXT in spec.kinds():
        check_positive(flag("text_len"), f"--{spec.name}_text_len")
    manifest = open_prepared(spec.name, args.data_path)
    inputs: List[Input] = []
    for modality, kind in spec.modalities:
        if kind == AUDIO:
            recipe = choose_recipe(manifest, flag("audio"), f"--{spec.name}_audio", Path(args.data_path))
            inputs.append(AudioInput(modality, recipe))
        elif kind == TEXT:
            inputs.append(TextInput(modality, flag("text_len")))
        else:
            channels = flag("flow_channels") if kind == FLOW else 3
            inputs.append(FramesInput(modality, kind, frames, flag("image_size"), channels))
    scheme = flag("split") if len(spec.schemes) > 1 else spec.schemes[0]
    return build_prepared(spec.name, args.data_path, scheme, inputs, manifest,
                          frame_cache=getattr(args, "frame_cache", "off"))
