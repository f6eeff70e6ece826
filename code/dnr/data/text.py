"""Word tokens for short texts (Food-101's page titles), with no download: a vocabulary built by the
preparation tool from the training split's texts, and the encoding the loader applies with it.

  tokenize  lowercase; web addresses removed (BalanceBenchmark's cleaning drops URLs too); words
            are the runs of letters and digits (Unicode-aware regex \\w+, underscores split off).
  vocabulary  ids 0 = padding, 1 = unknown word, then every word seen at least `min_count` times
            in the training texts, most frequent first (ties alphabetical), at most `max_size` ids.
  encode    the first `length` words as ids (unknown words 1), zero-padded to `length`: (length,).

The vocabulary is a text file, one word per line, the line number (from 0) its id. Nothing here
imports torch: the preparation tool runs it.
"""
from __future__ import annotations

import hashlib
import re
from collections import Counter
from typing import Dict, Iterable, List, Sequence

PAD, UNK = "<pad>", "<unk>"
URL = re.compile(r"(https?://|www\.)\S+", re.IGNORECASE)
WORD = re.compile(r"[^\W_]+")

TOKENIZER = ("lowercase; web addresses removed; words = runs of letters and digits; ids: 0 padding, 1 "
             "unknown, then the training texts' words seen >= min_count times, most frequent first")


def tokenize(text: str) -> List[str]:
    return WORD.findall(URL.sub(" ", text.lower()))


def build_vocabulary(texts: Iterable[str], min_count: int = 2, max_size: int = 30000) -> List[str]:
    if min_count < 1 or max_size < 3:
        raise ValueError(f"min_count must be >= 1 and max_size >= 3, got {min_count} and {max_size}")
    counts = Counter(w for t in texts for w in tokenize(t))
    words = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
    return [PAD, UNK] + words[: max_size - 2]


def vocabulary_text(words: Sequence[str]) -> str:
    return "".join(f"{w}\n" for w in words)


def read_vocabulary(text: str) -> List[str]:
    words = text.split("\n")
    if words and words[-1] == "":
        words.pop()
    if words[:2] != [PAD, UNK] or len(set(words)) != len(words):
        raise ValueError(f"expected '{PAD}' and '{UNK}' on the first two lines and each word once")
    return words


def digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def encode(text: str, index: Dict[str, int], length: int) -> List[int]:
    ids = [index.get(w, 1) for w in tokenize(text)[:length]]
    return ids + [0] * (length - len(ids))
