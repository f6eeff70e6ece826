"""VGGSound (Chen, Xie, Vedaldi, Zisserman, ICASSP 2020): 10-s YouTube clips of 309 classes in which
the labelled sound's source is visible; audio + video from the same file.

Raw input:
  --csv   the published `vggsound.csv`: no header, four columns per row: YouTube id, start second,
          label, `train` / `test`. Labels with a comma are double-quoted ("female speech, woman
          speaking"), so the file is read with a CSV parser; CRLF or LF line ends, a byte-order mark
          and a header row (a first row whose last field is not train / test) are accepted.
  --root  the downloaded clips (with their audio track) anywhere under one folder, each named after
          its row in one of the forms in circulation: `<id>_<start 6 digits>` (VGG's own lists and
          downloads, e.g. `glLQrEijrKg_000300.mp4`), `<id>_<start as written>` (GeWu-Lab's loaders),
          or `<id>_<start>_<end>` (AudioSet / Kinetics downloaders), with a video extension. The
          files must be the 10-s clips that start at the row's second, as VGG distributes them.

Clips are named `<id>_<start 6 digits>` in the prepared folder, whatever their file was called.
Classes: every label the list names, sorted (309 in the published list); a class is never dropped
because its files are missing. Splits: the list's train and test; val drawn from the *listed*
training clips, `--val_fraction` of each class (seeded), before the unavailable ones are left out,
so a clip that is (or becomes) available moves no other. Rows whose video is not under --root
(clips taken off YouTube) are named in the summary and the manifest's `missing`, and left out.
"""
from __future__ import annotations

import argparse
import csv
import io
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

from .clips import AUDIO, RGB, PreparedDataset, register_prepared
from .kinetics_sounds import VIDEO_EXTENSIONS
from .prepare import Collected, RawClip, UsageError
from .splits import stratified_fraction

NAME = "vggsound"
SCHEME = "default"
PUBLISHED_CLASSES = 309
CLIP_SECONDS = 10
SPLIT_VALUES = ("train", "test")
START_ONLY = re.compile(r"^(.+)_(\d+)$")            # <id>_<start>, padded or not
START_END = re.compile(r"^(.+)_(\d+)_(\d+)$")       # <id>_<start>_<end>


@dataclass(frozen=True)
class Row:
    youtube_id: str
    start: int
    label: str
    split: str
    line: int

    @property
    def clip(self) -> str:
        return f"{self.youtube_id}_{self.start:06d}"


def add_prepare_args(group) -> None:
    group.add_argument("--csv", required=True,
                       help="the published vggsound.csv (rows 'youtube_id,start_seconds,label,train|test', "
                            "labels with commas quoted)")
    group.add_argument("--val_fraction", type=float, default=0.1,
                       help="fraction of each class of the listed training clips drawn for val (default: 0.1)")


def _start(text: str) -> int:
    value = float(text)  # written as an integer; '30.0' is read too
    if value < 0 or value != int(value):
        raise ValueError(text)
    return int(value)


def read_csv(path: Path) -> Tuple[List[Row], List[str]]:
    """The rows of a vggsound.csv, each once -> (rows in file order, notes)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--csv {path}: no such file")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise UsageError(f"--csv {path}: not UTF-8 text ({err})") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    rows: List[Row] = []
    seen: Dict[Tuple[str, int], Row] = {}
    repeated = 0
    first = True
    for fields in reader:
        line = reader.line_num
        fields = [f.strip() for f in fields]
        if not any(fields):
            continue
        if first and (len(fields) != 4 or fields[3].lower() not in SPLIT_VALUES):
            first = False
            if len(fields) == 4 and not fields[1].replace(".", "", 1).isdigit():
                continue  # a header row: column names, not a clip
        first = False
        if len(fields) != 4:
            raise UsageError(f"--csv {path}:{line}: expected 4 fields (YouTube id, start second, label, train/test), "
                             f"got {len(fields)}: {fields}; a label with a comma must be quoted")
        yid, start_text, label, split = fields
        try:
            start = _start(start_text)
        except ValueError:
            raise UsageError(f"--csv {path}:{line}: start second {start_text!r} is not a whole number of "
                             f"seconds") from None
        if split.lower() not in SPLIT_VALUES or not yid or not label:
            raise UsageError(f"--csv {path}:{line}: expected a YouTube id, a label and 'train' or 'test', got "
                             f"{fields}")
        row = Row(yid, start, label, split.lower(), line)
        old = seen.get((yid, start))
        if old is not None:
            if (old.label, old.split) != (row.label, row.split):
                raise UsageError(f"--csv {path}:{line}: clip {yid} at {start} s is listed again with label "
                                 f"{label!r} / {row.split} (line {old.line}: {old.label!r} / {old.split})")
            repeated += 1
            continue
        seen[(yid, start)] = row
        rows.append(row)
    if not rows:
        raise UsageError(f"--csv {path}: no rows")
    notes = [f"{repeated} row(s) of --csv repeat an earlier row and were read once"] if repeated else []
    return rows, notes


def index_files(root: Path) -> Tuple[Dict[Tuple[str, int], List[Path]], List[Path]]:
    """-> ({(YouTube id, start second): video files} over every name form a file may have, every
    video file under root)."""
    index: Dict[Tuple[str, int], List[Path]] = defaultdict(list)
    files = [p for p in sorted(root.rglob("*")) if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file()]
    for p in files:
        # A name with both forms' shape (x_000030_000040) is indexed under both readings, so the
        # row decides: (x, 30) with an end, or (x_000030, 40) without.
        for pattern in (START_ONLY, START_END):
            m = pattern.match(p.stem)
            if m:
                index[(m.group(1), int(m.group(2)))].append(p)
    return index, files


def collect(args: argparse.Namespace) -> Collected:
    root = Path(args.root)
    if not 0 < args.val_fraction < 0.5:
        raise UsageError(f"--val_fraction must lie in (0, 0.5), got {args.val_fraction}")
    rows, notes = read_csv(Path(args.csv))
    index, files = index_files(root)
    labels = {r.clip: r.label for r in rows}
    clips, missing, twice, used = [], {}, [], set()
    for r in rows:
        found = sorted(set(index.get((r.youtube_id, r.start), [])))
        if len(found) > 1:
            twice.append(f"{r.clip}: {', '.join(str(p.relative_to(root)) for p in found)}")
            continue
        if not found:
            missing[r.clip] = (f"no video named {r.youtube_id}_{r.start:06d}, {r.youtube_id}_{r.start} or "
                               f"{r.youtube_id}_{r.start:06d}_{r.start + CLIP_SECONDS:06d} "
                               f"({'/'.join(VIDEO_EXTENSIONS)}) under --root")
            continue
        used.add(found[0])
        clips.append(RawClip(id=r.clip, label=r.label, video=found[0], audio=None,
                             source={"video": str(found[0].relative_to(root))},
                             meta={"youtube_id": r.youtube_id, "start_s": str(r.start)}))
    if twice:
        raise UsageError(f"--root {root}: {len(twice)} row(s) of --csv match several files, e.g. {twice[:3]}; "
                         f"keep one file per clip")
    unused = len(set(files) - used)
    if unused:
        notes.append(f"{unused} video file(s) under --root match no row of --csv and were ignored")
    classes = sorted(set(labels.values()))
    if len(classes) < 2:
        raise UsageError(f"--csv {args.csv}: names {len(classes)} class(es); need at least 2")
    if len(classes) != PUBLISHED_CLASSES:
        notes.append(f"--csv names {len(classes)} classes; the published vggsound.csv has {PUBLISHED_CLASSES}")
    train_all = sorted(r.clip for r in rows if r.split == "train")
    test = sorted(r.clip for r in rows if r.split == "test")
    # From the full training list, so that a clip that is (or becomes) available moves no other.
    val, train = stratified_fraction(train_all, labels, args.val_fraction, (args.seed, 1))
    present = {c.id for c in clips}
    parts = {"train": [c for c in train if c in present], "val": [c for c in val if c in present],
             "test": [c for c in test if c in present]}
    how = (f"train/test from --csv; val drawn from the listed training clips per class ({args.val_fraction:g}, "
           f"seed {args.seed})")
    return Collected(classes=classes, clips=clips, splits={SCHEME: parts}, split_notes={SCHEME: how},
                     missing=missing, notes=notes)


register_prepared(PreparedDataset(
    name=NAME,
    title="VGGSound",
    description="VGGSound: audio + video of YouTube clips, 309 classes",
    modalities=(("audio", AUDIO), ("visual", RGB)),
    frames=3,
    schemes=(SCHEME,),
    scheme_help="",
    raw="VGGSound from the clips named in vggsound.csv (video files with audio)",
    add_prepare_args=add_prepare_args,
    collect=collect,
    short_side=256,
))
