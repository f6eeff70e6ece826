"""Kinetics-Sounds: Kinetics clips of 31 classes in which the action can be heard; 10-s YouTube
clips, audio + video from the same file.

Raw input: the video files (with their audio track) anywhere under --root, each named after its
list entry (`<name>.mp4`, or .mkv/.webm/.avi/.mov/.flv/.m4v). Labels and the train/test split come
from OGM-GE's lists (rows `name,10,label`: first field the file name, last the label) when given;
without lists the videos must sit in one folder per class (<root>/<label>/<name>.mp4) and the test
set is drawn per class. Either way val is drawn from train per class (10%, seeded): no validation
list is published.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .base import DataSplits, register_dataset
from .clips import AudioInput, FramesInput, build_prepared, check_positive, choose_recipe, open_prepared
from .prepare import Collected, Preparer, RawClip, UsageError, register_preparer
from .splits import read_ogm_list, stratified_fraction

NAME = "kinetics_sounds"
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".flv", ".m4v")
SCHEME = "default"


# ---------------------------------------------------------------------------------------------
# Loader
# ---------------------------------------------------------------------------------------------

def add_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--kinetics_sounds_audio", choices=("auto", "fbank", "stft"), default="auto",
                       help="Kinetics-Sounds audio features: fbank (1 x 128 x 1024 Kaldi-style filterbank) "
                            "or stft (1 x 257 x 188 log-STFT); auto = the one prepared, fbank when both are "
                            "(default: %(default)s)")
    group.add_argument("--kinetics_sounds_frames", type=int, default=3,
                       help="Kinetics-Sounds frames per clip fed to the visual encoder, one per segment "
                            "(default: %(default)s)")
    group.add_argument("--kinetics_sounds_image_size", type=int, default=224,
                       help="Kinetics-Sounds frame height and width in pixels after crop/resize "
                            "(default: %(default)s)")


@register_dataset(NAME, add_args, "Kinetics-Sounds: audio + video, 31 classes; prepared with "
                                  "script/prepare.py kinetics_sounds")
def build(args: argparse.Namespace) -> DataSplits:
    check_positive(args.kinetics_sounds_frames, "--kinetics_sounds_frames")
    check_positive(args.kinetics_sounds_image_size, "--kinetics_sounds_image_size", 16)
    manifest = open_prepared(NAME, args.data_path)
    recipe = choose_recipe(manifest, args.kinetics_sounds_audio, "--kinetics_sounds_audio", Path(args.data_path))
    inputs = [AudioInput("audio", recipe),
              FramesInput("visual", "rgb", args.kinetics_sounds_frames, args.kinetics_sounds_image_size)]
    return build_prepared(NAME, args.data_path, SCHEME, inputs, manifest,
                          frame_cache=getattr(args, "frame_cache", "off"))


# ---------------------------------------------------------------------------------------------
# Preparation
# ---------------------------------------------------------------------------------------------

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
        for name, label in read_ogm_list(Path(path)):
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
            notes.append(f"{unlisted} video file(s) under --root are in neither list and were ignored")
        how = "train/test from the given OGM-GE lists"
    else:
        labels = {}
        for name, p in files.items():
            rel = p.relative_to(root)
            if len(rel.parts) < 2:
                raise UsageError(f"--root {root}: {rel} is not in a class folder; without --train_list/--test_list "
                                 f"the videos must sit in <root>/<label>/<name>.mp4")
            labels[name] = rel.parts[-2]
        present = sorted(files)
        test, train_all = stratified_fraction(present, labels, args.test_fraction, (args.seed, 0))
        how = f"labels from the class folders; test drawn per class ({args.test_fraction:g}, seed {args.seed})"
    classes = sorted(set(labels.values()))
    if len(classes) < 2:
        raise UsageError(f"--root {root}: found {len(classes)} class(es); need at least 2")
    train_all = [n for n in train_all if n in files]
    test = [n for n in test if n in files]
    val, train = stratified_fraction(train_all, labels, args.val_fraction, (args.seed, 1))
    how += f"; val drawn from train per class ({args.val_fraction:g}, seed {args.seed})"
    clips = [RawClip(id=n, label=labels[n], video=files[n], audio=None,
                     source={"video": str(files[n].relative_to(root))})
             for n in sorted(set(train_all) | set(test))]
    return Collected(classes=classes, clips=clips, splits={SCHEME: {"train": train, "val": val, "test": test}},
                     split_notes={SCHEME: how}, missing=missing, notes=notes)


register_preparer(Preparer(
    name=NAME,
    description="Kinetics-Sounds from video files with audio (and OGM-GE's lists)",
    add_args=add_prepare_args,
    collect=collect,
    audio=True,
    flow=False,
    short_side=256,
))
