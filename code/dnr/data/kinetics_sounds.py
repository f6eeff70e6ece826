"""Kinetics-Sounds: Kinetics clips of 31 classes in which the action can be heard; 10-s YouTube
clips, audio + video from the same file.

Raw input: the video files (with their audio track) anywhere under --root, each named after its
list entry (`<name>.mp4`, or .mkv/.webm/.avi/.mov/.flv/.m4v). Labels and the train/test split come
from OGM-GE's lists (rows `name,10,label`: first field the file name, last the label) when given;
without lists the videos must sit in one folder per class (<root>/<label>/<name>.mp4) and the test
set is drawn. No validation list is published: val is drawn from train (10% of each class, seeded).

Drawn splits never move a clip when other files come or go: with the lists, val is drawn from the
full training list (clips no longer available included, then left out); without them, each clip's
split comes from a seeded hash of its name alone (its class's shares in expectation).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .clips import AUDIO, RGB, PreparedDataset, register_prepared
from .prepare import Collected, RawClip, UsageError
from .splits import hash_bands, read_list, stratified_fraction

NAME = "kinetics_sounds"
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".flv", ".m4v")
SCHEME = "default"


def add_prepare_args(group) -> None:
    group.add_argument("--train_list", default=None,
                       help="OGM-GE's Kinetics-Sounds training list (rows 'name,10,label'); with --test_list "
                            "it gives the labels and the train/test split (default: none: labels from the "
                            "class folders, test drawn)")
    group.add_argument("--test_list", default=None, help="OGM-GE's Kinetics-Sounds test list (rows 'name,10,label')")
    group.add_argument("--test_fraction", type=float, default=0.15,
                       help="without lists: fraction of each class drawn for test (default: 0.15)")
    group.add_argument("--val_fraction", type=float, default=0.1,
                       help="fraction of each class of train drawn for val (default: 0.1)")


def find_videos(root: Path) -> dict:
    """{file stem: path} of every video file under root; the same stem twice is an error."""
    found, twice = {}, []
    for p in sorted(root.rglob("*")):
        if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file():
            if p.stem in found:
                twice.append(f"{found[p.stem].relative_to(root)} and {p.relative_to(root)}")
            found[p.stem] = p
    if twice:
        raise UsageError(f"--root {root}: {len(twice)} clip name(s) occur twice, e.g. {twice[:3]}; keep one "
                         f"file per clip")
    return found


def _labelled_lists(args, files: dict):
    labels, order = {}, {}
    for flag, path in (("--train_list", args.train_list), ("--test_list", args.test_list)):
        for name, label in read_list(Path(path)):
            if name in labels and labels[name] != label:
                raise UsageError(f"{flag} {path}: clip {name!r} has label {label!r}, already listed with "
                                 f"{labels[name]!r}")
            if name in order and order[name] != flag:
                raise UsageError(f"clip {name!r} is in both --train_list and --test_list")
            labels[name], order[name] = label, flag
    train = sorted(n for n, f in order.items() if f == "--train_list")
    test = sorted(n for n, f in order.items() if f == "--test_list")
    return labels, train, test


def collect(args: argparse.Namespace) -> Collected:
    root = Path(args.root)
    for flag, value, hi in (("--test_fraction", args.test_fraction, 0.5), ("--val_fraction", args.val_fraction, 0.5)):
        if not 0 < value < hi:
            raise UsageError(f"{flag} must lie in (0, {hi}), got {value}")
    if (args.train_list is None) != (args.test_list is None):
        raise UsageError("--train_list and --test_list go together: give both or neither")
    files = find_videos(root)
    notes, missing = [], {}
    if args.train_list:
        labels, train_all, test = _labelled_lists(args, files)
        for name in sorted(labels):
            if name not in files:
                missing[name] = f"no video file named <name>{{{','.join(VIDEO_EXTENSIONS)}}} under --root"
        unlisted = len(set(files) - set(labels))
        if unlisted:
            notes.append(f"{unlisted} video file(s) under --root are in none of the lists and were ignored")
        # From the full training list, so that a clip that is (or becomes) available moves no other.
        val, train = stratified_fraction(train_all, labels, args.val_fraction, (args.seed, 1))
        how = (f"train/test from the given lists; val drawn from the listed training clips per class "
               f"({args.val_fraction:g}, seed {args.seed})")
    else:
        labels = {}
        for name, p in files.items():
            rel = p.relative_to(root)
            if len(rel.parts) < 2:
                raise UsageError(f"--root {root}: {rel} is not in a class folder; without --train_list/--test_list "
                                 f"the videos must sit in <root>/<label>/<name>.mp4")
            labels[name] = rel.parts[-2]
        f, v = args.test_fraction, args.val_fraction
        test, val, train = hash_bands(sorted(files), [f, f + v * (1.0 - f)], args.seed, "kinetics_sounds clip")
        how = (f"labels from the class folders; each clip by a seeded hash of its name (seed {args.seed}): test "
               f"{f:g}, val {v:g} of the rest, per class in expectation")
    classes = sorted(set(labels.values()))
    if len(classes) < 2:
        raise UsageError(f"--root {root}: found {len(classes)} class(es); need at least 2")
    parts = {"train": [n for n in train if n in files], "val": [n for n in val if n in files],
             "test": [n for n in test if n in files]}
    clips = [RawClip(id=n, label=labels[n], video=files[n], audio=None,
                     source={"video": str(files[n].relative_to(root))})
             for n in sorted(set(train) | set(val) | set(test)) if n in files]
    return Collected(classes=classes, clips=clips, splits={SCHEME: parts}, split_notes={SCHEME: how},
                     missing=missing, notes=notes)


register_prepared(PreparedDataset(
    name=NAME,
    title="Kinetics-Sounds",
    description="Kinetics-Sounds: audio + video, 31 classes",
    modalities=(("audio", AUDIO), ("visual", RGB)),
    frames=3,
    schemes=(SCHEME,),
    scheme_help="",
    raw="Kinetics-Sounds from video files with audio (and OGM-GE's lists)",
    add_prepare_args=add_prepare_args,
    collect=collect,
    short_side=256,
))
