"""CMU-MOSI from the preprocessed feature files the community shares (users obtain them
themselves; nothing is downloaded here). Three modalities, each a sequence (T, D): text, audio,
visual. Two file formats, told apart by their keys:

  MMSA (thuiar/MMSA, `aligned_50.pkl` / `unaligned_50.pkl`): {"train"|"valid"|"test": {
      "text" (N, T, 768) BERT features, "text_bert" (N, 3, T) BERT token ids / attention mask /
      segment ids, "audio" (N, T_a, 5), "vision" (N, T_v, 20), "regression_labels" (N,),
      "audio_lengths", "vision_lengths" (N,) (unaligned files), "id", "raw_text",
      "classification_labels", "annotations"}}. Aligned: T = 50 for all three; unaligned: the
      audio and vision sequences are longer (hundreds of steps), right-padded with zeros, their
      true lengths in *_lengths. Splits 1,284 / 229 / 686.
  MultiBench (pliang279/MultiBench, `mosi_raw.pkl`): {"train"|"valid"|"test": {"text", "audio",
      "vision" (N, T, D), "labels" (N, 1, 1) or (N, 1), "id"}}; sequences left-padded with zeros.

Both carry sentiment scores in [-3, 3]. Tasks (--mosi_task):
  binary  negative / positive; --mosi_zero says where a score of exactly 0 goes: "positive"
          (non-negative vs negative, MMSA's "Has0" Acc-2), "negative" (positive vs
          non-positive), or "exclude" (zero-scored samples are dropped from every split, MMSA's
          "Non0" Acc-2; they cannot be trained on without a class).
  7class  round to the nearest integer (numpy's round: halves to even, as MMSA's Acc-7) and clip
          to [-3, 3]: classes "-3" ... "3".
The D&R diagnosis clusters each modality's pooled features into k = number of classes clusters
(2 for binary, 7 for 7class) and measures purity against these same labels.

Padding convention. A data item has no mask channel, so padding is marked by value: every time
step that is padding is all zeros, and the sequence encoders (models/sequence.py) treat all-zero
steps as padding. The loader enforces it: steps at or beyond a sample's length (from
audio_lengths / vision_lengths, right padding as MMSA writes it) and text steps whose BERT
attention mask (text_bert[:, 1]) is 0 are set to zero. Files without lengths (MultiBench) are
already zero-padded. Non-finite values (MMSA's audio holds -inf) become 0 first.

Normalisation (--mosi_normalize, on by default): per modality and feature dimension, subtract
the mean and divide by the standard deviation over the *training* split's non-padding steps,
then set padding steps back to zero (raw COVAREP/FACET features span orders of magnitude).

The file is a pickle: it is read with a restricted unpickler (safe_pickle.py) that admits numpy
arrays, lists, dicts, strings and numbers only, and refuses anything else.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from .base import DataSplits, DatasetInfo, ModalitySpec, MultimodalDataset, register_dataset
from .safe_pickle import safe_load

MODALITIES = ("text", "audio", "visual")
FILE_SPLITS = {"train": "train", "val": "valid", "test": "test"}  # ours -> the files' key
TASKS = ("binary", "7class")
ZERO_RULES = ("positive", "negative", "exclude")
BINARY_CLASSES = ("negative", "positive")
SEVEN_CLASSES = tuple(str(v) for v in range(-3, 4))
KNOWN_FILES = ("aligned_50.pkl", "unaligned_50.pkl", "mosi_raw.pkl")
# What tells the formats apart (keys of a split); see the module docstring.
FORMATS = {
    "mmsa": {"label_key": "regression_labels", "required": ("audio", "vision", "regression_labels"),
             "describe": "MMSA (aligned_50.pkl / unaligned_50.pkl)"},
    "multibench": {"label_key": "labels", "required": ("text", "audio", "vision", "labels"),
                   "describe": "MultiBench (mosi_raw.pkl)"},
}


def add_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--mosi_file", default=None,
                       help="CMU-MOSI: the feature file (MMSA's aligned_50.pkl / unaligned_50.pkl or "
                            "MultiBench's mosi_raw.pkl), a name inside --data_path or a path; default: "
                            "the only .pkl file in --data_path (default: %(default)s)")
    group.add_argument("--mosi_task", choices=TASKS, default="binary",
                       help="CMU-MOSI: binary sentiment (2 classes) or 7class (score rounded and "
                            "clipped to -3..3); D&R clusters into as many clusters as classes "
                            "(default: %(default)s)")
    group.add_argument("--mosi_zero", choices=ZERO_RULES, default="positive",
                       help="CMU-MOSI binary task: a score of exactly 0 counts as positive "
                            "(non-negative vs negative, MMSA's Has0), as negative, or is excluded from "
                            "every split (MMSA's Non0) (default: %(default)s)")
    group.add_argument("--mosi_modalities", default=",".join(MODALITIES),
                       help="CMU-MOSI: comma-separated modalities out of "
                            f"{','.join(MODALITIES)} (default: %(default)s)")
    group.add_argument("--mosi_text_key", default="text",
                       help="CMU-MOSI: the key of the text features in each split (MMSA's 'text' holds "
                            "768-d BERT features; its 'text_bert' holds token ids, not features) "
                            "(default: %(default)s)")
    group.add_argument("--mosi_normalize", action=argparse.BooleanOptionalAction, default=True,
                       help="CMU-MOSI: standardise each feature dimension with the training split's "
                            "mean and std over non-padding steps; --no-mosi_normalize feeds the raw features")


def resolve_file(data_path: Optional[str], mosi_file: Optional[str]) -> Path:
    """--mosi_file relative to --data_path (or on its own); else the single .pkl in --data_path."""
    if mosi_file:
        path = Path(mosi_file)
        if data_path is not None and not path.is_absolute():
            path = Path(data_path) / path
        if not path.is_file():
            raise FileNotFoundError(f"--mosi_file: no file {path}")
        return path
    if data_path is None:
        raise ValueError("--dataset mosi needs --data_path FOLDER holding the feature file "
                         f"(one of {', '.join(KNOWN_FILES)}) or --mosi_file PATH")
    found = sorted(Path(data_path).glob("*.pkl"))
    if len(found) != 1:
        what = "no .pkl file" if not found else f"{len(found)} .pkl files ({', '.join(p.name for p in found)})"
        raise FileNotFoundError(f"--data_path {data_path} holds {what}; name the feature file with "
                                f"--mosi_file (e.g. {' or '.join(KNOWN_FILES)})")
    return found[0]


def detect_format(data, source: str) -> str:
    """'mmsa' or 'multibench' from the keys of the splits; a ValueError saying what was found
    and what each format has otherwise."""
    expected = (f"a dict with splits {sorted(FILE_SPLITS.values())}, each a dict of arrays: "
                + "; ".join(f"{f['describe']} has keys {list(f['required'])}" for f in FORMATS.values()))
    if not isinstance(data, dict):
        raise ValueError(f"{source}: not a CMU-MOSI feature file: it holds a {type(data).__name__}, "
                         f"expected {expected}")
    missing = [s for s in FILE_SPLITS.values() if not isinstance(data.get(s), dict)]
    if missing:
        raise ValueError(f"{source}: not a CMU-MOSI feature file: split(s) {missing} missing or not a "
                         f"dict (top-level keys: {sorted(map(str, data))}); expected {expected}")
    found = []
    for name, fmt in FORMATS.items():
        if all(all(k in data[s] for k in fmt["required"]) for s in FILE_SPLITS.values()):
            found.append(name)
    if not found:
        raise ValueError(f"{source}: not a CMU-MOSI feature file of a known format: split 'train' has "
                         f"keys {sorted(map(str, data['train']))}; expected {expected}")
    # A file with both label keys is MMSA's (MultiBench never writes regression_labels).
    return found[0]


def map_labels(scores: np.ndarray, task: str, zero: str) -> Tuple[np.ndarray, np.ndarray, Tuple[str, ...]]:
    """Sentiment scores (N,) -> (class ids (N,), kept (N,) bool, class names). Samples that are
    not kept (binary task, zero == 'exclude', score 0) have id -1."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if not np.isfinite(scores).all():
        raise ValueError(f"{int((~np.isfinite(scores)).sum())} sentiment labels are not finite")
    if task == "7class":
        ids = np.clip(np.round(scores), -3, 3).astype(np.int64) + 3
        return ids, np.ones(len(ids), dtype=bool), SEVEN_CLASSES
    if task != "binary":
        raise ValueError(f"--mosi_task: unknown task {task!r}; choose one of {list(TASKS)}")
    if zero not in ZERO_RULES:
        raise ValueError(f"--mosi_zero: unknown rule {zero!r}; choose one of {list(ZERO_RULES)}")
    positive = scores >= 0 if zero == "positive" else scores > 0
    kept = scores != 0 if zero == "exclude" else np.ones(len(scores), dtype=bool)
    ids = np.where(kept, positive.astype(np.int64), -1)
    return ids, kept, BINARY_CLASSES


def _sequence_array(split: dict, key: str, where: str) -> np.ndarray:
    if key not in split:
        raise KeyError(f"{where}: no key {key!r}; the split has {sorted(map(str, split))}")
    try:
        arr = np.asarray(split[key], dtype=np.float32)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {key!r} is not a numeric array (ragged or non-numeric entries); "
                         f"expected (N, T, D)") from None
    if arr.ndim != 3:
        raise ValueError(f"{where}: {key!r} has shape {arr.shape}; expected (N, T, D)")
    return arr


def _bert_token_like(arr: np.ndarray) -> bool:
    """MMSA's text_bert: (N, 3, T) of token ids, a 0/1 attention mask, 0/1 segment ids."""
    return arr.ndim == 3 and arr.shape[1] == 3 and bool(np.isin(arr[:, 1], (0, 1)).all()) \
        and bool((arr == np.round(arr)).all())


def _padding_from_file(split: dict, fmt: str, modality: str, key: str, n: int, t: int,
                       where: str, notes: List[str]) -> Optional[np.ndarray]:
    """(N, T) bool, True at padding steps, where the file says so (MMSA); None otherwise."""
    if fmt != "mmsa":
        return None
    if modality == "text":
        tokens = split.get("text_bert")
        if key == "text_bert" or tokens is None:
            return None
        tokens = np.asarray(tokens)
        if tokens.shape != (n, 3, t) or not _bert_token_like(tokens):
            return None
        return tokens[:, 1] == 0
    lengths = split.get(f"{key}_lengths")
    if lengths is None:
        return None
    lengths = np.asarray(lengths).reshape(-1)
    if lengths.shape[0] != n or not np.issubdtype(lengths.dtype, np.number):
        raise ValueError(f"{where}: '{key}_lengths' holds {lengths.shape[0]} values of type {lengths.dtype}; "
                         f"expected {n} integers")
    if (lengths < 0).any():
        raise ValueError(f"{where}: '{key}_lengths' has negative lengths")
    if (lengths > t).any():
        notes.append(f"{where}: {int((lengths > t).sum())} '{key}_lengths' exceed T={t} and were clipped")
    return np.arange(t)[None, :] >= np.minimum(lengths, t)[:, None]


class MosiSplit(MultimodalDataset):
    """One split in memory: {modality: (N, T, D) float32} and class ids (N,)."""

    def __init__(self, info: DatasetInfo, split: str, data: Dict[str, Tensor], labels: Tensor,
                 scores: Tensor, source_format: str):
        self.info, self.split, self.data, self.labels = info, split, data, labels
        self.scores = scores  # (N,) the sentiment scores the labels came from
        self.source_format = source_format

    def load(self, index: int) -> Dict[str, Tensor]:
        return {m: self.data[m][index] for m in self.info.modality_names if self.wants(m)}


def _parse_modalities(text: str) -> List[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODALITIES]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(f"--mosi_modalities: got {text!r}; use distinct names out of {list(MODALITIES)}")
    return names


def load_mosi(path, task: str = "binary", zero: str = "positive", modalities=MODALITIES,
              text_key: str = "text", normalize: bool = True) -> Tuple[Dict[str, MosiSplit], str, List[str]]:
    """Read a feature file; returns ({'train'|'val'|'test': MosiSplit}, format, notes)."""
    source = str(path)
    raw = safe_load(path)
    fmt = detect_format(raw, source)
    keys = {"text": text_key, "audio": "audio", "visual": "vision"}
    notes: List[str] = []

    arrays: Dict[str, Dict[str, np.ndarray]] = {}
    pads: Dict[str, Dict[str, np.ndarray]] = {}
    labels: Dict[str, np.ndarray] = {}
    scores: Dict[str, np.ndarray] = {}
    for ours, theirs in FILE_SPLITS.items():
        split = raw[theirs]
        where = f"{source}, split {theirs!r}"
        score = np.asarray(split[FORMATS[fmt]["label_key"]], dtype=np.float64).reshape(-1)
        n = score.shape[0]
        ids, kept, classes = map_labels(score, task, zero)
        arrays[ours], pads[ours] = {}, {}
        for m in modalities:
            arr = _sequence_array(split, keys[m], where)
            if m == "text" and _bert_token_like(arr):
                raise ValueError(f"{where}: --mosi_text_key {keys[m]!r} holds BERT token ids / mask / "
                                 f"segment ids {arr.shape}, not features; use the 768-d features in 'text'")
            if arr.shape[0] != n:
                raise ValueError(f"{where}: {keys[m]!r} has {arr.shape[0]} samples but there are {n} labels")
            bad = ~np.isfinite(arr)
            if bad.any():
                notes.append(f"{where}: {int(bad.sum())} non-finite values in {keys[m]!r} set to 0")
                arr = np.where(bad, 0.0, arr).astype(np.float32)
            pad = _padding_from_file(split, fmt, m, keys[m], n, arr.shape[1], where, notes)
            if pad is not None:
                arr = np.where(pad[..., None], 0.0, arr).astype(np.float32)
            # Steps that are all zero are padding whether or not the file said so (the encoders'
            # convention); recorded here so normalisation can leave them at zero.
            arrays[ours][m] = arr[kept]
            pads[ours][m] = (arr == 0).all(-1)[kept]
        labels[ours], scores[ours] = ids[kept], score[kept]
        if task == "binary" and zero == "exclude":
            notes.append(f"{where}: {int((~kept).sum())} samples with score 0 excluded (--mosi_zero exclude)")

    # One (T, D) per modality for every split: check D, zero-pad T to the longest split.
    shapes = {}
    for m in modalities:
        dims = {s: arrays[s][m].shape[2] for s in FILE_SPLITS}
        if len(set(dims.values())) != 1:
            raise ValueError(f"{source}: {keys[m]!r} has feature sizes {dims} in different splits")
        t = max(arrays[s][m].shape[1] for s in FILE_SPLITS)
        for s in FILE_SPLITS:
            extra = t - arrays[s][m].shape[1]
            if extra:
                arrays[s][m] = np.pad(arrays[s][m], ((0, 0), (0, extra), (0, 0)))
                pads[s][m] = np.pad(pads[s][m], ((0, 0), (0, extra)), constant_values=True)
        shapes[m] = (t, dims["train"])

    if normalize:
        for m in modalities:
            real = arrays["train"][m][~pads["train"][m]]  # (N, T, D) -> (steps, D)
            if real.shape[0] == 0:
                raise ValueError(f"{source}: {keys[m]!r} has no non-padding step in the training split")
            mean, std = real.mean(0, dtype=np.float64), real.std(0, dtype=np.float64)
            std = np.where(std > 1e-6, std, 1.0)  # a constant dimension becomes 0, not NaN
            mean, std = mean.astype(np.float32), std.astype(np.float32)  # no float64 copy of the data
            for s in FILE_SPLITS:
                x = (arrays[s][m] - mean) / std
                arrays[s][m] = np.where(pads[s][m][..., None], 0.0, x).astype(np.float32)

    info = DatasetInfo("mosi", classes, tuple(ModalitySpec(m, "sequence", shapes[m]) for m in modalities))
    splits = {
        s: MosiSplit(info, s, {m: torch.from_numpy(np.ascontiguousarray(arrays[s][m])) for m in modalities},
                     torch.from_numpy(labels[s]).long(), torch.from_numpy(scores[s]).float(), fmt)
        for s in FILE_SPLITS
    }
    return splits, fmt, notes


def describe(path, fmt: str, splits: Dict[str, MosiSplit], task: str, zero: str) -> str:
    info = splits["train"].info
    lengths = {s.shape[0] for s in info.modalities}
    layout = (f"aligned: every modality has T={lengths.pop()}" if len(lengths) == 1
              else "unaligned: sequence lengths differ between modalities")
    mods = ", ".join(f"{s.name} {tuple(s.shape)}" for s in info.modalities)
    if task == "binary":
        rule = "binary, score 0 " + ("excluded" if zero == "exclude" else f"counts as {zero}")
    else:
        rule = "7class, scores rounded and clipped to -3..3"
    sizes = " / ".join(str(len(splits[s])) for s in FILE_SPLITS)
    return (f"CMU-MOSI: {path} is in the format of {FORMATS[fmt]['describe']} ({layout}); {mods}; "
            f"task {rule}; train / val / test {sizes} samples")


@register_dataset("mosi", add_args, "CMU-MOSI text+audio+visual feature sequences from MMSA or MultiBench files")
def build(args: argparse.Namespace) -> DataSplits:
    path = resolve_file(args.data_path, args.mosi_file)
    names = _parse_modalities(args.mosi_modalities)
    splits, fmt, notes = load_mosi(path, task=args.mosi_task, zero=args.mosi_zero, modalities=names,
                                   text_key=args.mosi_text_key, normalize=args.mosi_normalize)
    print(describe(path, fmt, splits, args.mosi_task, args.mosi_zero), flush=True)
    for note in notes:
        print(f"  note: {note}", flush=True)
    info = splits["train"].info
    return DataSplits(info=info, train=splits["train"], train_eval=splits["train"],
                      val=splits["val"], test=splits["test"])
