"""CREMA-D: 7,442 clips of 91 actors speaking 12 sentences with 6 emotions; audio + face video.

Raw input (as distributed): <root>/VideoFlash/<clip>.flv and <root>/AudioWAV/<clip>.wav, clip names
ActorID_Sentence_Emotion_Level (`1001_DFA_ANG_XX` -> actor 1001, emotion ANG). The audio comes
from the WAV files, the frames from the videos.

Split schemes written by the preparation (`--cremad_split`):
  clip   the common split: OGM-GE's train/test lists when given (--train_list/--test_list),
         else a test set drawn per class (10% by default, seeded); val is then drawn from train
         with the test set's per-class counts, as the D&R authors did (6,698 -> 5,954 + 744).
         A clip's actor may appear in several splits (the common split is by clip).
  actor  actor-disjoint: 10% of the actors for test, as many for val, the rest for train (seeded);
         no actor is in two splits.
"""
from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

from .base import DataSplits, register_dataset
from .clips import AudioInput, FramesInput, build_prepared, check_positive, choose_recipe, open_prepared
from .prepare import Collected, Preparer, RawClip, UsageError, register_preparer
from .splits import class_counts, partition_by_key, read_ogm_list, stratified_fraction, take_per_class

NAME = "cremad"
EMOTIONS = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")  # the authors' class order (ids 0-5)
CLIP_NAME = re.compile(r"^(\d{4})_([A-Z]{3})_([A-Z]{3})_([A-Z]{2})$")


# ---------------------------------------------------------------------------------------------
# Loader
# ---------------------------------------------------------------------------------------------

def add_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--cremad_audio", choices=("auto", "fbank", "stft"), default="auto",
                       help="CREMA-D audio features: fbank (1 x 128 x 1024 Kaldi-style filterbank, the D&R "
                            "authors'), stft (1 x 257 x 188 OGM-GE log-STFT); auto = the one prepared, "
                            "fbank when both are (default: %(default)s)")
    group.add_argument("--cremad_split", choices=("clip", "actor"), default="clip",
                       help="CREMA-D split scheme: clip (the common split, val drawn from train as the "
                            "D&R authors did) or actor (actor-disjoint) (default: %(default)s)")
    group.add_argument("--cremad_frames", type=int, default=2,
                       help="CREMA-D frames per clip fed to the visual encoder, one per segment "
                            "(default: %(default)s)")
    group.add_argument("--cremad_image_size", type=int, default=224,
                       help="CREMA-D frame height and width in pixels after crop/resize (default: %(default)s)")


@register_dataset(NAME, add_args, "CREMA-D: speech audio + face video, 6 emotions; prepared with "
                                  "script/prepare.py cremad")
def build(args: argparse.Namespace) -> DataSplits:
    check_positive(args.cremad_frames, "--cremad_frames")
    check_positive(args.cremad_image_size, "--cremad_image_size", 16)
    manifest = open_prepared(NAME, args.data_path)
    recipe = choose_recipe(manifest, args.cremad_audio, "--cremad_audio", Path(args.data_path))
    inputs = [AudioInput("audio", recipe),
              FramesInput("visual", "rgb", args.cremad_frames, args.cremad_image_size)]
    return build_prepared(NAME, args.data_path, args.cremad_split, inputs, manifest,
                          frame_cache=getattr(args, "frame_cache", "off"))


# ---------------------------------------------------------------------------------------------
# Preparation
# ---------------------------------------------------------------------------------------------

def add_prepare_args(group) -> None:
    group.add_argument("--train_list", default=None,
                       help="OGM-GE's CREMA-D training list (rows 'clip_id,LABEL'); with --test_list it "
                            "defines the 'clip' split's train and test (default: none, the test set is drawn)")
    group.add_argument("--test_list", default=None, help="OGM-GE's CREMA-D test list (rows 'clip_id,LABEL')")
    group.add_argument("--test_fraction", type=float, default=0.1,
                       help="without lists: fraction of each class held out for test in the 'clip' split; "
                            "always: fraction of the actors held out for test (and as many for val) in the "
                            "'actor' split (default: 0.1)")


def _list(path: str, flag: str) -> list:
    rows = read_ogm_list(Path(path))
    out = []
    for clip, label in rows:
        match = CLIP_NAME.match(clip)
        if not match:
            raise UsageError(f"{flag} {path}: {clip!r} is not a CREMA-D clip name (ActorID_Sentence_Emotion_Level)")
        if label != match.group(3):
            raise UsageError(f"{flag} {path}: clip {clip} has label {label!r}, its name says {match.group(3)!r}")
        out.append(clip)
    return out


def collect(args: argparse.Namespace) -> Collected:
    root = Path(args.root)
    vdir, adir = root / "VideoFlash", root / "AudioWAV"
    for d, what in ((vdir, "the .flv videos"), (adir, "the .wav audio")):
        if not d.is_dir():
            raise UsageError(f"--root {root}: expected CREMA-D's folder {d.name}/ ({what}) in it")
    if not 0 < args.test_fraction < 0.5:
        raise UsageError(f"--test_fraction must lie in (0, 0.5), got {args.test_fraction}")
    if (args.train_list is None) != (args.test_list is None):
        raise UsageError("--train_list and --test_list go together: give both or neither")

    videos = {p.stem: p for p in vdir.iterdir() if p.suffix.lower() == ".flv"}
    wavs = {p.stem: p for p in adir.iterdir() if p.suffix.lower() == ".wav"}
    notes, ignored = [], []
    clips, missing, labels, actor = [], {}, {}, {}
    for cid in sorted(set(videos) | set(wavs)):
        match = CLIP_NAME.match(cid)
        if not match or match.group(3) not in EMOTIONS:
            ignored.append(cid)
            continue
        if cid not in videos:
            missing[cid] = "no VideoFlash/<clip>.flv"
            continue
        if cid not in wavs:
            missing[cid] = "no AudioWAV/<clip>.wav"
            continue
        labels[cid], actor[cid] = match.group(3), match.group(1)
        clips.append(RawClip(id=cid, label=match.group(3), video=videos[cid], audio=wavs[cid],
                             source={"video": f"VideoFlash/{videos[cid].name}", "audio": f"AudioWAV/{wavs[cid].name}"},
                             meta={"actor": match.group(1)}))
    if ignored:
        notes.append(f"{len(ignored)} file name(s) are not CREMA-D clips (ActorID_Sentence_Emotion_Level with "
                     f"an emotion of {EMOTIONS}) and were ignored, e.g. {ignored[:3]}")
    present = {c.id: c for c in clips}
    ids = sorted(present)

    if args.train_list:
        train_all = _list(args.train_list, "--train_list")
        test = _list(args.test_list, "--test_list")
        both = sorted(set(train_all) & set(test))
        if both:
            raise UsageError(f"{len(both)} clip(s) are in both --train_list and --test_list, e.g. {both[:3]}")
        for cid in train_all + test:
            if cid not in present and cid not in missing:
                missing[cid] = "listed, but neither its .flv nor its .wav exists"
        train_all = [c for c in train_all if c in present]
        test = [c for c in test if c in present]
        unlisted = len(set(ids) - set(train_all) - set(test))
        if unlisted:
            notes.append(f"{unlisted} clip(s) are in neither list and are left out of the 'clip' split")
        how = "train/test from the given OGM-GE lists; val drawn from train with the test set's per-class counts"
    else:
        test, train_all = stratified_fraction(ids, labels, args.test_fraction, (args.seed, 0))
        how = (f"test drawn per class ({args.test_fraction:g}, seed {args.seed}); val drawn from train with the "
               f"test set's per-class counts")
    val, train = take_per_class(train_all, labels, class_counts(test, labels), (args.seed, 1))

    n_actors = len(set(actor.values()))
    n_held = max(1, int(math.floor(n_actors * args.test_fraction + 0.5)))
    splits = {"clip": {"train": train, "val": val, "test": test}}
    notes_split = {"clip": how}
    if n_actors >= 2 * n_held + 1:
        a_test, a_val, a_train = partition_by_key(ids, actor, n_held, n_held, (args.seed, 2))
        splits["actor"] = {"train": a_train, "val": a_val, "test": a_test}
        notes_split["actor"] = (f"actors: {n_held} for test, {n_held} for val, {n_actors - 2 * n_held} for "
                                f"train (seed {args.seed})")
    else:
        notes.append(f"the 'actor' split needs at least {2 * n_held + 1} actors, found {n_actors}: not written")
    return Collected(classes=list(EMOTIONS), clips=clips, splits=splits, split_notes=notes_split,
                     missing=missing, notes=notes)


register_preparer(Preparer(
    name=NAME,
    description="CREMA-D from VideoFlash/*.flv and AudioWAV/*.wav",
    add_args=add_prepare_args,
    collect=collect,
    audio=True,
    flow=False,
    short_side=0,
))
