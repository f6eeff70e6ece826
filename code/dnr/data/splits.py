"""Split making (stratified, seeded) and the split files, shared by the preparation tool and the
loaders.

A drawn split must not move a clip when other clips come and go (a file missing from a partial
download, then downloaded and prepared by a second run), so every draw here depends either on the
clip alone or on a list that does not change with the files on disk:

  hash_bands        a clip's split from a seeded hash of its id alone (`unit_hash`): per class the
                    shares match the fractions in expectation (binomially: about 127 +- 11 test
                    clips of CREMA-D's ~1,270 per class at 10%), not exactly;
  numbered_blocks   for numbered keys (CREMA-D's actors 1001-1091): one key of every block of
                    consecutive numbers per held-out split, chosen by the hash; exact to one key;
  take_per_class,   an exact stratified draw from a *listed* set (a published list, with the
  stratified_fraction, stratified_count, partition_by_key   clips whose files are missing still in it); callers
                    pass the full list and drop the missing clips afterwards.

A split file is a CSV with the header `clip,label` and one clip per row, sorted by clip id. The
published lists (`read_list`) may carry a header row, a byte-order mark and CRLF line ends.
"""
from __future__ import annotations

import csv
import hashlib
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


def stratified_count(ids: Sequence[str], labels: Mapping[str, str], count: int,
                     seed) -> Tuple[List[str], List[str]]:
    """-> (held out: `count` clips in all, each class's share of them by largest remainder, at most
    all but one clip of a class; rest). MMBT's and QMF's Food-101 dev sets are 5,000 drawn this way."""
    groups = by_class(ids, labels)
    total = sum(len(m) for m in groups.values())
    room = {c: max(len(m) - 1, 0) for c, m in groups.items()}
    if not 0 < count <= sum(room.values()):
        raise ValueError(f"cannot hold out {count} of {total} clips and keep one of each of the "
                         f"{len(groups)} classes")
    exact = {c: count * len(m) / total for c, m in groups.items()}
    counts = {c: min(int(exact[c]), room[c]) for c in groups}
    # Hand out the rest by the largest remainders (ties by class name), within each class's room.
    for c in sorted(groups, key=lambda c: (-(exact[c] - int(exact[c])), c)) * 2:
        if sum(counts.values()) == count:
            break
        if counts[c] < room[c]:
            counts[c] += 1
    while sum(counts.values()) < count:  # rare: the remainders could not place it all
        c = max((c for c in groups if counts[c] < room[c]), key=lambda c: (room[c] - counts[c], c))
        counts[c] += 1
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


def unit_hash(seed, salt: str, key: str) -> float:
    """A number in [0, 1) that depends on (seed, salt, key) only: the first 8 bytes of a SHA-256,
    so it is the same on every machine and Python version (Python's own hash() is salted)."""
    digest = hashlib.sha256(f"{seed}\x1f{salt}\x1f{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def hash_bands(ids: Iterable[str], bounds: Sequence[float], seed, salt: str) -> List[List[str]]:
    """Cut [0, 1) at the increasing `bounds` and put every clip in the band of its unit_hash ->
    len(bounds) + 1 sorted lists. Band i holds a share bounds[i] - bounds[i - 1] of each class in
    expectation; a clip's band never depends on the other clips."""
    if list(bounds) != sorted(bounds) or not all(0.0 <= b <= 1.0 for b in bounds):
        raise ValueError(f"band bounds must increase within [0, 1], got {list(bounds)}")
    out: List[List[str]] = [[] for _ in range(len(bounds) + 1)]
    for i in sorted(ids):
        u = unit_hash(seed, salt, i)
        out[sum(1 for b in bounds if u >= b)].append(i)
    return out


def numbered_blocks(keys: Iterable[str], block: int, seed, salt: str) -> Dict[str, int]:
    """For keys that are integers (actor ids): cut the integers into blocks of `block` consecutive
    numbers ((n - 1) // block, so 1001-1010 is one block of 10) and rank the numbers of each block,
    present or not, by their unit_hash -> {key: its rank in its block}. Taking rank 0 for one split
    and rank 1 for another holds out one key in every `block` consecutive numbers, exactly, and a
    key's rank never depends on which other keys are present."""
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    ranks = {}
    for k in keys:
        if not str(k).isdigit():
            raise ValueError(f"numbered_blocks needs integer keys, got {k!r}")
        n = int(k)
        first = (n - 1) // block * block + 1
        order = sorted(range(first, first + block), key=lambda m: unit_hash(seed, salt, str(m)))
        ranks[k] = order.index(n)
    return ranks


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------

# Column names that mark the first row of a list as a header (the D&R authors' CREMA-D lists start
# with `name,label`); no dataset here has a clip or a class of these names.
HEADER_FIELDS = frozenset({"name", "clip", "clip_id", "id", "youtube_id", "video", "file", "filename", "path",
                           "label", "labels", "class", "class_name", "category", "emotion"})


def list_lines(path: Path) -> List[Tuple[int, str]]:
    """The non-empty lines of a text list -> [(line number, stripped line)]: a UTF-8 byte-order
    mark, CRLF or CR line ends and surrounding blanks are accepted."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"list file {path} does not exist")
    text = path.read_bytes().decode("utf-8-sig")
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def is_header(fields: Sequence[str]) -> bool:
    return bool(fields) and (fields[0].lower() in HEADER_FIELDS or fields[-1].lower() in HEADER_FIELDS)


def read_list(path: Path) -> List[Tuple[str, str]]:
    """A published clip list: rows `clip,LABEL` (OGM-GE's and the D&R authors' CREMA-D lists) or
    `name,10,label` (OGM-GE's Kinetics-Sounds lists); the first field is the clip, the last the
    label; a first row naming columns (`name,label`) is skipped -> [(clip, label)], in file order."""
    rows = []
    for k, (n, line) in enumerate(list_lines(path)):
        fields = [f.strip().strip('"') for f in line.split(",")]
        if k == 0 and is_header(fields):
            continue
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
