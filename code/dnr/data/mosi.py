"""CMU-MOSI and CMU-MOSEI from the preprocessed feature files the field shares (users obtain them
themselves; nothing is downloaded here). One implementation for both: a dataset is a
`FeatureDataset` declaration (its name, title, file names, published sizes) passed to
`register_feature_dataset`; this module declares CMU-MOSI, mosei.py CMU-MOSEI. Three modalities,
each a sequence (T, D): text, audio, visual.

Three file families, all a pickled {"train"|"valid"|"test": {key: array}}:

  mmsa        thuiar/MMSA (`aligned_50.pkl`, `unaligned_50.pkl`): "text" (N, T, 768) BERT features,
              "text_bert" (N, 3, T) BERT token ids / attention mask / segment ids, "audio"
              (N, T_a, D_a), "vision" (N, T_v, D_v), "regression_labels" (N,), "audio_lengths",
              "vision_lengths" (unaligned files), "id", "raw_text", "classification_labels",
              "annotations". Right-padded; the true lengths are in *_lengths.
  mult        CMU's seq_length_50 pickles as MulT distributes them (yaohungt/Multimodal-Transformer:
              `mosi_data.pkl`, `mosi_data_noalign.pkl`, `mosei_senti_data.pkl`,
              `mosei_senti_data_noalign.pkl`; MultiBench's examples read them too): "text"
              (N, 50, 300) GloVe, "audio", "vision" (N, T, D), "labels" (N, 1, 1), "id" (N, 3) bytes.
              Left-padded with zeros.
  multibench  MultiBench's own (pliang279/MultiBench, `mosi_raw.pkl`, `mosei_raw.pkl`): the same
              keys as mult, "id" a list of "video[segment]" strings; left-padded with zeros.

mult and multibench share their keys: the family comes from --NAME_format, else the file name,
else the audio / vision feature sizes the dataset declares for each family (CMU-MOSI: mult 5 / 20,
multibench 74 / 35; CMU-MOSEI: mult 74 / 35, multibench 74 / 713), else the ids; a file none of
these settle is read as multibench, and a note says so.

Each family's own reader's rules are the defaults for its files, so numbers are comparable:
  empty text  MultiBench deletes, in every split, the samples whose text is entirely zero
              (datasets/affect/get_data.py, drop_entry: its reader cannot strip their padding) before
              training and evaluation: the default for multibench files (--NAME_empty_text drop);
              MulT and MMSA keep them (keep). The count dropped is printed either way.
  binary      --NAME_zero, where a score of exactly 0 goes:
                positive      non-negative vs negative, all samples (MMSA's "Has0" Acc-2; mmsa default)
                negative      positive vs non-positive, all samples
                exclude       zero-scored samples dropped from every split (MMSA's "Non0")
                exclude_eval  positive = score > 0; zero-scored samples are negatives in training
                              and left out of val and test: the accuracy MulT (eval_mosei_senti) and
                              MultiBench (eval_affect) report, exclude_zero=True (mult and multibench
                              default)
  7class      score rounded (numpy: halves to even, as MMSA's, MulT's and MultiBench's Acc-7) and
              clipped to [-3, 3]: classes "-3" ... "3".
The D&R diagnosis clusters each modality's pooled features into k = number of classes clusters
(2 for binary, 7 for 7class) and measures purity against these same labels.

Padding convention. A data item has no mask channel, so padding is marked by value: every time
step that is padding is all zeros, and the sequence encoders (models/sequence.py) treat all-zero
steps as padding. The loader enforces it: steps at or beyond a sample's length (MMSA's
audio_lengths / vision_lengths) and text steps whose BERT attention mask (text_bert[:, 1]) is 0 are
set to zero; the left padding of mult / multibench files is zero already. Non-finite features
(the audio of every family holds -inf) become 0 first, as every family's reader does.

Normalisation (--NAME_normalize, on by default): per modality and feature dimension, subtract the
mean and divide by the standard deviation over the *training* split's non-padding steps, then set
padding steps back to zero (raw COVAREP / FACET features span orders of magnitude).

The file is a pickle: it is read with a restricted unpickler (safe_pickle.py) that admits numpy
arrays, lists, dicts, strings and numbers only, and refuses anything else.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from .base import DataSplits, DatasetInfo, ModalitySpec, MultimodalDataset, register_dataset
from .safe_pickle import safe_load

MODALITIES = ("text", "audio", "visual")
FILE_SPLITS = {"train": "train", "val": "valid", "test": "test"}  # ours -> the files' key
TASKS = ("binary", "7class")
ZERO_RULES = ("positive", "negative", "exclude", "exclude_eval")
EMPTY_TEXT = ("drop", "keep")
BINARY_CLASSES = ("negative", "positive")
SEVEN_CLASSES = tuple(str(v) for v in range(-3, 4))
EMOTION_COLUMNS = 7  # the CMU SDK's MOSEI labels: sentiment, then happy, sad, anger, surprise, disgust, fear


@dataclass(frozen=True)
class Family:
    label_key: str
    required: Tuple[str, ...]   # keys every split has
    zero: str                   # its reader's binary rule (default of --NAME_zero)
    empty_text: str             # what its reader does with all-zero text (default of --NAME_empty_text)
    reader: str                 # the reader whose rules these are, for the printout


FAMILIES = {
    "mmsa": Family("regression_labels", ("audio", "vision", "regression_labels"), "positive", "keep",
                   "MMSA's data_loader.py (Has0 Acc-2, every sample kept)"),
    "mult": Family("labels", ("text", "audio", "vision", "labels"), "exclude_eval", "keep",
                   "MulT's eval_mosei_senti (score > 0, zeros excluded from evaluation)"),
    "multibench": Family("labels", ("text", "audio", "vision", "labels"), "exclude_eval", "drop",
                         "MultiBench's get_data.py and eval_affect (drop_entry; score > 0, zeros excluded "
                         "from evaluation)"),
}
FORMAT_CHOICES = ("auto",) + tuple(FAMILIES)


@dataclass(frozen=True)
class FeatureDataset:
    """What a feature-file dataset module declares; `register_feature_dataset` does the rest."""
    name: str                                # --dataset NAME and the prefix of its flags
    title: str                               # "CMU-MOSI"
    files: Dict[str, Tuple[str, ...]]        # family -> the names its files are distributed under
    dims: Dict[str, Tuple[int, int]]         # mult / multibench -> (audio D, vision D) of its files
    sizes: Dict[str, str] = field(default_factory=dict)  # family -> its published train / val / test sizes

    def describe(self, family: str) -> str:
        names = " / ".join(self.files.get(family, ()))
        return {"mmsa": f"MMSA ({names})", "mult": f"CMU / MulT seq_length_50 ({names})",
                "multibench": f"MultiBench ({names})"}[family]

    def known_files(self) -> List[str]:
        return [name for names in self.files.values() for name in names]


def add_args(spec: FeatureDataset, group: argparse._ArgumentGroup) -> None:
    n, t = spec.name, spec.title
    group.add_argument(f"--{n}_file", default=None,
                       help=f"{t}: the feature file ({', '.join(spec.known_files())}), a name inside "
                            f"--data_path or a path; default: the only .pkl file in --data_path")
    group.add_argument(f"--{n}_format", choices=FORMAT_CHOICES, default="auto",
                       help=f"{t}: the file's family; auto tells them apart by keys, file name, feature "
                            f"sizes and ids (default: %(default)s)")
    group.add_argument(f"--{n}_task", choices=TASKS, default="binary",
                       help=f"{t}: binary sentiment (2 classes) or 7class (score rounded and clipped to "
                            f"-3..3); D&R clusters into as many clusters as classes (default: %(default)s)")
    group.add_argument(f"--{n}_zero", choices=("auto",) + ZERO_RULES, default="auto",
                       help=f"{t} binary task, where a score of exactly 0 goes: positive (MMSA's Has0), "
                            f"negative, exclude (from every split, MMSA's Non0), exclude_eval (negative in "
                            f"training, left out of val and test: MulT's and MultiBench's reported "
                            f"accuracy); auto = the rule of the file's own reader (default: %(default)s)")
    group.add_argument(f"--{n}_empty_text", choices=("auto",) + EMPTY_TEXT, default="auto",
                       help=f"{t}: samples whose text is entirely zero: drop them from every split "
                            f"(MultiBench's drop_entry) or keep them; auto = drop for MultiBench files, "
                            f"keep for the others (default: %(default)s)")
    group.add_argument(f"--{n}_modalities", default=",".join(MODALITIES),
                       help=f"{t}: comma-separated modalities out of {','.join(MODALITIES)} "
                            f"(default: %(default)s)")
    group.add_argument(f"--{n}_text_key", default="text",
                       help=f"{t}: the key of the text features in each split (MMSA's 'text' holds 768-d "
                            f"BERT features; its 'text_bert' holds token ids, not features) (default: %(default)s)")
    group.add_argument(f"--{n}_normalize", action=argparse.BooleanOptionalAction, default=True,
                       help=f"{t}: standardise each feature dimension with the training split's mean and "
                            f"std over non-padding steps; --no-{n}_normalize feeds the raw features")


def resolve_file(data_path: Optional[str], file: Optional[str], spec: Optional[FeatureDataset] = None) -> Path:
    """--NAME_file relative to --data_path (or on its own); else the single .pkl in --data_path."""
    spec = spec or MOSI
    flag = f"--{spec.name}_file"
    if file:
        path = Path(file)
        if data_path is not None and not path.is_absolute():
            path = Path(data_path) / path
        if not path.is_file():
            raise FileNotFoundError(f"{flag}: no file {path}")
        return path
    if data_path is None:
        raise ValueError(f"--dataset {spec.name} needs --data_path FOLDER holding the feature file "
                         f"(one of {', '.join(spec.known_files())}) or {flag} PATH")
    found = sorted(Path(data_path).glob("*.pkl"))
    if len(found) != 1:
        what = "no .pkl file" if not found else f"{len(found)} .pkl files ({', '.join(p.name for p in found)})"
        raise FileNotFoundError(f"--data_path {data_path} holds {what}; name the feature file with "
                                f"{flag} (e.g. {' or '.join(spec.known_files())})")
    return found[0]


def _feature_size(split: dict, key: str) -> Optional[int]:
    shape = np.shape(split.get(key)) if key in split else ()
    return int(shape[-1]) if len(shape) == 3 else None


def detect_format(data, source: str, spec: Optional[FeatureDataset] = None, override: str = "auto") -> Tuple[str, str]:
    """-> (family, how it was told). A ValueError saying what was found and what each family has
    when the file is none of them."""
    spec = spec or MOSI
    expected = (f"a dict with splits {sorted(FILE_SPLITS.values())}, each a dict of arrays: "
                + "; ".join(f"{spec.describe(f)} has keys {list(fam.required)}" for f, fam in FAMILIES.items()))
    if not isinstance(data, dict):
        raise ValueError(f"{source}: not a {spec.title} feature file: it holds a {type(data).__name__}, "
                         f"expected {expected}")
    missing = [s for s in FILE_SPLITS.values() if not isinstance(data.get(s), dict)]
    if missing:
        raise ValueError(f"{source}: not a {spec.title} feature file: split(s) {missing} missing or not a "
                         f"dict (top-level keys: {sorted(map(str, data))}); expected {expected}")

    def has(family: str) -> bool:
        return all(all(k in data[s] for k in FAMILIES[family].required) for s in FILE_SPLITS.values())

    if override != "auto":
        if override not in FAMILIES:
            raise ValueError(f"--{spec.name}_format: unknown {override!r}; choose one of {list(FORMAT_CHOICES)}")
        if not has(override):
            raise ValueError(f"{source}: --{spec.name}_format {override}: split 'train' has keys "
                             f"{sorted(map(str, data['train']))}, that family has {list(FAMILIES[override].required)}")
        return override, f"--{spec.name}_format"
    # A file with both label keys is MMSA's (the others never write regression_labels).
    if has("mmsa"):
        return "mmsa", "its keys"
    if not has("multibench"):
        raise ValueError(f"{source}: not a {spec.title} feature file of a known format: split 'train' has "
                         f"keys {sorted(map(str, data['train']))}; expected {expected}")
    name = Path(source).name
    for family in ("mult", "multibench"):
        if name in spec.files.get(family, ()):
            return family, "its file name"
    sizes = (_feature_size(data["train"], "audio"), _feature_size(data["train"], "vision"))
    matches = [f for f in ("mult", "multibench") if spec.dims.get(f) == sizes]
    if len(matches) == 1:
        return matches[0], f"its audio / vision feature sizes {sizes[0]} / {sizes[1]}"
    ids = data["train"].get("id")
    if isinstance(ids, np.ndarray) and ids.ndim == 2 and ids.shape[1] >= 3 and ids.dtype.kind in "SO":
        return "mult", "its ids ((N, 3) byte strings, as MulT's)"
    if isinstance(ids, (list, np.ndarray)) and len(ids) and isinstance(ids[0], str) and "[" in ids[0]:
        return "multibench", "its ids ('video[segment]' strings, as MultiBench's)"
    return "multibench", (f"undecided (file name, audio / vision sizes {sizes[0]} / {sizes[1]} and ids fit "
                          f"neither mult nor multibench): read with MultiBench's rules; pass "
                          f"--{spec.name}_format mult for MulT's")


def map_labels(scores: np.ndarray, task: str, zero: str, evaluation: bool = False,
               where: str = "labels") -> Tuple[np.ndarray, np.ndarray, Tuple[str, ...]]:
    """Sentiment scores (N,) -> (class ids (N,), kept (N,) bool, class names). Samples that are not
    kept (binary: zero 'exclude', or 'exclude_eval' on an evaluation split; score 0) have id -1."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    bad = np.flatnonzero(~np.isfinite(scores))
    if len(bad):
        raise ValueError(f"{where}: {len(bad)} sentiment labels are not finite (NaN or inf), e.g. sample "
                         f"{int(bad[0])}; a feature file needs a score for every sample")
    if task == "7class":
        ids = np.clip(np.round(scores), -3, 3).astype(np.int64) + 3
        return ids, np.ones(len(ids), dtype=bool), SEVEN_CLASSES
    if task != "binary":
        raise ValueError(f"unknown task {task!r}; choose one of {list(TASKS)}")
    if zero not in ZERO_RULES:
        raise ValueError(f"unknown zero rule {zero!r}; choose one of {list(ZERO_RULES)}")
    positive = scores >= 0 if zero == "positive" else scores > 0
    drop_zero = zero == "exclude" or (zero == "exclude_eval" and evaluation)
    kept = scores != 0 if drop_zero else np.ones(len(scores), dtype=bool)
    ids = np.where(kept, positive.astype(np.int64), -1)
    return ids, kept, BINARY_CLASSES


def zero_rule_text(zero: str) -> str:
    return {"positive": "score >= 0 positive, score < 0 negative, every sample kept",
            "negative": "score > 0 positive, score <= 0 negative, every sample kept",
            "exclude": "score > 0 positive, score < 0 negative, score 0 dropped from every split",
            "exclude_eval": "score > 0 positive, score <= 0 negative in training; score 0 left out of val "
                            "and test"}[zero]


def _scores(split: dict, key: str, where: str, notes: List[str]) -> np.ndarray:
    """The sentiment score of every sample: (N,), (N, 1) or (N, 1, 1); with the CMU SDK's seven
    label columns (sentiment, then six emotions), the first."""
    arr = np.asarray(split[key], dtype=np.float64)
    if arr.ndim >= 2 and arr.shape[-1] == EMOTION_COLUMNS and int(np.prod(arr.shape[1:])) == EMOTION_COLUMNS:
        notes.append(f"{where}: {key!r} has {EMOTION_COLUMNS} columns (the CMU SDK's sentiment and six "
                     f"emotions); the first, sentiment, is used")
        return arr.reshape(arr.shape[0], -1)[:, 0]
    if arr.ndim == 0 or int(np.prod(arr.shape[1:])) != 1:
        raise ValueError(f"{where}: {key!r} has shape {arr.shape}; expected one sentiment score per sample "
                         f"((N,), (N, 1) or (N, 1, 1))")
    return arr.reshape(-1)


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


@dataclass
class FeatureFile:
    """What `load_features` read: the splits and the rules it applied."""
    splits: Dict[str, MosiSplit]
    format: str              # the family
    format_how: str          # how the family was told
    zero: str                # the binary rule applied (meaningless for 7class)
    empty_text: str          # "drop" or "keep"
    empty: Dict[str, int]    # file split -> samples with all-zero text (dropped or kept)
    notes: List[str]


def parse_modalities(text: str, flag: str = "--mosi_modalities") -> List[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODALITIES]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(f"{flag}: got {text!r}; use distinct names out of {list(MODALITIES)}")
    return names


def load_features(path, spec: Optional[FeatureDataset] = None, task: str = "binary", zero: str = "auto",
                  empty_text: str = "auto", fmt: str = "auto", modalities: Sequence[str] = MODALITIES,
                  text_key: str = "text", normalize: bool = True) -> FeatureFile:
    """Read a feature file of `spec`'s dataset (CMU-MOSI by default)."""
    spec = spec or MOSI
    source = str(path)
    raw = safe_load(path)
    family, how = detect_format(raw, source, spec, fmt)
    rules = FAMILIES[family]
    zero = rules.zero if zero == "auto" else zero
    empty_text = rules.empty_text if empty_text == "auto" else empty_text
    if zero not in ZERO_RULES or empty_text not in EMPTY_TEXT:
        raise ValueError(f"--{spec.name}_zero {zero!r} / --{spec.name}_empty_text {empty_text!r}: choose out of "
                         f"{list(ZERO_RULES)} / {list(EMPTY_TEXT)}")
    keys = {"text": text_key, "audio": "audio", "visual": "vision"}
    notes: List[str] = []
    empty: Dict[str, int] = {}

    arrays: Dict[str, Dict[str, np.ndarray]] = {}
    pads: Dict[str, Dict[str, np.ndarray]] = {}
    labels: Dict[str, np.ndarray] = {}
    scores: Dict[str, np.ndarray] = {}
    classes: Tuple[str, ...] = ()
    for ours, theirs in FILE_SPLITS.items():
        split = raw[theirs]
        where = f"{source}, split {theirs!r}"
        score = _scores(split, rules.label_key, where, notes)
        n = score.shape[0]
        ids, kept, classes = map_labels(score, task, zero, evaluation=ours != "train", where=where)
        if task == "binary" and (~kept).any():
            notes.append(f"{where}: {int((~kept).sum())} samples with score 0 left out ({zero_rule_text(zero)})")
        # MultiBench's drop_entry tests the file's 'text' whatever modalities are trained, so that
        # the sample sets stay those of its reader.
        if text_key in split:
            text = np.asarray(split[text_key])
            if text.ndim < 2 or text.shape[0] != n:
                raise ValueError(f"{where}: {text_key!r} has shape {text.shape}; expected (N, T, D) with N = {n}, "
                                 f"the number of labels")
            blank = ~text.reshape(n, -1).any(1)  # entirely zero (MultiBench tests a zero sum)
            empty[theirs] = int(blank.sum())
            if empty_text == "drop":
                kept &= ~blank
        arrays[ours], pads[ours] = {}, {}
        for m in modalities:
            arr = _sequence_array(split, keys[m], where)
            if m == "text" and _bert_token_like(arr):
                raise ValueError(f"{where}: --{spec.name}_text_key {keys[m]!r} holds BERT token ids / mask / "
                                 f"segment ids {arr.shape}, not features; use the 768-d features in 'text'")
            if arr.shape[0] != n:
                raise ValueError(f"{where}: {keys[m]!r} has {arr.shape[0]} samples but there are {n} labels")
            bad = ~np.isfinite(arr)
            if bad.any():
                notes.append(f"{where}: {int(bad.sum())} non-finite values in {keys[m]!r} set to 0")
                arr = np.where(bad, 0.0, arr).astype(np.float32)
            pad = _padding_from_file(split, family, m, keys[m], n, arr.shape[1], where, notes)
            if pad is not None:
                arr = np.where(pad[..., None], 0.0, arr).astype(np.float32)
            # Steps that are all zero are padding whether or not the file said so (the encoders'
            # convention); recorded here so normalisation can leave them at zero.
            arrays[ours][m] = arr[kept]
            pads[ours][m] = (arr == 0).all(-1)[kept]
        labels[ours], scores[ours] = ids[kept], score[kept]
        if not kept.any():
            raise ValueError(f"{where}: no sample left (zero rule {zero!r}, empty text {empty_text!r})")

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

    info = DatasetInfo(spec.name, classes, tuple(ModalitySpec(m, "sequence", shapes[m]) for m in modalities))
    splits = {
        s: MosiSplit(info, s, {m: torch.from_numpy(np.ascontiguousarray(arrays[s][m])) for m in modalities},
                     torch.from_numpy(labels[s]).long(), torch.from_numpy(scores[s]).float(), family)
        for s in FILE_SPLITS
    }
    return FeatureFile(splits, family, how, zero, empty_text, empty, notes)


def describe(path, spec: FeatureDataset, loaded: FeatureFile, task: str) -> List[str]:
    """The lines the loader prints: what the file is, the rules applied, the sizes."""
    splits = loaded.splits
    info = splits["train"].info
    lengths = {s.shape[0] for s in info.modalities}
    layout = (f"aligned: every modality has T={lengths.pop()}" if len(lengths) == 1
              else "unaligned: sequence lengths differ between modalities")
    mods = ", ".join(f"{s.name} {tuple(s.shape)}" for s in info.modalities)
    reader = FAMILIES[loaded.format].reader
    lines = [f"{spec.title}: {path} is a {spec.describe(loaded.format)} file (told by {loaded.format_how}; "
             f"{layout}); {mods}"]
    if task == "binary":
        default = " (the default for this file, as " + reader + ")" if loaded.zero == FAMILIES[loaded.format].zero \
            else f" (set by --{spec.name}_zero)"
        lines.append(f"  binary rule: {zero_rule_text(loaded.zero)}{default}")
    else:
        lines.append("  7class: scores rounded (halves to even) and clipped to -3..3")
    count = sum(loaded.empty.values())
    per = ", ".join(f"{s} {k}" for s, k in loaded.empty.items())
    what = "dropped (MultiBench's drop_entry)" if loaded.empty_text == "drop" else "kept"
    lines.append(f"  samples with an all-zero text: {count} ({per}), {what}"
                 + ("" if loaded.empty_text == FAMILIES[loaded.format].empty_text
                    else f" (set by --{spec.name}_empty_text)"))
    sizes = " / ".join(str(len(splits[s])) for s in FILE_SPLITS)
    published = spec.sizes.get(loaded.format)
    lines.append(f"  train / val / test {sizes} samples" + (f" ({published} published for these files before "
                                                             f"any sample is left out)" if published else ""))
    return lines


def build(spec: FeatureDataset, args: argparse.Namespace) -> DataSplits:
    def flag(key: str):
        return getattr(args, f"{spec.name}_{key}")

    path = resolve_file(args.data_path, flag("file"), spec)
    names = parse_modalities(flag("modalities"), f"--{spec.name}_modalities")
    loaded = load_features(path, spec, task=flag("task"), zero=flag("zero"), empty_text=flag("empty_text"),
                           fmt=flag("format"), modalities=names, text_key=flag("text_key"),
                           normalize=flag("normalize"))
    for line in describe(path, spec, loaded, flag("task")):
        print(line, flush=True)
    for note in loaded.notes:
        print(f"  note: {note}", flush=True)
    splits = loaded.splits
    return DataSplits(info=splits["train"].info, train=splits["train"], train_eval=splits["train"],
                      val=splits["val"], test=splits["test"])


def register_feature_dataset(spec: FeatureDataset) -> FeatureDataset:
    """Register `spec`'s trainer entry: --dataset NAME and its --NAME_* flags."""
    unknown = set(spec.files) - set(FAMILIES)
    if unknown:
        raise ValueError(f"dataset {spec.name!r}: unknown file families {sorted(unknown)}; known {list(FAMILIES)}")
    register_dataset(spec.name, partial(add_args, spec),
                     f"{spec.title} text+audio+visual feature sequences from MMSA, MulT or MultiBench files"
                     )(partial(build, spec))
    return spec


# Sizes: MMSA's config_regression.json (train) and the widely reported 1,284 / 229 / 686 of CMU's
# seq_length_50 files; MultiBench's mosi_raw.pkl comes from the CMU SDK's current mosi.hdf5, reported
# as 1,283 / 214 / 686 (CMU-MultimodalSDK issue 2), not checked here.
MOSI = register_feature_dataset(FeatureDataset(
    name="mosi",
    title="CMU-MOSI",
    files={"mmsa": ("aligned_50.pkl", "unaligned_50.pkl"), "mult": ("mosi_data.pkl", "mosi_data_noalign.pkl"),
           "multibench": ("mosi_raw.pkl",)},
    dims={"mult": (5, 20), "multibench": (74, 35)},
    sizes={"mmsa": "1,284 / 229 / 686", "mult": "1,284 / 229 / 686", "multibench": "1,283 / 214 / 686 (reported)"},
))
