"""Split making (stratified, seeded) and the split files, shared by the preparation tool and the
loaders.

Every draw starts from the clip ids sorted, so a split depends only on the clips, the labels,
the fraction and the seed. A split file is a CSV with the header `clip,label` and one clip per
row, sorted by clip id.
"""
from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Sequence, Tuple

import numpy as np

SPLITS = ("train", "val", "test")
HEADER = ("clip", "label")


def by_class(ids: Iterable[str], labels: Mapping[str, str]) -> Dict[str, List[str]]:
    groups: Dict[str, List[str]] = defaultdict(list)
    for i in sorted(ids):
        groups[labels[i]].append(i)
    return dict(sorted(groups.items()))


def fraction_count(n: int, fraction: float) -> int:
    """round(n * fraction), but at least one and at most n - 1 when the class has two or more
    clips and the fraction is positive, so that every class appears on both sides."""
    if fraction <= 0 or n < 2:
        return 0
    return max(1, min(n - 1, int(math.floor(n * fraction + 0.5))))


def take_per_class(ids: Iterable[str], labels: Mapping[str, str], counts: Mapping[str, int],
                   seed) -> Tuple[List[str], List[str]]:
    """Draw counts[c] clips of each class c at random (seeded) -> (taken, rest), both sorted."""
    rng = np.random.default_rng(seed)
    taken: List[str] = []
    for label, members in by_class(ids, labels).items():
        k = counts.get(label, 0)
        if k > len(members):
            raise ValueError(f"class {label!r} has {len(members)} clips, cannot take {k}")
        order = rng.permutation(len(members))
        taken.extend(members[j] for j in order[:k])
    chosen = set(taken)
    return sorted(taken), sorted(i for i in ids if i not in chosen)


def stratified_fraction(ids: Sequence[str], labels: Mapping[str, str], fraction: float,
                        seed) -> Tuple[List[str], List[str]]:
    """-> (held out: fraction_count(n_c, fraction) clips of each class c, rest)."""
    counts = {c: fraction_count(len(m), fraction) for c, m in by_class(ids, labels).items()}
    return take_per_class(ids, labels, counts, seed)


def class_counts(ids: Iterable[str], labels: Mapping[str, str]) -> Dict[str, int]:
    return {c: len(m) for c, m in by_class(ids, labels).items()}


def partition_by_key(ids: Sequence[str], key: Mapping[str, str], n_first: int, n_second: int,
                     seed) -> Tuple[List[str], List[str], List[str]]:
    """Shuffle the distinct keys (actors, groups) with the seed; the clips of the first n_first
    keys, of the next n_second keys, and of the rest -> three disjoint lists of clips."""
    keys = sorted({key[i] for i in ids})
    if n_first + n_second >= len(keys):
        raise ValueError(f"{len(keys)} distinct keys, cannot hold out {n_first} + {n_second} of them "
                         f"and keep one for training")
    order = [keys[j] for j in np.random.default_rng(seed).permutation(len(keys))]
    first, second = set(order[:n_first]), set(order[n_first:n_first + n_second])
    a = sorted(i for i in ids if key[i] in first)
    b = sorted(i for i in ids if key[i] in second)
    rest = sorted(i for i in ids if key[i] not in first and key[i] not in second)
    return a, b, rest


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------

def read_ogm_list(path: Path) -> List[Tuple[str, str]]:
    """An OGM-GE list: rows `clip,LABEL` (CREMA-D) or `name,10,label` (Kinetics-Sounds): the
    first field is the clip, the last the label -> [(clip, label)], in file order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"list file {path} does not exist")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) < 2 or not fields[0] or not fields[-1]:
            raise ValueError(f"{path}:{n}: expected 'clip,label' or 'name,N,label', got {line!r}")
        rows.append((fields[0], fields[-1]))
    if not rows:
        raise ValueError(f"list file {path} has no rows")
    return rows


def split_csv_text(ids: Iterable[str], labels: Mapping[str, str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(HEADER)
    for i in sorted(ids):
        w.writerow((i, labels[i]))
    return buf.getvalue()


def read_split_csv(path: Path) -> List[Tuple[str, str]]:
    """A split file written by the preparation tool -> [(clip, label)]."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file {path} does not exist (written by script/prepare.py)")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows or tuple(rows[0]) != HEADER:
        raise ValueError(f"{path}: expected the header {','.join(HEADER)!r}, got {rows[0] if rows else 'nothing'}")
    out = []
    for n, row in enumerate(rows[1:], 2):
        if len(row) != 2 or not row[0] or not row[1]:
            raise ValueError(f"{path}:{n}: expected 'clip,label', got {row}")
        out.append((row[0], row[1]))
    return out
