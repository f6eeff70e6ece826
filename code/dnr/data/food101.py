"""UPMC Food-101 (Wang, Kumar, Thome, Cord, Precioso; ICME workshop 2015): recipe web pages of the 101
Food-101 classes, each an image and the page's title; image + text.

Raw input (--root, as distributed):
  images/{train,test}/<class>/<file>.jpg
  texts/train_titles.csv, texts/test_titles.csv   rows (image file name, title, class), e.g.
                      `apple_pie_0.jpg,"Apple Pie Recipe, Easy",apple_pie`; with or without a header
                      row (BalanceBenchmark's copy has `Image_path,text,label`; a header's column names
                      are used when it has them); titles may be empty. UTF-8 (a file that is not is
                      read as Latin-1, and a note says so).
An image's path is images/<split>/<class>/<file>. Clips are named `<split>_<file stem>` (train and
test may reuse a file name).

Classes: the training list's labels, sorted (101). Splits: the lists' train and test; val is
`--val_count` (5,000, as MMBT's, QMF's and MLA's dev sets) drawn from the *listed* training rows,
each class its share (seeded), before the rows whose image is missing or broken are left out.

The preparation writes each image as its clip's single frame (scaled down to a 256-px short side)
and keeps each title in the manifest; it builds the word vocabulary (text.py) from the titles of
the training split (val's and test's words it has not seen become 'unknown') into text/vocab.txt.
The loader encodes every title with it into --food101_text_len (40, BalanceBenchmark's) token ids.
Published results on Food-101 use a pretrained BERT for the text and a pretrained ResNet or ViT for
the images; none can be shipped here, so the encoders train from scratch unless the user passes
their own weights (--encoder_weights).
"""
from __future__ import annotations

import argparse
import csv
import io
import re
from pathlib import Path
from typing import Dict, List, Tuple

from .clips import RGB, TEXT, PreparedDataset, register_prepared
from .prepare import Collected, RawClip, UsageError
from .splits import stratified_count
from .text import TOKENIZER, build_vocabulary, digest, vocabulary_text

NAME = "food101"
SCHEME = "default"
SPLITS = ("train", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
VOCABULARY = "text/vocab.txt"
# Header names of each column, lowercased (BalanceBenchmark's Image_path / text / label, and the
# names third-party readers give the columns).
COLUMNS = {"image": ("image_path", "image", "img", "filename", "file", "path", "image_file"),
           "text": ("text", "title", "titles", "caption"),
           "label": ("label", "food", "class", "category")}
UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")


def add_prepare_args(group) -> None:
    group.add_argument("--val_count", type=int, default=5000,
                       help="training rows drawn for val, each class its share (default: 5000, the field's)")
    group.add_argument("--min_count", type=int, default=2,
                       help="a word enters the vocabulary when it occurs at least this often in the training "
                            "titles (default: 2)")
    group.add_argument("--max_vocab", type=int, default=30000,
                       help="vocabulary size at most, padding and unknown included (default: 30000)")


def _decode(path: Path, notes: List[str]) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        notes.append(f"{path.name} is not UTF-8 (first at line {line}): read as Latin-1")
        return data.decode("latin-1")


def _columns(header: List[str]) -> Dict[str, int]:
    """Column positions from a header's names; (0, 1, 2) for the names not found."""
    named = {}
    lowered = [h.strip().lower() for h in header]
    for role, names in COLUMNS.items():
        for k, h in enumerate(lowered):
            if h in names:
                named[role] = k
    if len(named) == 3 and len(set(named.values())) == 3:
        return named
    return {"image": 0, "text": 1, "label": 2}


def read_titles(path: Path, notes: List[str]) -> List[Tuple[str, str, str, int]]:
    """A titles CSV -> [(image file name, title, label, line)]."""
    if not path.is_file():
        raise UsageError(f"--root: no {path}: expected UPMC Food-101's texts/train_titles.csv and "
                         f"texts/test_titles.csv")
    reader = csv.reader(io.StringIO(_decode(path, notes), newline=""))
    rows, cols, joined, first = [], {"image": 0, "text": 1, "label": 2}, 0, True
    for fields in reader:
        if not any(f.strip() for f in fields):
            continue
        if first and not fields[0].strip().lower().endswith(IMAGE_EXTENSIONS):
            first = False
            cols = _columns(fields)  # a header row
            continue
        first = False
        if len(fields) < 3:
            raise UsageError(f"{path}:{reader.line_num}: expected 3 fields (image file, title, class), got "
                             f"{len(fields)}: {fields}")
        if len(fields) > 3 and cols == {"image": 0, "text": 1, "label": 2}:
            # An unquoted comma in the title: the first field is the image, the last the class.
            fields = [fields[0], ",".join(fields[1:-1]), fields[-1]]
            joined += 1
        image, text, label = (fields[cols[r]].strip() for r in ("image", "text", "label"))
        if not image.lower().endswith(IMAGE_EXTENSIONS) or not label:
            raise UsageError(f"{path}:{reader.line_num}: expected an image file name ({'/'.join(IMAGE_EXTENSIONS)}) "
                             f"and a class, got {fields}")
        rows.append((image, text, label, reader.line_num))
    if joined:
        notes.append(f"{path.name}: {joined} row(s) had more than 3 fields (a title with an unquoted comma): "
                     f"the middle fields were read as the title")
    if not rows:
        raise UsageError(f"{path}: no rows")
    return rows


def clip_name(split: str, image: str) -> str:
    return f"{split}_{UNSAFE.sub('_', Path(image).stem)}"


def collect(args: argparse.Namespace) -> Collected:
    root = Path(args.root)
    for folder in ("images/train", "images/test", "texts"):
        if not (root / folder).is_dir():
            raise UsageError(f"--root {root}: expected UPMC Food-101's folder {folder}/ in it")
    if args.val_count < 1 or args.min_count < 1 or args.max_vocab < 3:
        raise UsageError(f"--val_count and --min_count must be >= 1 and --max_vocab >= 3, got {args.val_count}, "
                         f"{args.min_count}, {args.max_vocab}")
    notes: List[str] = []
    labels, texts, images, split_of, where = {}, {}, {}, {}, {}
    repeated = 0
    for split in SPLITS:
        path = root / "texts" / f"{split}_titles.csv"
        for image, text, label, line in read_titles(path, notes):
            clip = clip_name(split, image)
            here = f"texts/{path.name}:{line}"
            if clip in labels:
                if (labels[clip], texts[clip]) != (label, text) or split_of[clip] != split:
                    raise UsageError(f"{here}: {image} is listed again as clip {clip!r} with other content "
                                     f"({where[clip]} lists it first; file names that differ only in characters "
                                     f"outside letters, digits, '_', '-', '.' meet here)")
                repeated += 1
                continue
            labels[clip], texts[clip], split_of[clip], where[clip] = label, text, split, here
            images[clip] = Path("images") / split / label / Path(image).name
    if repeated:
        notes.append(f"{repeated} row(s) repeat an earlier row and were read once")
    train_all = sorted(c for c, s in split_of.items() if s == "train")
    test = sorted(c for c, s in split_of.items() if s == "test")
    classes = sorted({labels[c] for c in train_all})
    unknown = sorted({labels[c] for c in test} - set(classes))
    if unknown:
        raise UsageError(f"texts/test_titles.csv names classes that texts/train_titles.csv does not: {unknown[:5]}")
    if len(classes) < 2:
        raise UsageError(f"texts/train_titles.csv names {len(classes)} class(es); need at least 2")
    try:
        val, train = stratified_count(train_all, labels, args.val_count, (args.seed, 1))
    except ValueError as err:
        raise UsageError(f"--val_count {args.val_count}: {err}") from None

    # The vocabulary from the training split's titles only (val and test words unseen there are
    # unknown to the model, as they would be to any model trained on this split).
    words = build_vocabulary((texts[c] for c in train), args.min_count, args.max_vocab)
    vocab = vocabulary_text(words)
    text_entry = {"vocabulary": VOCABULARY, "size": len(words), "sha256": digest(vocab), "tokenizer": TOKENIZER,
                  "min_count": args.min_count, "max_size": args.max_vocab,
                  "built_from": f"the titles of the {len(train)} listed training rows left after val was drawn "
                                f"(scheme {SCHEME!r})",
                  "padding_id": 0, "unknown_id": 1, "per_clip": "each clip's title is its manifest entry 'text'"}

    clips, missing = [], {}
    for clip in sorted(labels):
        path = root / images[clip]
        if not path.is_file():
            missing[clip] = f"no {images[clip].as_posix()} (listed at {where[clip]})"
            continue
        clips.append(RawClip(id=clip, label=labels[clip], video=path, audio=None,
                             source={"image": images[clip].as_posix(), "text": where[clip]},
                             meta={"text": texts[clip]}))
    present = {c.id for c in clips}
    parts = {"train": [c for c in train if c in present], "val": [c for c in val if c in present],
             "test": [c for c in test if c in present]}
    how = (f"train/test from texts/*_titles.csv; val: {args.val_count} listed training rows drawn per class "
           f"(largest remainder, seed {args.seed})")
    return Collected(classes=classes, clips=clips, splits={SCHEME: parts}, split_notes={SCHEME: how},
                     missing=missing, notes=notes, files={VOCABULARY: vocab.encode("utf-8")},
                     manifest={"text": text_entry})


register_prepared(PreparedDataset(
    name=NAME,
    title="UPMC Food-101",
    description="UPMC Food-101: recipe-page image + title, 101 classes",
    modalities=(("image", RGB), ("text", TEXT)),
    frames=1,
    schemes=(SCHEME,),
    scheme_help="",
    raw="UPMC Food-101 from images/{train,test}/<class>/*.jpg and texts/{train,test}_titles.csv",
    add_prepare_args=add_prepare_args,
    collect=collect,
    short_side=256,
    image=True,
))
