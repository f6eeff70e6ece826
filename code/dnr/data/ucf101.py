"""UCF-101: 13,320 YouTube clips of 101 actions; RGB frames and optical flow as two modalities.

Raw input (as distributed): the .avi videos under --root (UCF-101/<Class>/v_<Class>_gGG_cCC.avi)
and the official split files in --splits_dir (ucfTrainTestlist/: classInd.txt,
trainlist0N.txt, testlist0N.txt). Each list path is taken relative to --root exactly as written
(note the official HandstandPushups/v_HandStandPushups_... spelling).

Split schemes: one per official fold present (1, 2, 3), `--ucf101_split`. Clips of one group
(gGG) are cut from the same long video, and the official folds keep groups apart; val keeps
that: it is every training clip of `--val_groups` groups drawn from the fold's training groups
(seeded), so no group is in both train and val, and every class loses the same share. The groups
are drawn from the fold's training *list*, so a missing video moves no clip between splits.
The list files may have CRLF line ends and a byte-order mark.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from .clips import FLOW, RGB, PreparedDataset, register_prepared
from .prepare import Collected, RawClip, UsageError
from .splits import list_lines, partition_by_key

NAME = "ucf101"
FOLDS = ("1", "2", "3")
GROUP = re.compile(r"_g(\d+)_c(\d+)$")


def add_prepare_args(group) -> None:
    group.add_argument("--splits_dir", required=True,
                       help="folder of the official split files: classInd.txt, trainlist0N.txt, testlist0N.txt")
    group.add_argument("--val_groups", type=int, default=3,
                       help="groups (gGG) of each fold's training clips held out for val (default: 3)")


def _read_class_index(path: Path) -> list:
    if not path.is_file():
        raise UsageError(f"--splits_dir: {path} does not exist (UCF-101's classInd.txt)")
    classes = []
    for n, line in list_lines(path):
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit() or int(parts[0]) != len(classes) + 1:
            raise UsageError(f"{path}:{n}: expected '{len(classes) + 1} ClassName', got {line.strip()!r}")
        classes.append(parts[1])
    if len(classes) < 2:
        raise UsageError(f"{path}: fewer than two classes")
    return classes


def _read_list(path: Path, classes: list) -> list:
    """-> [(relative path, label)] of trainlist0N.txt ('Class/v_..avi N') or testlist0N.txt."""
    rows = []
    for n, line in list_lines(path):
        parts = line.split()
        rel = parts[0].replace("\\", "/")
        folder = rel.split("/")[0]
        if "/" not in rel or folder not in classes:
            raise UsageError(f"{path}:{n}: expected 'ClassName/v_ClassName_gGG_cCC.avi', got {line.strip()!r}")
        if len(parts) > 1 and not (parts[1].isdigit() and 1 <= int(parts[1]) <= len(classes)
                                   and classes[int(parts[1]) - 1] == folder):
            raise UsageError(f"{path}:{n}: class index {parts[1]} does not name folder {folder!r} in classInd.txt")
        rows.append((rel, folder))
    return rows


def collect(args: argparse.Namespace) -> Collected:
    root, lists = Path(args.root), Path(args.splits_dir)
    if not lists.is_dir():
        raise UsageError(f"--splits_dir {lists}: not a folder")
    if args.val_groups < 1:
        raise UsageError(f"--val_groups must be >= 1, got {args.val_groups}")
    classes = _read_class_index(lists / "classInd.txt")
    folds = [f for f in FOLDS if (lists / f"trainlist0{f}.txt").is_file() and (lists / f"testlist0{f}.txt").is_file()]
    if not folds:
        raise UsageError(f"--splits_dir {lists}: no trainlist0N.txt with its testlist0N.txt")
    entries, per_fold = {}, {}
    for f in folds:
        per_fold[f] = {}
        for part in ("train", "test"):
            path = lists / f"{part}list0{f}.txt"
            ids = []
            for rel, label in _read_list(path, classes):
                cid = Path(rel).stem
                if not GROUP.search(cid):
                    raise UsageError(f"{path}: {rel} does not end in _gGG_cCC: cannot tell its group")
                if cid in entries and entries[cid] != (rel, label):
                    raise UsageError(f"{path}: {cid} is listed as {rel} ({label}) and as {entries[cid]}")
                entries[cid] = (rel, label)
                ids.append(cid)
            per_fold[f][part] = ids
    missing = {cid: f"no file {rel} under --root" for cid, (rel, _) in entries.items() if not (root / rel).is_file()}
    clips = [RawClip(id=cid, label=label, video=root / rel, source={"video": rel},
                     meta={"group": GROUP.search(cid).group(1)})
             for cid, (rel, label) in sorted(entries.items()) if cid not in missing]
    group = {cid: GROUP.search(cid).group(1) for cid in entries}
    present = {c.id for c in clips}
    splits, notes = {}, {}
    for f in folds:
        # Groups drawn from the whole training list, missing videos included: a missing file moves no clip.
        try:
            val, _, train = partition_by_key(sorted(set(per_fold[f]["train"])), group, args.val_groups, 0,
                                             (args.seed, int(f)))
        except ValueError as err:
            raise UsageError(f"fold {f}: {err}") from None
        splits[f] = {"train": [c for c in train if c in present], "val": [c for c in val if c in present],
                     "test": sorted(c for c in set(per_fold[f]["test"]) if c in present)}
        held = sorted({group[c] for c in val})
        notes[f] = f"official fold {f}; val = the training clips of groups {held} (seed {args.seed})"
    return Collected(classes=classes, clips=clips, splits=splits, split_notes=notes, missing=missing)


register_prepared(PreparedDataset(
    name=NAME,
    title="UCF-101",
    description="UCF-101: RGB frames + optical flow, 101 actions",
    modalities=(("rgb", RGB), ("flow", FLOW)),
    frames=3,
    schemes=FOLDS,
    scheme_help="the official fold",
    raw="UCF-101 from the .avi videos and the official split files (RGB frames + optical flow)",
    add_prepare_args=add_prepare_args,
    collect=collect,
))
