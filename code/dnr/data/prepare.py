"""The preparation tool: from a dataset as its publishers distribute it to the folder its loader
reads (layout in manifest.py). One sub-command per dataset:

    python script/prepare.py cremad          --root CREMA-D  --out data/cremad
    python script/prepare.py kinetics_sounds --root VIDEOS   --out data/kinetics_sounds --train_list .. --test_list ..
    python script/prepare.py ucf101          --root UCF-101  --splits_dir ucfTrainTestlist --out data/ucf101
    python script/prepare.py vggsound        --root CLIPS    --csv vggsound.csv --out data/vggsound
    python script/prepare.py food101         --root UPMC_Food101 --out data/food101
    python script/prepare.py pack            --data_path data/cremad    # optional: packed frame cache

What it does: list the raw clips (the dataset module's `collect`), skip the clips whose outputs
all exist, prepare the others in parallel (decode, features, frames, flow; for a dataset of still
images, the image as the clip's one frame), each clip written to a
temporary folder under <out>/.tmp and moved into place only when all of it succeeded, so an
interrupted or failed clip never leaves a half-written output; then write the split files and
the manifest, with any whole-dataset files the module made (Food-101's vocabulary), only when
their content changed (a second run changes nothing), and print a summary
(written, skipped, failed with the reason, listed but missing with the clip names, warnings).

Checks per clip (`--duration_tolerance`, seconds): a video whose data ends before the duration its
file declares, by more than the tolerance, was cut short (a truncated download) and fails, since
decoders read it without complaint; the decoded video against the declared duration and against
the audio's, no declared duration at all, and silent audio are warnings: the clip is prepared, and
the summary and the manifest (key 'warnings'; the measured durations under each clip's 'probe')
name it.

Exit status: 0 when every clip found or listed is prepared (warnings allowed); 1 when some failed
(left out of the splits, retried by the next run) or are listed but missing (their files are not
there); 2 on a usage error (a bad flag, list or raw layout; nothing written).

The worker processes import only NumPy and the decoders (PyAV, soundfile, soxr, OpenCV, Pillow),
never torch (the package's __init__ is lazy), and die with the tool: on Linux the kernel kills
them when it dies (prctl PR_SET_PDEATHSIG), elsewhere they notice it within a second.

`pack` decodes a prepared folder's frames (and flow) once into a memory-mapped uint8 cache inside
it, for the trainer's --frame_cache (cache.py says what it writes and how it is checked).

Decoding libraries: PyAV (FFmpeg's libraries, bundled in its wheels) for every video container
these datasets come in (FLV, MP4, WebM, MKV, AVI) with exact timestamps, and for rate conversion
to 16 kHz; soundfile (libsndfile) for WAV; python-soxr for rate conversion to 22,050 Hz (the STFT
recipe, as librosa); OpenCV for optical flow and resizing; Pillow for JPEG.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import multiprocessing
import os
import platform
import re
import shutil
import signal
import sys
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..rundir import folder_lock
from . import audio as audio_lib
from . import video as video_lib
from . import cache as cache_lib
from .manifest import (FLOW_DIR, FORMAT, FRAMES_DIR, MANIFEST, audio_dir, check_clip_id, flow_names,
                       frame_name, manifest_text, read_manifest, split_path, write_bytes_if_changed,
                       write_text_if_changed)
from .splits import SPLITS, split_csv_text

TMP_DIR = ".tmp"
LOCK = ".prepare.lock"
FRAME_FILE = re.compile(r"^frame_\d{4}\.jpg$")
DURATION_TOLERANCE = 0.5  # s: at 1 fps, a smaller difference moves the frame count by one at most
SILENCE_PEAK = 1e-3       # an audio track whose peak is below -60 dBFS is reported as silent


# ---------------------------------------------------------------------------------------------
# What a dataset module hands to the tool
# ---------------------------------------------------------------------------------------------

@dataclass
class RawClip:
    id: str
    label: str
    video: Path                    # absolute path of the video file
    audio: Optional[Path] = None   # a WAV file; None: the video's own audio track
    source: Dict[str, str] = field(default_factory=dict)  # paths relative to --root, for the manifest
    meta: Dict[str, str] = field(default_factory=dict)    # e.g. actor, group (kept in the manifest)


@dataclass
class Collected:
    classes: List[str]
    clips: List[RawClip]                       # clips whose raw files are all present
    splits: Dict[str, Dict[str, List[str]]]    # scheme -> split -> clip ids (of `clips`)
    split_notes: Dict[str, str]                # scheme -> how its splits were made
    missing: Dict[str, str] = field(default_factory=dict)  # listed clips without their files
    notes: List[str] = field(default_factory=list)         # anything else the user should read
    files: Dict[str, bytes] = field(default_factory=dict)  # whole-dataset files, path relative to --out
    manifest: Dict[str, object] = field(default_factory=dict)  # entries added to the manifest (e.g. 'text')


@dataclass
class Preparer:
    name: str
    description: str
    add_args: Callable[[argparse.ArgumentParser], None]
    collect: Callable[[argparse.Namespace], Collected]
    audio: bool            # has an audio modality (--audio, --fbank_frames)
    flow: bool             # optical flow is prepared (--flow, --flow_bound)
    short_side: int        # default of --short_side
    default_audio: str = "fbank"
    image: bool = False    # the raw clips are still images (RawClip.video), one frame each


PREPARERS: Dict[str, Preparer] = {}


def register_preparer(prep: Preparer) -> Preparer:
    if prep.name in PREPARERS:
        raise ValueError(f"preparer {prep.name!r} registered twice")
    PREPARERS[prep.name] = prep
    return prep


# ---------------------------------------------------------------------------------------------
# One clip (runs in a worker process)
# ---------------------------------------------------------------------------------------------

@dataclass
class Task:
    clip: str
    out: str
    video: str
    audio: Optional[str]
    video_rel: str
    audio_rel: str
    frames: bool
    flow: Optional[str]            # flow method, when the flow is to be written
    recipes: Tuple[str, ...]       # audio recipes to write
    fps: float
    short_side: int
    jpeg_quality: int
    flow_bound: float
    fbank_frames: int
    root: str
    fbank_channel: str = "first"
    tolerance: float = DURATION_TOLERANCE
    probe_video: bool = False      # measure the video's durations even when nothing of it is written
    probe_audio: bool = False      # measure the audio's duration and peak even when no recipe is written
    image: bool = False            # `video` is a still image: its one frame

    def writes(self) -> bool:
        return bool(self.frames or self.flow or self.recipes)


@dataclass
class Outcome:
    clip: str
    error: Optional[str] = None    # why the clip failed; None: it succeeded
    # What was measured, the manifest's per-clip 'probe': video_s (decoded), declared_s (None: the file
    # declares none), audio_s, audio_peak; only what this task decoded.
    probe: Dict[str, Optional[float]] = field(default_factory=dict)


def _save_jpeg(array: np.ndarray, path: Path, quality: int) -> None:
    from PIL import Image

    Image.fromarray(array).save(path, format="JPEG", quality=quality)


def _reason(err: BaseException, where: str, root: str) -> str:
    text = f"{type(err).__name__}: {err}".replace(root.rstrip(os.sep) + os.sep, "")
    return f"{where}: {text}"


def truncation(sampled: "video_lib.SampledVideo", tolerance: float) -> Optional[str]:
    """Why a decoded video counts as cut short, or None (module docstring)."""
    if sampled.declared is not None and sampled.data_end < sampled.declared - tolerance:
        return (f"truncated or cut short: its data ends at {sampled.data_end:.2f} s ({sampled.decoded} pictures, "
                f"{sampled.duration:.2f} s of video), the file declares {sampled.declared:.2f} s")
    return None


def prepare_clip(t: Task) -> Outcome:
    """Prepare what `t` asks for -> its Outcome. Never raises, and moves nothing into place unless
    everything for the clip succeeded."""
    out = Path(t.out)
    tmp = out / TMP_DIR / f"{t.clip}.{os.getpid()}"
    probe: Dict[str, Optional[float]] = {}
    try:
        features = {}
        if t.recipes or t.probe_audio:
            try:
                if t.audio is not None:
                    wave, rate = audio_lib.read_wav(Path(t.audio))
                else:
                    wave, rate = audio_lib.read_video_audio(Path(t.video))
                probe["audio_s"] = round(wave.shape[1] / rate, 3)
                probe["audio_peak"] = round(float(np.abs(wave).max()), 6)
                for r in t.recipes:
                    features[r] = audio_lib.compute_features(r, wave, rate, t.fbank_frames, t.fbank_channel)
            except Exception as err:  # noqa: BLE001  (any decoder error is this clip's failure)
                return Outcome(t.clip, _reason(err, t.audio_rel, t.root))
        sampled = None
        if t.image and (t.frames or t.probe_video):
            try:
                picture, (width, height) = video_lib.read_image(Path(t.video), t.short_side)
            except Exception as err:  # noqa: BLE001  (any decoder error is this clip's failure)
                return Outcome(t.clip, _reason(err, t.video_rel, t.root))
            probe.update(width=width, height=height)
            sampled = video_lib.SampledVideo(frames=[picture], flows=None, duration=0.0, decoded=1)
        elif t.frames or t.flow or t.probe_video:
            try:
                sampled = video_lib.sample_video(Path(t.video), t.fps, t.short_side, t.flow)
            except Exception as err:  # noqa: BLE001
                return Outcome(t.clip, _reason(err, t.video_rel, t.root))
            probe["video_s"] = round(sampled.duration, 3)
            probe["declared_s"] = None if sampled.declared is None else round(sampled.declared, 3)
            cut = truncation(sampled, t.tolerance)
            if cut:
                return Outcome(t.clip, f"{t.video_rel}: {cut}")
        try:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            if t.frames:
                (tmp / FRAMES_DIR).mkdir()
                for k, picture in enumerate(sampled.frames):
                    _save_jpeg(picture, tmp / FRAMES_DIR / frame_name(k), t.jpeg_quality)
            if t.flow:
                (tmp / FLOW_DIR).mkdir()
                for k, f in enumerate(sampled.flows):
                    u_name, v_name = flow_names(k)
                    _save_jpeg(video_lib.quantise_flow(f[..., 0], t.flow_bound), tmp / FLOW_DIR / u_name, t.jpeg_quality)
                    _save_jpeg(video_lib.quantise_flow(f[..., 1], t.flow_bound), tmp / FLOW_DIR / v_name, t.jpeg_quality)
            for r, x in features.items():
                np.save(tmp / f"{audio_dir(r)}.npy", x)
            # Commit: each output appears whole, in one rename.
            for folder, wanted in ((FRAMES_DIR, t.frames), (FLOW_DIR, bool(t.flow))):
                if wanted:
                    (out / folder).mkdir(exist_ok=True)
                    os.rename(tmp / folder, out / folder / t.clip)
            for r in features:
                (out / audio_dir(r)).mkdir(exist_ok=True)
                os.replace(tmp / f"{audio_dir(r)}.npy", out / audio_dir(r) / f"{t.clip}.npy")
        except Exception as err:  # noqa: BLE001
            return Outcome(t.clip, _reason(err, f"writing {t.clip}", t.root))
        return Outcome(t.clip, None, probe)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with(parent: int) -> None:
    """Make this worker end when the process that started it ends, even by SIGKILL (which runs no
    clean-up in the parent): otherwise it would go on preparing clips into a folder whose lock is
    gone. Linux: the kernel sends SIGKILL at the parent's death (prctl); everywhere: a thread checks
    the parent id every half second (a dead parent's children are re-parented)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass  # no prctl: the watchdog below still works
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def _init_worker(parent: int) -> None:
    _die_with(parent)
    import cv2

    cv2.setNumThreads(1)  # one clip per process: no thread oversubscription


def _progress_bar(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, unit="clip", desc=desc, file=sys.stderr)


def run_tasks(tasks: Sequence[Task], workers: int, progress: bool, desc: str,
              work: Callable = prepare_clip) -> Dict[str, Outcome]:
    """Run `work` (task -> Outcome) on every task (in `workers` processes when > 1) -> {clip: Outcome}.

    A decoder that crashes its process (not only raises) breaks the pool: the clips that were in
    flight are then retried one at a time in a one-process pool, so the culprit is reported as
    failed and the others are prepared."""
    results: Dict[str, Outcome] = {}
    bar = _progress_bar(len(tasks), progress, desc)
    try:
        if workers <= 1 or len(tasks) <= 1:
            for t in tasks:
                done = work(t)
                results[done.clip] = done
                bar.update()
            return results
        ctx = multiprocessing.get_context("spawn")  # no fork of a process that holds torch/FFmpeg state
        queue = deque(tasks)
        while queue:
            suspects = deque(_pool_pass(queue, workers, ctx, results, bar, work))
            while suspects:
                with _pool(1, ctx) as ex:
                    while suspects:
                        t = suspects.popleft()
                        try:
                            done = ex.submit(work, t).result()
                        except BrokenProcessPool:
                            results[t.clip] = Outcome(t.clip, f"{t.video_rel}: the process preparing it died (a "
                                                              f"crash in a decoder?)")
                            bar.update()
                            break  # this pool is gone; the next suspects get a fresh one
                        results[done.clip] = done
                        bar.update()
        return results
    finally:
        bar.close()


def _pool(workers: int, ctx) -> ProcessPoolExecutor:
    # Created (and its processes started, on submit) by this thread: PR_SET_PDEATHSIG follows the
    # thread that started a process, so the workers must not come from a helper thread.
    return ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(os.getpid(),))


def _pool_pass(queue: deque, workers: int, ctx, results: dict, bar, work: Callable) -> List[Task]:
    """Run tasks from the queue until it is empty -> [] or, if a process died, the tasks in flight."""
    inflight = {}
    with _pool(workers, ctx) as ex:
        try:
            while queue or inflight:
                # At most 2 tasks per worker in flight: few suspects if a process dies.
                while queue and len(inflight) < 2 * workers:
                    t = queue.popleft()
                    inflight[ex.submit(work, t)] = t
                done, _ = wait(inflight, return_when=FIRST_COMPLETED)
                for f in done:
                    outcome = f.result()
                    del inflight[f]
                    results[outcome.clip] = outcome
                    bar.update()
        except BrokenProcessPool:
            return list(inflight.values())
    return []


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

def library_versions() -> dict:
    from .. import __version__

    return {"dnr": __version__, "python": platform.python_version(), **audio_lib.versions(),
            **video_lib.versions()}


def _parameters(prep: Preparer, args) -> dict:
    params = {"frames": video_lib.image_params(args.short_side, args.jpeg_quality) if prep.image
              else video_lib.frames_params(args.fps, args.short_side, args.jpeg_quality)}
    if prep.flow:
        params["flow"] = video_lib.flow_params(args.flow, args.flow_bound)
    recipes = []
    if prep.audio:
        recipes = [r.strip() for r in args.audio.split(",") if r.strip()]
        bad = [r for r in recipes if r not in audio_lib.RECIPES]
        if bad or not recipes:
            raise UsageError(f"--audio {args.audio!r}: use one or more of {','.join(audio_lib.RECIPES)}, "
                             f"comma-separated")
    params["audio"] = {r: audio_lib.recipe_params(r, args.fbank_frames, args.fbank_channel) for r in recipes}
    return params


class UsageError(ValueError):
    """A flag or the raw data does not fit: exit status 2, nothing written."""


def _merge_with_existing(old: Optional[dict], prep: Preparer, params: dict, classes: List[str], out: Path) -> dict:
    """Parameters of this run against those the folder was prepared with: frames and flow must
    agree; an audio recipe may be added, an existing one must agree."""
    if old is None:
        return params
    where = out / MANIFEST
    if old.get("format") != FORMAT or old.get("dataset") != prep.name:
        raise UsageError(f"{where} belongs to dataset {old.get('dataset')!r} (format {old.get('format')}); "
                         f"choose another --out for {prep.name}")
    if old.get("classes") != classes:
        raise UsageError(f"{where} lists the classes {old.get('classes')}, the raw data gives {classes}; "
                         f"choose another --out")
    for key in ("frames", "flow"):
        if old.get(key) != params.get(key):
            raise UsageError(f"{where} was prepared with {key} settings {old.get(key)}, this run asks "
                             f"{params.get(key)}; rerun with the same flags or choose another --out")
    merged = dict(params)
    merged["audio"] = dict(old.get("audio", {}))
    for recipe, p in params["audio"].items():
        if recipe in merged["audio"] and merged["audio"][recipe] != p:
            raise UsageError(f"{where} holds {recipe} features made with {merged['audio'][recipe]}, this "
                             f"run asks {p}; rerun with the same flags or choose another --out")
        merged["audio"][recipe] = p
    return merged


def _needs(clip: RawClip, out: Path, params: dict) -> Tuple[bool, bool, Tuple[str, ...]]:
    frames = not (out / FRAMES_DIR / clip.id).is_dir()
    flow = bool(params.get("flow")) and not (out / FLOW_DIR / clip.id).is_dir()
    recipes = tuple(r for r in sorted(params["audio"]) if not (out / audio_dir(r) / f"{clip.id}.npy").is_file())
    return frames, flow, recipes


def _frame_count(out: Path, clip: str) -> int:
    return sum(1 for p in (out / FRAMES_DIR / clip).iterdir() if FRAME_FILE.match(p.name))


def run(prep: Preparer, args: argparse.Namespace) -> int:
    root, out = Path(args.root), Path(args.out)
    if not root.is_dir():
        raise UsageError(f"--root {root}: not a folder")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")
    rules = [(args.workers >= 1, f"--workers must be >= 1, got {args.workers}"),
             (args.short_side >= 0, f"--short_side must be >= 0 (0 keeps the size), got {args.short_side}"),
             (1 <= args.jpeg_quality <= 100, f"--jpeg_quality must lie in [1, 100], got {args.jpeg_quality}")]
    if not prep.image:
        rules.append((args.fps > 0, f"--fps must be > 0, got {args.fps}"))
        rules.append((args.duration_tolerance > 0,
                      f"--duration_tolerance must be > 0 seconds, got {args.duration_tolerance}"))
    if prep.audio:
        rules.append((args.fbank_frames >= 1, f"--fbank_frames must be >= 1, got {args.fbank_frames}"))
    if prep.flow:
        rules.append((args.flow_bound > 0, f"--flow_bound must be > 0, got {args.flow_bound}"))
    for ok, message in rules:
        if not ok:
            raise UsageError(message)
    params = _parameters(prep, args)
    collected = prep.collect(args)
    for c in collected.clips:
        check_clip_id(c.id, str(c.source.get("video", c.video)))
    if not collected.clips:
        raise UsageError(f"--root {root}: no clip of {prep.name} found (see the README for the expected layout)")

    out.mkdir(parents=True, exist_ok=True)
    with _exclusive(out):
        return _run_locked(prep, args, root, out, params, collected)


def _exclusive(folder: Path):
    """Hold the folder's preparation lock (one writer at a time); refuse when another run holds it."""
    return folder_lock(folder, LOCK, "another preparation is writing into {folder}; wait for it to finish",
                       error=UsageError, record_pid=False)


def _run_locked(prep, args, root: Path, out: Path, params: dict, collected: Collected) -> int:
    old = None
    if (out / MANIFEST).is_file():
        try:
            old = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise UsageError(f"{out / MANIFEST} is not valid JSON ({err}); remove it to rebuild it") from None
    params = _merge_with_existing(old, prep, params, collected.classes, out)
    shutil.rmtree(out / TMP_DIR, ignore_errors=True)  # left by a killed run; the lock says none is running
    # What earlier runs measured (kept, so that a skipped clip keeps its checks).
    old_probe = {c: dict(e.get("probe", {})) for c, e in (old or {}).get("clips", {}).items()}

    tasks, skipped = [], 0
    tolerance = getattr(args, "duration_tolerance", DURATION_TOLERANCE)  # still images have no duration
    for c in collected.clips:
        frames, flow, recipes = _needs(c, out, params)
        known = old_probe.get(c.id, {})
        probe_video = ("width" if prep.image else "video_s") not in known
        probe_audio = prep.audio and "audio_s" not in known
        if not (frames or flow or recipes or probe_video or probe_audio):
            skipped += 1
            continue
        tasks.append(Task(clip=c.id, out=str(out), video=str(c.video), audio=str(c.audio) if c.audio else None,
                          video_rel=c.source.get("video") or c.source.get("image") or str(c.video),
                          audio_rel=c.source.get("audio", c.source.get("video", str(c.video))),
                          frames=frames, flow=args.flow if (flow and prep.flow) else None, recipes=recipes,
                          fps=getattr(args, "fps", 1.0), short_side=args.short_side, jpeg_quality=args.jpeg_quality,
                          flow_bound=getattr(args, "flow_bound", 0.0),
                          fbank_frames=getattr(args, "fbank_frames", audio_lib.FBANK_FRAMES), root=str(root),
                          fbank_channel=getattr(args, "fbank_channel", "first"), tolerance=tolerance,
                          probe_video=probe_video, probe_audio=bool(probe_audio), image=prep.image))
    progress = _progress(args)
    results = run_tasks(tasks, args.workers, progress, desc=f"prepare {prep.name}")
    shutil.rmtree(out / TMP_DIR, ignore_errors=True)

    # The final state is read from the disk, so that the manifest describes what is there.
    clips, failed, warnings = {}, {}, {}
    for c in collected.clips:
        done = results.get(c.id)
        frames, flow, recipes = _needs(c, out, params)
        if (done is not None and done.error) or frames or flow or recipes:
            failed[c.id] = (done.error if done is not None else None) or "outputs incomplete"
            continue
        probe = {**old_probe.get(c.id, {}), **(done.probe if done is not None else {})}
        clips[c.id] = {"label": c.label, "frames": _frame_count(out, c.id), "source": c.source, **c.meta,
                       "probe": dict(sorted(probe.items()))}
        if clips[c.id]["frames"] < 1:
            failed[c.id] = f"{FRAMES_DIR}/{c.id}: no frame"
            del clips[c.id]
            continue
        found = clip_warnings(probe, tolerance)
        if found:
            warnings[c.id] = found

    split_counts = {}
    for scheme, parts in sorted(collected.splits.items()):
        labels = {i: clips[i]["label"] for i in clips}
        counts = {}
        for split in SPLITS:
            ids = [i for i in parts.get(split, []) if i in clips]
            write_text_if_changed(split_path(out, scheme, split), split_csv_text(ids, labels))
            counts[split] = len(ids)
            counts[f"{split}_failed_left_out"] = sum(1 for i in parts.get(split, []) if i not in clips)
        split_counts[scheme] = {"how": collected.split_notes.get(scheme, ""), **counts}

    for rel, data in sorted(collected.files.items()):
        write_bytes_if_changed(out / rel, data)
    written = sum(1 for t in tasks if t.writes() and not results[t.clip].error)
    checked = sum(1 for t in tasks if not t.writes() and not results[t.clip].error)
    versions = list(old.get("versions", [])) if old else []
    current = library_versions()
    if written and current not in versions:
        versions.append(current)
    manifest = {
        "format": FORMAT,
        "dataset": prep.name,
        "classes": collected.classes,
        "frames": params["frames"],
        "flow": params.get("flow"),
        "audio": params["audio"],
        "checks": ({"decode": "every image decoded whole (Pillow refuses a truncated file); a failure fails "
                              "the clip"} if prep.image else
                   {"duration_tolerance_s": tolerance, "silence_peak": SILENCE_PEAK,
                    "truncated": "fails: the data ends before the declared duration minus the tolerance",
                    "warnings": "decoded video vs declared duration and vs audio beyond the tolerance; no "
                                "declared duration; audio peak under silence_peak"}),
        "splits": split_counts,
        "clips": clips,
        "failed": failed,
        "missing": collected.missing,
        "warnings": warnings,
        "versions": versions,
        **collected.manifest,
    }
    changed = write_text_if_changed(out / MANIFEST, manifest_text(manifest))
    _summary(prep, out, collected, written, checked, skipped, failed, warnings, split_counts, changed)
    return 1 if failed or collected.missing else 0


def clip_warnings(probe: dict, tolerance: float) -> List[str]:
    """What a clip's measured durations and audio peak (its manifest 'probe') say that the user
    should check; the clip itself is prepared."""
    found = []
    video, declared, audio, peak = (probe.get(k) for k in ("video_s", "declared_s", "audio_s", "audio_peak"))
    if video is not None and declared is None:
        found.append(f"the video file declares no duration, so a truncated file cannot be told (decoded "
                     f"{video:.2f} s)")
    if video is not None and declared is not None and abs(video - declared) > tolerance:
        found.append(f"the video decodes to {video:.2f} s, its file declares {declared:.2f} s")
    if video is not None and audio is not None and abs(video - audio) > tolerance:
        found.append(f"the video lasts {video:.2f} s, the audio {audio:.2f} s")
    if peak is not None and peak < SILENCE_PEAK:
        found.append(f"the audio is silent (peak {peak:g}, under {SILENCE_PEAK:g})")
    return found


SHOWN = 20  # clips named per list in the summary; the manifest has them all


def _summary(prep, out, collected, written, checked, skipped, failed, warnings, split_counts, changed) -> None:
    say = lambda *a: print(*a, flush=True)  # noqa: E731
    say(f"{prep.name} -> {out}: {len(collected.clips)} clips found; {written} written, {skipped} skipped "
        f"(already done), {len(failed)} failed, {len(collected.missing)} listed but missing"
        + (f"; {checked} checked (outputs there, durations measured)" if checked else ""))
    if failed:
        say("failed (left out of the splits; rerun to retry them):")
        for clip, reason in sorted(failed.items()):
            say(f"  {clip}: {reason}")
    if collected.missing:
        say("listed but missing (their files are not under --root; left out):")
        for clip, why in sorted(collected.missing.items())[:SHOWN]:
            say(f"  {clip}: {why}")
        if len(collected.missing) > SHOWN:
            say(f"  ... and {len(collected.missing) - SHOWN} more (every one in {out / MANIFEST}, key 'missing')")
    if warnings:
        say(f"warnings ({len(warnings)} clips, prepared; every one in {out / MANIFEST}, key 'warnings'):")
        for clip, found in sorted(warnings.items())[:SHOWN]:
            say(f"  {clip}: {'; '.join(found)}")
        if len(warnings) > SHOWN:
            say(f"  ... and {len(warnings) - SHOWN} more")
    for note in collected.notes:
        say(f"note: {note}")
    for scheme, c in split_counts.items():
        left = sum(c[f"{s}_failed_left_out"] for s in SPLITS)
        say(f"splits '{scheme}' ({c['how']}): train {c['train']}, val {c['val']}, test {c['test']}"
            + (f"; {left} failed clips left out" if left else ""))
        for s in SPLITS:
            if c[s] == 0:
                say(f"warning: split '{scheme}/{s}' is empty; the loader will refuse it")
    say(f"manifest {'written' if changed else 'unchanged'}: {out / MANIFEST}")
    if failed or collected.missing:
        say(f"exit status 1: {len(failed)} failed, {len(collected.missing)} listed but missing")


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def _add_common(p: argparse.ArgumentParser, prep: Preparer) -> None:
    g = p.add_argument_group("input and output")
    g.add_argument("--root", required=True, help="folder of the raw dataset as downloaded (layout in the README)")
    g.add_argument("--out", required=True,
                   help="output folder (created if missing); nothing is written anywhere else")
    g = p.add_argument_group("images" if prep.image else "frames")
    if not prep.image:
        g.add_argument("--fps", type=float, default=1.0, help="frames kept per second of video (default: 1)")
    g.add_argument("--short_side", type=int, default=prep.short_side,
                   help="scale frames down so their shorter side has this many pixels; 0 keeps the "
                        f"decoded size (default: {prep.short_side})")
    g.add_argument("--jpeg_quality", type=int, default=95, help="JPEG quality, 1-100 (default: 95)")
    if prep.audio:
        g = p.add_argument_group("audio")
        g.add_argument("--audio", default=prep.default_audio,
                       help="audio features, comma-separated: 'fbank' (Kaldi-style 128-bin filterbank, "
                            "16 kHz, 1024 frames of 10 ms; the D&R authors'), 'stft' (OGM-GE log-STFT, "
                            f"22,050 Hz, 3 s, 257 x 188) or 'fbank,stft' (default: {prep.default_audio})")
        g.add_argument("--fbank_frames", type=int, default=audio_lib.FBANK_FRAMES,
                       help="filterbank frames (10 ms each) after zero-padding or cutting "
                            f"(default: {audio_lib.FBANK_FRAMES})")
        g.add_argument("--fbank_channel", choices=audio_lib.FBANK_CHANNELS, default="first",
                       help="which channel of a multi-channel file the filterbank reads: first (as "
                            "torchaudio's kaldi.fbank on the D&R authors' WAVs) or mean (default: first; the "
                            "stft recipe always averages the channels, as librosa.load)")
    if prep.flow:
        g = p.add_argument_group("optical flow")
        g.add_argument("--flow", choices=video_lib.FLOW_METHODS, default="farneback",
                       help="OpenCV optical-flow method (default: farneback)")
        g.add_argument("--flow_bound", type=float, default=20.0,
                       help="flow magnitude, in pixels, mapped to the ends of the 8-bit range; larger "
                            "values are clipped (default: 20)")
    if not prep.image:
        g = p.add_argument_group("checks")
        g.add_argument("--duration_tolerance", type=float, default=DURATION_TOLERANCE,
                       help="seconds: a video whose data ends this much before the duration its file declares "
                            "fails as truncated; larger differences between the decoded video, the declared "
                            f"duration and the audio are reported as warnings (default: {DURATION_TOLERANCE:g})")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="seed of the splits that are drawn (default: 0)")
    g.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="parallel processes, 1 = in this process (default: the number of CPUs)")
    _add_progress(g)


PACK = "pack"


def _add_progress(p) -> None:
    p.add_argument("--progress", choices=("auto", "on", "off"), default="auto",
                   help="progress bar; auto shows it when stderr is a terminal (default: auto)")


def _progress(args: argparse.Namespace) -> bool:
    return sys.stderr.isatty() if args.progress == "auto" else args.progress == "on"


def _add_pack(sub) -> None:
    sp = sub.add_parser(PACK, help="decode a prepared folder's frames once into a memory-mapped cache "
                                   "(for the trainer's --frame_cache)",
                        description="Write <data_path>/cache/frames_<H>x<W>.u8 (uint8, frames x H x W x 3) "
                                    "and its .json description, and flow_<H>x<W>.* when the folder has "
                                    "optical flow. A second run with the same settings changes nothing.")
    sp.add_argument("--data_path", required=True, help="a folder written by this tool (holds manifest.json)")
    sp.add_argument("--height", type=int, default=0,
                    help="frame height in the cache, with --width; 0 (default): the stored size when every "
                         "clip has the same, else the most common stored size with its shorter side scaled "
                         "to 256 (frames of another size or aspect are resized to it)")
    sp.add_argument("--width", type=int, default=0, help="frame width in the cache, with --height (default: 0, see --height)")
    sp.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                    help="threads decoding JPEGs (default: the number of CPUs)")
    _add_progress(sp)


def run_pack(args: argparse.Namespace) -> int:
    root = Path(args.data_path)
    if not root.is_dir():
        raise UsageError(f"--data_path {root}: not a folder")
    if args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    progress = _progress(args)
    read_manifest(root)  # a prepared folder, before anything is written into it
    with _exclusive(root):
        lines = cache_lib.pack(root, args.height, args.width, args.workers, progress)
    for line in lines:
        print(line, flush=True)
    return 0


def get_parser() -> argparse.ArgumentParser:
    from . import register_all

    register_all()  # every dataset module registers its preparer when imported

    p = argparse.ArgumentParser(
        prog="prepare.py",
        description="Prepare a dataset from its raw download into the folder its loader reads: frames, "
                    "audio features, optical flow, split files and a manifest; 'pack' adds a packed "
                    "frame cache to a prepared folder.")
    sub = p.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    for name, prep in sorted(PREPARERS.items()):
        sp = sub.add_parser(name, help=prep.description, description=prep.description)
        prep.add_args(sp.add_argument_group(f"{name}"))
        _add_common(sp, prep)
    _add_pack(sub)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = get_parser()
    args = parser.parse_args(argv)
    try:
        if args.dataset == PACK:
            return run_pack(args)
        return run(PREPARERS[args.dataset], args)
    except (UsageError, FileNotFoundError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
