"""The packed frame cache of a prepared folder: every stored frame decoded once into one uint8 array
on disk, read through a memory map, so that a training sample costs a memory copy instead of JPEG
decodes (the trainer's `--frame_cache cpu|gpu`).

    python script/prepare.py pack --data_path data/cremad [--height H --width W] [--workers N]

writes, inside the prepared folder:

    cache/frames_<H>x<W>.u8     raw uint8, shape (total frames, H, W, 3) RGB, C order (np.memmap)
    cache/frames_<H>x<W>.json   the layout, per clip [offset, count], the source parameters and digests
    cache/flow_<H>x<W>.u8/.json the same for optical flow, 2 channels (u, v), when the folder has flow

Clips are packed in sorted order, the frames of a clip one after the other, so frame k of clip c
is row `offset[c] + k`. Size: by default the stored frames' size when every clip has the same
(CREMA-D: 360 x 480), otherwise the most common stored size scaled so its shorter side is 256
pixels (never scaled up); frames of another size, and of another aspect, are resized to it with
Pillow's antialiased bilinear filter (the aspect of those is not kept). Values then differ slightly
from the JPEG path wherever a frame is resized twice (here and by the crop).

The files are written under temporary names and renamed into place at the end (the description
last), so an interrupted pack leaves no cache that looks complete; a second run with the same
settings finds the cache up to date and changes nothing. The loader checks the description
against the folder's manifest (frame settings, clips and their frame counts), the data file's
size and a digest of sampled frames, and refuses a stale or partial cache, naming the file and the
command that rebuilds it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .manifest import FLOW_DIR, FRAMES_DIR, flow_names, frame_name, read_manifest, write_text_if_changed

CACHE_DIR = "cache"
FORMAT = 1
KINDS = {"frames": 3, "flow": 2}  # kind -> channels (RGB; u, v)
DEFAULT_SHORT_SIDE = 256
SAMPLED_FRAMES = 64  # frames hashed into the digest that the loader re-checks


def cache_names(kind: str, height: int, width: int) -> Tuple[str, str]:
    """-> (data file, description file), relative to the prepared folder."""
    stem = f"{CACHE_DIR}/{kind}_{height}x{width}"
    return f"{stem}.u8", f"{stem}.json"


def pack_command(root: Path) -> str:
    return f"python script/prepare.py pack --data_path {root}"


def clips_digest(manifest: dict) -> str:
    """What the cache was made from: every clip and its number of stored frames."""
    text = "".join(f"{c}:{manifest['clips'][c]['frames']}\n" for c in sorted(manifest["clips"]))
    return hashlib.sha256(text.encode()).hexdigest()


def source_of(manifest: dict, kind: str) -> dict:
    return {"dataset": manifest["dataset"], "settings": manifest["frames" if kind == "frames" else "flow"],
            "clips_digest": clips_digest(manifest)}


def sampled_digest(data: np.ndarray) -> str:
    """sha256 of up to SAMPLED_FRAMES frames spread over the array (the first and last included):
    cheap enough to re-check on every start-up, and it catches a data file from another pack."""
    n = data.shape[0]
    rows = np.unique(np.linspace(0, n - 1, min(n, SAMPLED_FRAMES)).round().astype(np.int64))
    h = hashlib.sha256()
    for r in rows:
        h.update(np.ascontiguousarray(data[r]).tobytes())
    return h.hexdigest()


def _stored_size(root: Path, clip: str) -> Tuple[int, int]:
    from PIL import Image

    with Image.open(root / FRAMES_DIR / clip / frame_name(0)) as im:  # reads the header only
        return im.height, im.width


def default_size(root: Path, manifest: dict) -> Tuple[int, int]:
    """The stored size when all clips share one; else the most common stored size with its shorter
    side scaled to 256 pixels (or kept, when shorter)."""
    sizes = Counter(_stored_size(root, c) for c in sorted(manifest["clips"]))
    if len(sizes) == 1:
        return next(iter(sizes))
    (h, w), _ = sizes.most_common(1)[0]
    scale = min(1.0, DEFAULT_SHORT_SIDE / min(h, w))
    return max(1, int(round(h * scale))), max(1, int(round(w * scale)))


def _layout(manifest: dict) -> Tuple[Dict[str, List[int]], int]:
    offsets, total = {}, 0
    for clip in sorted(manifest["clips"]):
        n = int(manifest["clips"][clip]["frames"])
        offsets[clip] = [total, n]
        total += n
    return offsets, total


def _read_picture(paths: Sequence[Path], height: int, width: int) -> np.ndarray:
    """One stored frame -> (H, W, C) uint8: an RGB JPEG, or the u and v JPEGs of a flow frame."""
    from PIL import Image

    planes = []
    for p in paths:
        with Image.open(p) as im:
            im = im.convert("RGB" if len(paths) == 1 else "L")
            if im.size != (width, height):
                im = im.resize((width, height), Image.BILINEAR)  # antialiased when shrinking
            planes.append(np.asarray(im))
    return planes[0] if len(planes) == 1 else np.stack(planes, axis=-1)


def _sources(root: Path, kind: str, clip: str, k: int) -> List[Path]:
    if kind == "frames":
        return [root / FRAMES_DIR / clip / frame_name(k)]
    return [root / FLOW_DIR / clip / name for name in flow_names(k)]


def _fill_clip(data: np.ndarray, root: Path, kind: str, offsets: Dict[str, List[int]], height: int, width: int,
               clip: str) -> None:
    start, count = offsets[clip]
    for k in range(count):
        data[start + k] = _read_picture(_sources(root, kind, clip, k), height, width)


def _is_current(root: Path, kind: str, height: int, width: int, description: dict) -> bool:
    data_name, json_name = cache_names(kind, height, width)
    try:
        old = json.loads((root / json_name).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    want = {k: v for k, v in description.items() if k != "sampled_digest"}
    if {k: v for k, v in old.items() if k != "sampled_digest"} != want:
        return False
    path = root / data_name
    if not path.is_file() or path.stat().st_size != description["bytes"]:
        return False
    data = np.memmap(path, dtype=np.uint8, mode="r", shape=tuple(description["shape"]))
    return sampled_digest(data) == old.get("sampled_digest")


def pack_kind(root: Path, manifest: dict, kind: str, height: int, width: int, workers: int,
              progress: bool) -> Tuple[Path, bool]:
    """Pack one kind (frames or flow) -> (data file, whether it was written)."""
    channels = KINDS[kind]
    offsets, total = _layout(manifest)
    shape = [total, height, width, channels]
    data_name, json_name = cache_names(kind, height, width)
    description = {
        "format": FORMAT, "kind": kind, "data": Path(data_name).name, "dtype": "uint8",
        "shape": shape, "layout": "(frames, height, width, channels), C order; clip c, stored frame k: "
                                  "row offset[c] + k",
        "channels": "RGB" if kind == "frames" else "u, v (8-bit flow as stored)",
        "bytes": int(np.prod(shape)),
        "resize": "Pillow bilinear (antialiased) to height x width when the stored size differs; aspect not kept",
        "source": source_of(manifest, kind),
        "clips": offsets,
    }
    if _is_current(root, kind, height, width, description):
        return root / data_name, False

    (root / CACHE_DIR).mkdir(exist_ok=True)
    free = shutil.disk_usage(root / CACHE_DIR).free
    if description["bytes"] > free:
        raise OSError(f"{root / data_name} needs {description['bytes'] / 1e9:.2f} GB, {root / CACHE_DIR} has "
                      f"{free / 1e9:.2f} GB free; free space or pack smaller frames (--height/--width)")
    tmp = root / CACHE_DIR / f".{Path(data_name).name}.{os.getpid()}.tmp"
    try:
        from tqdm import tqdm

        data = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=tuple(shape))
        fill = partial(_fill_clip, data, root, kind, offsets, height, width)
        clips = sorted(offsets)
        with ThreadPoolExecutor(max(1, workers)) as ex:  # Pillow decodes and resizes without the GIL
            for _ in tqdm(ex.map(fill, clips), total=len(clips), disable=not progress, unit="clip",
                          desc=f"pack {kind}", file=sys.stderr):
                pass
        data.flush()
        description["sampled_digest"] = sampled_digest(data)
        data = None  # closes the memory map before the rename
        # Commit: the old description goes first, so no description ever points at a half-written file.
        (root / json_name).unlink(missing_ok=True)
        os.replace(tmp, root / data_name)
        write_text_if_changed(root / json_name, json.dumps(description, indent=1, sort_keys=True) + "\n")
    finally:
        tmp.unlink(missing_ok=True)
    return root / data_name, True


def pack(root: Path, height: int = 0, width: int = 0, workers: int = 1, progress: bool = False) -> List[str]:
    """Pack a prepared folder's frames (and flow, when present) -> printable lines of what was done.
    height = width = 0: the default size (module docstring)."""
    root = Path(root)
    manifest = read_manifest(root)
    if (height > 0) != (width > 0):
        raise ValueError(f"--height and --width go together: give both or neither (got {height} and {width})")
    if height < 0 or width < 0:
        raise ValueError(f"--height and --width must be > 0, got {height} and {width}")
    if not manifest["clips"]:
        raise ValueError(f"{root}: the manifest lists no prepared clip; nothing to pack")
    if height == 0:
        height, width = default_size(root, manifest)
    kinds = ["frames"] + (["flow"] if manifest.get("flow") else [])
    lines = []
    for kind in kinds:
        path, written = pack_kind(root, manifest, kind, height, width, workers, progress)
        n = _layout(manifest)[1]
        lines.append(f"{kind} cache {'written' if written else 'unchanged (up to date)'}: {path} "
                     f"({n} frames of {height} x {width} x {KINDS[kind]}, {path.stat().st_size / 1e9:.2f} GB)")
    return lines


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------

class FrameCache:
    """Read access to one packed kind. The memory map is opened lazily in each process (and not
    pickled: DataLoader workers that spawn open their own)."""

    def __init__(self, path: Path, shape: Tuple[int, ...], offsets: Dict[str, List[int]]):
        self.path, self.shape, self.offsets = Path(path), tuple(shape), offsets
        self._data: Optional[np.memmap] = None

    @property
    def data(self) -> np.memmap:
        if self._data is None:
            self._data = np.memmap(self.path, dtype=np.uint8, mode="r", shape=self.shape)
        return self._data

    @property
    def size(self) -> Tuple[int, int]:
        return self.shape[1], self.shape[2]

    def frames(self, clip: str, picks: Sequence[int]) -> np.ndarray:
        """Stored frames `picks` of `clip` -> (T, H, W, C) uint8 (a copy)."""
        start, count = self.offsets[clip]
        rows = [start + k for k in picks]
        if max(picks) >= count:
            raise IndexError(f"{self.path}: clip {clip!r} has {count} packed frames, asked for frame {max(picks)}")
        return np.asarray(self.data[rows])  # fancy indexing copies

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_data"] = None
        return state


def _stale(root: Path, json_path: Path, why: str) -> ValueError:
    return ValueError(f"{json_path}: the packed frame cache is stale or incomplete ({why}); rebuild it with "
                      f"'{pack_command(root)}' (same --height/--width), or train with --frame_cache off")


def find_size(root: Path) -> Tuple[int, int]:
    """The size of the one frames cache in the folder."""
    folder = Path(root) / CACHE_DIR
    found = sorted(folder.glob("frames_*x*.json")) if folder.is_dir() else []
    if not found:
        raise FileNotFoundError(f"{folder}: no packed frame cache (frames_<H>x<W>.json); build it with "
                                f"'{pack_command(root)}', or train with --frame_cache off")
    if len(found) > 1:
        raise ValueError(f"{folder} holds several frame caches ({', '.join(p.name for p in found)}); the "
                         f"loader reads one: delete the others (both .u8 and .json)")
    h, w = found[0].stem.split("_", 1)[1].split("x")
    return int(h), int(w)


def open_cache(root: Path, manifest: dict, kind: str, size: Tuple[int, int]) -> FrameCache:
    """The checked cache of `kind` at `size`; raises naming the file and the command that rebuilds it."""
    root = Path(root)
    data_name, json_name = cache_names(kind, *size)
    json_path = root / json_name
    if not json_path.is_file():
        raise FileNotFoundError(f"{json_path} does not exist: the folder has no packed {kind} cache of "
                                f"{size[0]} x {size[1]}; build it with '{pack_command(root)}', or train "
                                f"with --frame_cache off")
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise _stale(root, json_path, f"not valid JSON: {err}") from None
    if meta.get("format") != FORMAT or meta.get("kind") != kind:
        raise _stale(root, json_path, f"format {meta.get('format')!r} kind {meta.get('kind')!r}, this code reads "
                                      f"format {FORMAT} kind {kind!r}")
    shape = tuple(meta["shape"])
    if shape[1:] != (size[0], size[1], KINDS[kind]):
        raise _stale(root, json_path, f"it describes frames of shape {shape[1:]}")
    if meta.get("source") != source_of(manifest, kind):
        raise _stale(root, json_path, "the folder's manifest (its clips, frame counts or frame settings) "
                                      "changed after packing")
    data_path = root / data_name
    if not data_path.is_file():
        raise _stale(root, json_path, f"its data file {data_path} is missing")
    if data_path.stat().st_size != meta["bytes"]:
        raise _stale(root, json_path, f"{data_path} holds {data_path.stat().st_size} bytes, the description "
                                      f"says {meta['bytes']}")
    cache = FrameCache(data_path, shape, {c: list(v) for c, v in meta["clips"].items()})
    if sampled_digest(cache.data) != meta.get("sampled_digest"):
        raise _stale(root, json_path, f"the content of {data_path} does not match its description")
    return cache
