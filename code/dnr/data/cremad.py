"""CREMA-D: 7,442 clips of 91 actors speaking 12 sentences with 6 emotions; audio + face video.

Raw input (as distributed): <root>/VideoFlash/<clip>.flv and <root>/AudioWAV/<clip>.wav, clip names
ActorID_Sentence_Emotion_Level (`1001_DFA_ANG_XX` -> actor 1001, emotion ANG). The audio comes
from the WAV files, the frames from the videos.

Split schemes written by the preparation (`--cremad_split`):
  clip   the common split, by clip (an actor may appear in several splits):
         - `--train_list --val_list --test_list` (the D&R authors' my_train/val/test.csv): exactly
           those three; clips of --val_list are taken out of --train_list, so their train.csv
           (= my_train + val) gives the same;
         - `--train_list --test_list` (OGM-GE's lists): train/test from them, val drawn from the
           *listed* training clips with the listed test set's per-class counts, as the D&R authors
           did (6,698 -> 5,954 + 744); drawn from the lists, so a missing file moves no clip;
         - no lists: each clip's split from a seeded hash of its name alone (test if below
           --test_fraction, val if below twice that): a clip never changes split when other files
           come or go; per class the shares are the fraction in expectation (about 744 +- 26 test
           clips of 7,442 at 10%).
  actor  actor-disjoint: in every block of round(1 / --test_fraction) consecutive actor ids
         (1001-1010, 1011-1020, ... at 10%), one actor for test and one for val, chosen by a seeded
         hash; the rest train. Nine or ten actors each for test and val of CREMA-D's 91 at 10%;
         an actor's split depends on its id alone.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from .clips import AUDIO, RGB, PreparedDataset, register_prepared
from .prepare import Collected, RawClip, UsageError
from .splits import class_counts, hash_bands, numbered_blocks, read_list, take_per_class

NAME = "cremad"
EMOTIONS = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")  # the authors' class order (ids 0-5)
CLIP_NAME = re.compile(r"^(\d{4})_([A-Z]{3})_([A-Z]{3})_([A-Z]{2})$")


def add_prepare_args(group) -> None:
    group.add_argument("--train_list", default=None,
                       help="CREMA-D training list (rows 'clip_id,LABEL', a 'name,label' header allowed): "
                            "OGM-GE's train.csv, or the D&R authors' my_train.csv (or train.csv) with "
                            "--val_list; with --test_list it defines the 'clip' split (default: none, the "
                            "splits are drawn)")
    group.add_argument("--val_list", default=None,
                       help="CREMA-D validation list (the D&R authors' val.csv), with --train_list and "
                            "--test_list; its clips are taken out of the training list (default: none, val "
                            "is drawn from the training list)")
    group.add_argument("--test_list", default=None, help="CREMA-D test list (rows 'clip_id,LABEL')")
    group.add_argument("--test_fraction", type=float, default=0.1,
                       help="without lists: share of the clips drawn for test, and as many for val, in the "
                            "'clip' split; always: one actor in every round(1 / fraction) consecutive actor "
                            "ids for test, and one for val, in the 'actor' split (default: 0.1)")


def _list(path: str, flag: str) -> list:
    """The clips of a list, in file order, each once; labels checked against the clip names."""
    out, seen = [], set()
    for clip, label in read_list(Path(path)):
        match = CLIP_NAME.match(clip)
        if not match:
            raise UsageError(f"{flag} {path}: {clip!r} is not a CREMA-D clip name (ActorID_Sentence_Emotion_Level)")
        if label != match.group(3):
            raise UsageError(f"{flag} {path}: clip {clip} has label {label!r}, its name says {match.group(3)!r}")
        if clip not in seen:
            seen.add(clip)
            out.append(clip)
    return out


def _disjoint(a: list, b: list, flag_a: str, flag_b: str) -> None:
    both = sorted(set(a) & set(b))
    if both:
        raise UsageError(f"{len(both)} clip(s) are in both {flag_a} and {flag_b}, e.g. {both[:3]}")


def _clip_split(args, known: list, labels: dict):
    """-> ({train, val, test} over every known or listed clip, how it was made)."""
    if args.train_list:
        train = _list(args.train_list, "--train_list")
        test = _list(args.test_list, "--test_list")
        _disjoint(train, test, "--train_list", "--test_list")
        for c in train + test:
            labels.setdefault(c, CLIP_NAME.match(c).group(3))
        if args.val_list:
            val = _list(args.val_list, "--val_list")
            _disjoint(val, test, "--val_list", "--test_list")
            held = set(val)
            train = [c for c in train if c not in held]  # the authors' train.csv is my_train + val
            for c in val:
                labels.setdefault(c, CLIP_NAME.match(c).group(3))
            return {"train": train, "val": val, "test": test}, "train/val/test from the given lists"
        # Drawn from the full lists, missing files included, so that a missing file moves no clip.
        val, train = take_per_class(train, labels, class_counts(test, labels), (args.seed, 1))
        return ({"train": train, "val": val, "test": test},
                "train/test from the given lists; val drawn from the listed training clips with the test "
                f"list's per-class counts (seed {args.seed})")
    f = args.test_fraction
    test, val, train = hash_bands(known, [f, 2 * f], args.seed, "cremad clip")
    return ({"train": train, "val": val, "test": test},
            f"each clip by a seeded hash of its name (seed {args.seed}): test {f:g}, val {f:g} of each class "
            f"in expectation")


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
    if args.val_list and not args.train_list:
        raise UsageError("--val_list needs --train_list and --test_list")

    videos = {p.stem: p for p in vdir.iterdir() if p.suffix.lower() == ".flv"}
    wavs = {p.stem: p for p in adir.iterdir() if p.suffix.lower() == ".wav"}
    notes, ignored, known, labels = [], [], [], {}
    for cid in sorted(set(videos) | set(wavs)):
        match = CLIP_NAME.match(cid)
        if not match or match.group(3) not in EMOTIONS:
            ignored.append(cid)
            continue
        known.append(cid)
        labels[cid] = match.group(3)
    if ignored:
        notes.append(f"{len(ignored)} file name(s) are not CREMA-D clips (ActorID_Sentence_Emotion_Level with "
                     f"an emotion of {EMOTIONS}) and were ignored, e.g. {ignored[:3]}")

    splits_all, how = _clip_split(args, known, labels)
    wanted = sorted(set(known) | {c for part in splits_all.values() for c in part})
    clips, missing = [], {}
    for cid in wanted:
        if cid not in videos or cid not in wavs:
            missing[cid] = ("neither its .flv nor its .wav exists" if cid not in videos and cid not in wavs
                            else "no VideoFlash/<clip>.flv" if cid not in videos else "no AudioWAV/<clip>.wav")
            continue
        actor = CLIP_NAME.match(cid).group(1)
        clips.append(RawClip(id=cid, label=labels[cid], video=videos[cid], audio=wavs[cid],
                             source={"video": f"VideoFlash/{videos[cid].name}", "audio": f"AudioWAV/{wavs[cid].name}"},
                             meta={"actor": actor}))
    present = {c.id for c in clips}
    listed = {c for part in splits_all.values() for c in part}
    if args.train_list:
        unlisted = len(present - listed)
        if unlisted:
            notes.append(f"{unlisted} clip(s) are in none of the lists and are left out of the 'clip' split")
    splits = {"clip": {s: sorted(c for c in ids if c in present) for s, ids in splits_all.items()}}
    split_notes = {"clip": how}

    # Actor-disjoint: every known actor (missing files included) gets its split from its id alone.
    block = int(round(1.0 / args.test_fraction))
    actor_of = {c: CLIP_NAME.match(c).group(1) for c in wanted}
    if block >= 3:
        rank = numbered_blocks(sorted(set(actor_of.values())), block, args.seed, "cremad actor")
        parts = {"test": [], "val": [], "train": []}
        for c in sorted(present):
            r = rank[actor_of[c]]
            parts["test" if r == 0 else "val" if r == 1 else "train"].append(c)
        counts = {s: len({actor_of[c] for c in ids}) for s, ids in parts.items()}
        if all(counts.values()):
            splits["actor"] = parts
            split_notes["actor"] = (f"actors: one of every {block} consecutive ids for test, one for val (seed "
                                    f"{args.seed}): {counts['test']} test, {counts['val']} val, {counts['train']} "
                                    f"train actors")
        else:
            notes.append(f"the 'actor' split left {[s for s, n in counts.items() if not n]} without actors "
                         f"({len(set(actor_of.values()))} actors found): not written")
    else:
        notes.append(f"the 'actor' split needs --test_fraction <= 0.4 (one actor of every round(1 / fraction) "
                     f">= 3 for test, one for val), got {args.test_fraction}: not written")
    return Collected(classes=list(EMOTIONS), clips=clips, splits=splits, split_notes=split_notes,
                     missing=missing, notes=notes)


register_prepared(PreparedDataset(
    name=NAME,
    title="CREMA-D",
    description="CREMA-D: speech audio + face video, 6 emotions",
    modalities=(("audio", AUDIO), ("visual", RGB)),
    frames=2,
    schemes=("clip", "actor"),
    scheme_help="clip (the common split, val drawn from train as the D&R authors did) or actor (actor-disjoint)",
    raw="CREMA-D from VideoFlash/*.flv and AudioWAV/*.wav",
    add_prepare_args=add_prepare_args,
    collect=collect,
))
