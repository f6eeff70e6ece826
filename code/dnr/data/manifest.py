"""The layout of a prepared dataset folder and its manifest: written by `prepare.py`, read and
checked by the loaders. One definition for both sides, so they cannot drift apart.

    <out>/manifest.json                    dataset, classes, parameters, clips, failures, versions
    <out>/frames/<clip>/frame_0000.jpg     RGB frames (fps of the manifest)
    <out>/flow/<clip>/u_0000.jpg, v_0000.jpg   optical flow per frame (UCF-101)
    <out>/audio_<recipe>/<clip>.npy        audio features, recipe 'fbank' or 'stft'
    <out>/splits/<scheme>/{train,val,test}.csv
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional

FORMAT = 1
MANIFEST = "manifest.json"
FRAMES_DIR = "frames"
FLOW_DIR = "flow"
SPLITS_DIR = "splits"
CLIP_ID = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_.\-]*$")  # used as a file name: no separators


def frame_name(k: int) -> str:
    return f"frame_{k:04d}.jpg"


def flow_names(k: int):
    return f"u_{k:04d}.jpg", f"v_{k:04d}.jpg"


def audio_dir(recipe: str) -> str:
    return f"audio_{recipe}"


def split_path(root: Path, scheme: str, split: str) -> Path:
    return Path(root) / SPLITS_DIR / scheme / f"{split}.csv"


def check_clip_id(clip: str, where: str) -> None:
    if not CLIP_ID.match(clip) or clip in (".", ".."):
        raise ValueError(f"{where}: clip name {clip!r} cannot be used as a file name (letters, digits, "
                         f"'_', '-', '.' only)")


def write_bytes_if_changed(path: Path, data: bytes) -> bool:
    """Write atomically (temporary file + rename), and only when the content differs, so that a
    second identical run leaves every file as it was. -> whether the file was written."""
    path = Path(path)
    if path.is_file() and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return True


def write_text_if_changed(path: Path, text: str) -> bool:
    return write_bytes_if_changed(path, text.encode("utf-8"))


def manifest_text(manifest: dict) -> str:
    return json.dumps(manifest, indent=1, sort_keys=True) + "\n"


def read_manifest(root: Path, dataset: Optional[str] = None) -> dict:
    """The manifest of a prepared folder, checked for the fields the loaders use."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: --data_path must be a folder written by "
                                f"'python script/prepare.py {dataset or '<dataset>'} ... --out FOLDER'")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); rerun the preparation into that folder") from None
    if m.get("format") != FORMAT:
        raise ValueError(f"{path}: manifest format {m.get('format')!r}, this code reads format {FORMAT}; "
                         f"prepare the dataset again with this version")
    if dataset is not None and m.get("dataset") != dataset:
        raise ValueError(f"{path} describes dataset {m.get('dataset')!r}, not {dataset!r}: "
                         f"check --dataset and --data_path")
    classes = m.get("classes")
    if not isinstance(classes, list) or len(classes) < 2 or len(set(classes)) != len(classes):
        raise ValueError(f"{path}: 'classes' must list at least two distinct class names, got {classes!r}")
    for key in ("clips", "frames", "audio"):
        if key not in m:
            raise ValueError(f"{path}: the manifest has no {key!r} entry")
    for clip, entry in m["clips"].items():
        if entry.get("label") not in classes:
            raise ValueError(f"{path}: clip {clip!r} has label {entry.get('label')!r}, not one of the "
                             f"manifest's classes")
        if not isinstance(entry.get("frames"), int) or entry["frames"] < 1:
            raise ValueError(f"{path}: clip {clip!r} has frames={entry.get('frames')!r}, expected a "
                             f"count >= 1")
    return m
