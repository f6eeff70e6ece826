"""Checkpoints: one dict per file, written atomically, loaded with weights_only=True.

A training checkpoint (`last.pth`) holds everything a resumed run needs to continue exactly:
model, optimiser, scheduler, scaler, the epoch just finished, the arguments, RNG states, the
method's state (for D&R the init snapshot and the number of re-initialisations done) and the
model-selection state. Its keys are made and read in one place, `training_state` / `restore`
(as DINO's restart_from_checkpoint): an object with `state_dict()` is stored under its keyword,
anything else as it is.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch


def save_atomic(obj: Dict[str, Any], path) -> None:
    """Write to a temporary file in the same folder, flush it to disk, then rename over `path`.
    A kill at any moment leaves either the old file or the new one, never a truncated one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def load(path, map_location="cpu") -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # a truncated or foreign file: say which and why
        raise ValueError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}") from err


def rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_s = state["numpy"]
    np.random.set_state(("MT19937", np_s["key"].numpy().astype(np.uint32), np_s["pos"],
                         np_s["has_gauss"], np_s["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def training_state(epoch: int, **objects: Any) -> Dict[str, Any]:
    """{"epoch": epoch, "rng": every RNG state, key: obj.state_dict() or obj} for the keywords;
    None stays None (e.g. no gradient scaler)."""
    state: Dict[str, Any] = {"epoch": int(epoch), "rng": rng_state()}
    for key, obj in objects.items():
        state[key] = obj.state_dict() if hasattr(obj, "state_dict") else obj
    return state


def restore(saved: Dict[str, Any], run_variables: Optional[Dict[str, Any]] = None, **objects: Any) -> int:
    """Load `saved[key]` into every keyword object (None objects are skipped), copy the values of
    `run_variables`' keys out of `saved`, set the RNG states; returns the epoch to start from."""
    for key, obj in objects.items():
        if obj is None:
            continue
        if saved.get(key) is None:
            raise KeyError(f"the checkpoint holds no {key!r} state")
        obj.load_state_dict(saved[key])
    for key in run_variables or {}:
        if key in saved:
            run_variables[key] = saved[key]
    set_rng_state(saved["rng"])
    return int(saved["epoch"]) + 1


def find_checkpoint(arg: Optional[str], out: Path, name: str) -> Optional[Path]:
    """The file a --resume / --eval_only argument names: None -> None, "auto" -> out/name, a folder
    -> folder/name, else the path itself. Missing files are the caller's to report."""
    if arg is None:
        return None
    path = out / name if arg == "auto" else Path(arg)
    return path / name if path.is_dir() else path


def epoch_file(epoch: int) -> str:
    """The name of the model-only checkpoint --keep_every writes after 0-based `epoch`."""
    return f"epoch_{int(epoch):03d}.pth"


TRAINING_KEYS = ("epoch", "model", "optimizer", "scheduler", "method", "selection", "rng", "args", "info",
                 "model_args")


def load_training(path, map_location="cpu") -> Dict[str, Any]:
    """A training checkpoint (last.pth) for --resume, checked before anything is built: a file that
    is not one written by this trainer is named as such, with what it lacks."""
    path = Path(path)
    try:
        saved = load(path, map_location=map_location)
    except ValueError as err:
        cause = err.__cause__ or err
        first_line = (str(cause).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"{path} is not a checkpoint written by this trainer "
                         f"({type(cause).__name__}: {first_line})") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{path} is not a checkpoint written by this trainer (it holds a {type(saved).__name__})")
    missing = [k for k in TRAINING_KEYS if k not in saved]
    if missing and "model" in saved and "val" in saved:
        raise ValueError(f"{path} holds the selected model only (best.pth); resume from the run's last.pth")
    if missing:
        raise ValueError(f"{path} is not a checkpoint written by this trainer (it lacks {missing})")
    return saved


def first_difference(old: Any, new: Any, where: str = "") -> Optional[str]:
    """The first place where two JSON-like values differ, as 'path: old vs new', or None."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            if key not in old or key not in new:
                return f"{where}{key}: {'absent' if key not in old else old[key]!r} in the checkpoint, " \
                       f"{'absent' if key not in new else new[key]!r} now"
            found = first_difference(old[key], new[key], f"{where}{key}.")
            if found:
                return found
        return None
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            found = first_difference(a, b, f"{where.rstrip('.')}[{i}].")
            if found:
                return found
        return None
    if old != new:
        return f"{where.rstrip('.')}: {old!r} in the checkpoint, {new!r} now"
    return None


def check_resumable(saved: Dict[str, Any], args, info, model_args: Optional[dict] = None) -> None:
    """A checkpoint resumes only the run it came from: same dataset, method, fusion, the same data
    description (modalities, shapes, classes) and the same model. The message names what differs."""
    old = saved["args"]
    for key in ("dataset", "method", "fusion"):
        if old.get(key) != getattr(args, key):
            raise ValueError(f"checkpoint was made with --{key} {old.get(key)!r}, this run has "
                             f"{getattr(args, key)!r}; resume with the same setting")
    diff = first_difference(saved["info"], info.to_dict())
    if diff:
        raise ValueError(f"the checkpoint's data differ from the current data: {diff}; resume with the same "
                         f"dataset flags")
    diff = model_args is not None and first_difference(saved["model_args"], model_args)
    if diff:
        raise ValueError(f"the checkpoint's model differs from the one these flags build: {diff}; resume with "
                         f"the same model flags (--encoders and the encoder options)")
