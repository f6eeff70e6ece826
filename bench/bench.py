#!/usr/bin/env python3
"""Speed benchmark of the input pipeline, the training step, the D&R diagnosis and k-means, in one
run, on CREMA-D-shaped data generated here (never part of the test suite).

    python bench/bench.py --quick                  # seconds, reduced model shapes: for development only
    python bench/bench.py                          # the full run recorded in BENCHMARKS.md
    python bench/bench.py --device cuda            # the same on a GPU (auto takes it when present)

What it measures (every figure is printed with the ratios between them, and saved as JSON, --json):
  1. loader: samples/s of the training and evaluation datasets through a DataLoader with
     num_workers=0 and one torch thread (i.e. per core), for the JPEG path, the packed cache with
     CPU augmentation (--frame_cache cpu), and the packed cache's raw uint8 frames
     (--frame_cache gpu, loader side); plus samples/s of the batched device transform of the gpu
     mode on the benchmark device.
  2. train: samples/s of engine.train_one_epoch on the real model (two ResNet-18s; audio 1 x 128 x
     1024, 2 frames of 3 x 224 x 224) from batches already on the device: eager float32,
     channels_last, autocast (bf16 on a CPU, fp16 on CUDA), and both; and samples/s of
     engine.extract_features (the diagnosis's forward pass) in the same modes. Each step is timed
     on its own after a warm-up step; the rate is that of the median step (the mean is saved too).
  3. diagnosis vs epoch at CREMA-D scale (5,954 train, 744 val, 744 test): the k-means part is
     MEASURED (diagnose_purity, k = 6, n_init = 10, on 512-d features of both sizes, two modalities,
     on the benchmark device); feature extraction and the epoch are EXTRAPOLATED from the measured
     per-sample rates: epoch = 5,954 / train rate + 1,488 / eval rate (training, then val and test
     evaluation); diagnosis = 5,954 / eval rate + k-means (the trainer takes the val features from
     the epoch's val evaluation, so a diagnosis extracts the training split only). Once with the model alone (a loader that
     keeps up: what the cache is for) and once with each loader path on all CPU cores, assuming
     the loader scales linearly with DataLoader workers (an assumption, stated in the output).
  4. k-means: dnr.diagnose.kmeans (torch, CPU and CUDA when present) against scikit-learn's KMeans
     on the same float32 features (N in --kmeans_sizes, D 512, k 6, the same n_init, seeds 0, 1, 2
     for both: means over the seeds), time and purity against the generating labels; torch timings on CUDA exclude the host-to-device copy
     (the diagnosis's features are already on the GPU). The inertia (the objective both minimise)
     is recorded too: on one draw of features, different seeds reach different local optima, and
     purity can differ between two clusterings of almost the same inertia.

The generated data: --clips clips in the prepared-folder layout (manifest, splits, frames/ with
3 stored frames of 360 x 480 RGB JPEG at quality 95 as the preparation tool writes them,
audio_fbank/ with (1, 128, 1024) float32), written directly with the project's manifest helpers
(no video encoding), then packed with `script/prepare.py pack`. The files are read from the page
cache (just written): the loader figures are decode and transform costs, not disk reads.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "code"))

from dnr.data import build_datasets  # noqa: E402
from dnr.data.audio import recipe_params  # noqa: E402
from dnr.data.manifest import (FORMAT, FRAMES_DIR, audio_dir, frame_name, manifest_text, split_path,  # noqa: E402
                               write_text_if_changed)
from dnr.data.prepare import main as prepare_main  # noqa: E402
from dnr.data.splits import split_csv_text  # noqa: E402
from dnr.data.video import frames_params  # noqa: E402
from dnr.diagnose import diagnose_purity, kmeans, minmax_scale, purity_score  # noqa: E402

EMOTIONS = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")
CREMAD = {"train": 5954, "val": 744, "test": 744}
FRAME_H, FRAME_W, STORED_FRAMES, JPEG_QUALITY = 360, 480, 3, 95

# Full mode vs --quick: the quick run shrinks the model's inputs and the counts so that it takes
# seconds; its model figures are not representative (it says so in its output).
PROFILES = {
    "full": dict(clips=240, loader_samples=320, image_size=224, audio_frames=1024, train_steps=None,
                 batch_size=None, kmeans_sizes="5000,20000,50000", kmeans_n_init="1,10", kmeans_seeds=3,
                 repeats=1),
    "quick": dict(clips=18, loader_samples=16, image_size=224, audio_frames=1024, train_steps=1,
                  batch_size=2, kmeans_sizes="2000", kmeans_n_init="10", kmeans_seeds=1, repeats=1,
                  model_image_size=32, model_audio_frames=64),
}


def say(*a) -> None:
    print(*a, flush=True)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

def face_frame(rng: np.random.Generator, label: int, t: int) -> np.ndarray:
    """A 360 x 480 RGB picture with the rough statistics of a CREMA-D frame: a plain lit
    background, a skin-toned face with eyes and a mouth that moves a little, sensor noise."""
    yy, xx = np.mgrid[0:FRAME_H, 0:FRAME_W].astype(np.float32)
    img = np.empty((FRAME_H, FRAME_W, 3), np.float32)
    base = rng.uniform(60, 120, 3)
    img[:] = base + 40 * (xx / FRAME_W)[..., None] - 20 * (yy / FRAME_H)[..., None]
    cy, cx = FRAME_H / 2 + rng.normal(0, 6) + 2 * t, FRAME_W / 2 + rng.normal(0, 8)
    face = ((yy - cy) / 120) ** 2 + ((xx - cx) / 90) ** 2 < 1
    img[face] = np.array([200, 150, 120], np.float32) * rng.uniform(0.8, 1.1) + 10 * np.sin(yy[face] / 9)[:, None]
    for ex in (-35, 35):
        eye = ((yy - cy + 30) / 9) ** 2 + ((xx - cx - ex) / 16) ** 2 < 1
        img[eye] = (40, 30, 30)
    mouth = ((yy - cy - 55) / (6 + 4 * label + 3 * t)) ** 2 + ((xx - cx) / 30) ** 2 < 1
    img[mouth] = (120, 40, 50)
    img += rng.normal(0, 3, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_cremad_like(out: Path, n_clips: int, audio_frames: int = 1024, seed: int = 0) -> Path:
    """A prepared CREMA-D-shaped folder, written with the project's manifest helpers."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    clips, labels = {}, {}
    for c in range(n_clips):
        label = EMOTIONS[c % len(EMOTIONS)]
        clip = f"{1001 + c // 12}_S{c % 12:02d}_{label}_XX"
        folder = out / FRAMES_DIR / clip
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(STORED_FRAMES):
            Image.fromarray(face_frame(rng, c % len(EMOTIONS), k)).save(folder / frame_name(k), format="JPEG",
                                                                        quality=JPEG_QUALITY)
        (out / audio_dir("fbank")).mkdir(parents=True, exist_ok=True)
        np.save(out / audio_dir("fbank") / f"{clip}.npy",
                rng.normal(-0.3, 0.3, (1, 128, audio_frames)).astype(np.float32))
        clips[clip] = {"label": label, "frames": STORED_FRAMES}
        labels[clip] = label
    ids = sorted(clips)
    n_test = max(len(EMOTIONS), n_clips // 9)
    parts = {"test": ids[:n_test], "val": ids[n_test:2 * n_test], "train": ids[2 * n_test:]}
    for split, members in parts.items():
        write_text_if_changed(split_path(out, "clip", split), split_csv_text(members, labels))
    manifest = {"format": FORMAT, "dataset": "cremad", "classes": list(EMOTIONS),
                "frames": frames_params(1.0, 0, JPEG_QUALITY), "flow": None,
                "audio": {"fbank": recipe_params("fbank", audio_frames)},
                "splits": {"clip": {s: len(v) for s, v in parts.items()}}, "clips": clips, "failed": {},
                "missing": {}, "versions": [], "generated_by": "bench/bench.py (synthetic, CREMA-D-shaped)"}
    write_text_if_changed(out / "manifest.json", manifest_text(manifest))
    return out


def dataset_args(folder: Path, cache: str, image_size: int):
    from main import get_args_parser

    return get_args_parser().parse_args(["--dataset", "cremad", "--data_path", str(folder), "--cremad_audio", "fbank",
                                         "--cremad_image_size", str(image_size), "--frame_cache", cache])


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------

def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def loader_rate(dataset, n: int, batch_size: int = 16) -> float:
    """samples/s through a DataLoader, num_workers=0 (in this process, one torch thread)."""
    from torch.utils.data import DataLoader, Subset

    idx = [i % len(dataset) for i in range(n)]
    loader = DataLoader(Subset(dataset, idx), batch_size=batch_size, shuffle=False, num_workers=0)
    next(iter(DataLoader(Subset(dataset, idx[:2]), batch_size=2)))  # warm-up (file handles, memory map)
    start = time.perf_counter()
    seen = sum(len(b["label"]) for b in loader)
    return seen / (time.perf_counter() - start)


def measure_loaders(folder: Path, n: int, image_size: int, device) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per core
    out = {}
    try:
        for cache in ("off", "cpu", "gpu"):
            splits = build_datasets("cremad", dataset_args(folder, cache, image_size))
            key = {"off": "jpeg", "cpu": "cache_cpu", "gpu": "cache_gpu_raw"}[cache]
            torch.manual_seed(0)
            out[key] = {"train": loader_rate(splits.train, n), "eval": loader_rate(splits.val, n)}
            if cache == "gpu":
                gpu_splits = splits
    finally:
        torch.set_num_threads(threads)
    # The gpu mode's other half: the batched crop/flip/resize/normalise on the benchmark device.
    from torch.utils.data import DataLoader

    batch = next(iter(DataLoader(gpu_splits.train, batch_size=64, shuffle=False)))["inputs"]
    batch = {m: x.to(device) for m, x in batch.items()}
    rates = {}
    for train in (True, False):
        gpu_splits.device_transform(batch, train)
        sync(device)
        reps = 5
        start = time.perf_counter()
        for _ in range(reps):
            gpu_splits.device_transform(batch, train)
        sync(device)
        rates["train" if train else "eval"] = reps * 64 / (time.perf_counter() - start)
    out["device_transform"] = rates
    return out


def amp_modes(device) -> list:
    """(name, channels_last, autocast dtype) of the modes the device supports."""
    amp = torch.float16 if device.type == "cuda" else torch.bfloat16
    name = "fp16" if device.type == "cuda" else "bf16"
    return [("eager", False, None), ("channels_last", True, None), (name, False, amp),
            (f"{name}+channels_last", True, amp)]


def step_seconds(fn, batches, device) -> list:
    """Seconds of fn(batch) for each batch, synchronised."""
    out = []
    for b in batches:
        sync(device)
        start = time.perf_counter()
        fn(b)
        sync(device)
        out.append(time.perf_counter() - start)
    return out


def model_rates(info, device, batch_size: int, steps: int) -> dict:
    """samples/s of train_one_epoch and extract_features on the real model, per mode, from batches
    already on the device (so the loader is not part of it)."""
    from dnr.engine import extract_features, train_one_epoch
    from dnr.methods import Method
    from dnr.models import create_model
    from dnr.stepping import Updater

    torch.backends.cudnn.benchmark = True  # as the trainer without --deterministic
    gen = torch.Generator().manual_seed(0)

    def batches(n_batches, bs):
        out = []
        for b in range(n_batches):
            inputs = {s.name: torch.randn((bs,) + tuple(s.shape), generator=gen).to(device) for s in info.modalities}
            out.append({"inputs": inputs, "label": torch.randint(info.num_classes, (bs,), generator=gen).to(device),
                        "index": torch.arange(b * bs, (b + 1) * bs)})
        return out

    train_batches = batches(steps, batch_size)
    eval_batches = batches(steps, 2 * batch_size)  # the trainer's default eval batch: 2 x batch_size
    results = {}
    for name, channels_last, amp in amp_modes(device):
        torch.manual_seed(0)
        model = create_model(info).to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
            for enc in model.encoders.values():
                enc.memory_format = torch.channels_last
        method = Method(None, model, info)
        opt = torch.optim.SGD(model.parameters(), lr=0.002, momentum=0.9, weight_decay=1e-4)
        scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
        update = Updater(model, opt, device, amp=amp, scaler=scaler)
        try:
            train_one_epoch(model, method, train_batches[:1], update, 0, progress=False)  # warm-up (cuDNN, allocator)
            train_s = step_seconds(lambda b: train_one_epoch(model, method, [b], update, 0, progress=False),
                                   train_batches, device)
            extract_features(model, eval_batches[:1], device, amp=amp)
            eval_s = step_seconds(lambda b: extract_features(model, [b], device, amp=amp), eval_batches, device)
            # Rates from the median step (robust to a stray slow step); the mean is kept too.
            results[name] = {"train": batch_size / statistics.median(train_s),
                             "eval": 2 * batch_size / statistics.median(eval_s),
                             "train_mean": batch_size * len(train_s) / sum(train_s),
                             "eval_mean": 2 * batch_size * len(eval_s) / sum(eval_s)}
        except RuntimeError as err:  # a mode this device cannot run: recorded, not fatal
            results[name] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0]}"}
        say(f"  {name:>20}: " + (f"train {results[name]['train']:.2f} samples/s, eval {results[name]['eval']:.2f} "
                                 f"samples/s" if "train" in results[name] else results[name]["error"]))
    return results


def synthetic_features(n: int, d: int = 512, k: int = 6, seed: int = 0, separation: float = 0.15):
    """Non-negative (post-ReLU, like pooled ResNet features) 512-d features of k classes that
    k-means separates only in part -> (float32 (N, D), labels (N,))."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    centers = rng.normal(0, 1, (k, d)) * separation
    x = np.maximum(centers[y] + rng.normal(0, 1, (n, d)), 0)
    return x.astype(np.float32), y


def timed(fn, repeats: int, device=None):
    best, out = math.inf, None
    for _ in range(max(1, repeats)):
        sync(device or "cpu")
        start = time.perf_counter()
        out = fn()
        sync(device or "cpu")
        best = min(best, time.perf_counter() - start)
    return best, out


def inertia(x: np.ndarray, labels) -> float:
    """Sum of squared distances to the cluster means (the objective both minimise), in float64."""
    x = x.astype(np.float64)
    labels = np.asarray(labels)
    return float(sum(((x[labels == c] - x[labels == c].mean(0)) ** 2).sum() for c in np.unique(labels)))


def measure_kmeans(sizes, n_inits, repeats: int, cuda: bool, seeds: int) -> list:
    """Per (N, n_init): each implementation with seeds 0 .. seeds-1 on the same features; times,
    purities and inertias are means over the seeds (a single seed's time depends on how many
    iterations its start needs, which differs between the two libraries' random streams)."""
    from sklearn.cluster import KMeans

    warm = minmax_scale(torch.from_numpy(synthetic_features(2000, seed=99)[0]))
    kmeans(warm, 6, n_init=2)
    KMeans(6, n_init=2, random_state=0).fit(warm.numpy())
    if cuda:
        kmeans(warm.cuda(), 6, n_init=2)
    rows = []
    for n in sizes:
        x, y = synthetic_features(n)
        xt = minmax_scale(torch.from_numpy(x))  # the diagnosis clusters min-max scaled features
        xs = xt.numpy()
        xg = xt.cuda() if cuda else None
        runs = {"torch_cpu": lambda n_init, s: kmeans(xt, 6, n_init=n_init, seed=s).numpy(),
                "sklearn": lambda n_init, s: KMeans(6, n_init=n_init, random_state=s).fit_predict(xs)}
        if cuda:
            runs["torch_cuda"] = lambda n_init, s: kmeans(xg, 6, n_init=n_init, seed=s).cpu().numpy()
        for n_init in n_inits:
            row = {"n": n, "d": 512, "k": 6, "n_init": n_init, "seeds": seeds}
            for name, fn in runs.items():
                per_seed = [timed(lambda s=s: fn(n_init, s), repeats, "cuda" if name == "torch_cuda" else None)
                            for s in range(seeds)]
                row[f"{name}_s"] = float(np.mean([t for t, _ in per_seed]))
                row[f"{name}_purity"] = float(np.mean([purity_score(y, lab) for _, lab in per_seed]))
                row[f"{name}_inertia"] = float(np.mean([inertia(xs, lab) for _, lab in per_seed]))
            row["sklearn_over_torch_cpu"] = row["sklearn_s"] / row["torch_cpu_s"]
            if cuda:
                row["sklearn_over_torch_cuda"] = row["sklearn_s"] / row["torch_cuda_s"]
            rows.append(row)
            say(f"  N {n:>6} n_init {n_init:>2}: torch cpu {row['torch_cpu_s']:.3f}s (purity {row['torch_cpu_purity']:.3f}, "
                f"inertia {row['torch_cpu_inertia']:.0f}) | sklearn {row['sklearn_s']:.3f}s (purity "
                f"{row['sklearn_purity']:.3f}, inertia {row['sklearn_inertia']:.0f}) "
                f"| sklearn/torch-cpu {row['sklearn_over_torch_cpu']:.2f}x"
                + (f" | torch cuda {row['torch_cuda_s']:.4f}s, sklearn/torch-cuda {row['sklearn_over_torch_cuda']:.1f}x"
                   if cuda else ""))
    return rows


def measure_diagnosis_kmeans(device, repeats: int) -> dict:
    """diagnose_purity (scaling, k-means n_init 10, purity) for both modalities on both splits."""
    total = 0.0
    parts = {}
    for split in ("train", "val"):
        for m, seed in (("audio", 1), ("visual", 2)):
            x, y = synthetic_features(CREMAD[split], seed=seed + 10 * (split == "val"))
            xd = torch.from_numpy(x).to(device)
            s, _ = timed(lambda: diagnose_purity(xd, y, 6, n_init=10, seed=0), repeats, device)
            parts[f"{m}_{split}"] = s
            total += s
    return {"seconds": total, "parts": parts}


def extrapolate(model: dict, kmeans_s: float, loader_train: float = math.inf, loader_eval: float = math.inf) -> dict:
    """Epoch and diagnosis seconds at CREMA-D scale from per-sample rates (samples/s)."""
    train = min(model["train"], loader_train)
    evaluate = min(model["eval"], loader_eval)
    epoch = CREMAD["train"] / train + (CREMAD["val"] + CREMAD["test"]) / evaluate
    extraction = CREMAD["train"] / evaluate  # val features come from the epoch's val evaluation
    diagnosis = extraction + kmeans_s
    return {"epoch_s": epoch, "extraction_s": extraction, "kmeans_s": kmeans_s, "diagnosis_s": diagnosis,
            "diagnosis_over_epoch": diagnosis / epoch}


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def machine(device) -> dict:
    import PIL
    import sklearn
    import torchvision

    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "sklearn": sklearn.__version__, "numpy": np.__version__, "pillow": PIL.__version__,
            "device": str(device), "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}
    try:
        from threadpoolctl import threadpool_info

        info["sklearn_threads"] = max((p.get("num_threads", 0) for p in threadpool_info() if p.get("user_api") == "openmp"),
                                      default=None)
    except ImportError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["gpu_bf16"] = torch.cuda.is_bf16_supported()
    return info


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="seconds: small counts and reduced model shapes (development only)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="device of the model, the device "
                   "transform and torch k-means (default: auto = CUDA when present)")
    p.add_argument("--json", default=None, help="results file (default: runs/bench/bench_<device>_<full|quick>.json)")
    p.add_argument("--workdir", default=None, help="folder for the generated data (default: a temporary folder, removed)")
    p.add_argument("--clips", type=int, default=None, help="generated clips (full: 240, quick: 18)")
    p.add_argument("--loader_samples", type=int, default=None, help="samples per loader measurement (full: 320)")
    p.add_argument("--batch_size", type=int, default=None, help="training batch (full: 64 on CUDA, 16 on a CPU)")
    p.add_argument("--train_steps", type=int, default=None, help="timed training steps per mode (full: 20 on CUDA, 3 on a CPU)")
    p.add_argument("--kmeans_sizes", default=None, help="comma-separated N for the k-means comparison (full: 5000,20000,50000)")
    p.add_argument("--kmeans_n_init", default=None, help="comma-separated n_init values, the same for both (full: 1,10)")
    p.add_argument("--kmeans_seeds", type=int, default=None, help="seeds per k-means measurement, means reported (full: 3)")
    p.add_argument("--repeats", type=int, default=None, help="timings of k-means are the best of this many runs (full: 1)")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: loader, train, diagnosis, kmeans")
    args = p.parse_args(argv)
    mode = "quick" if args.quick else "full"
    prof = dict(PROFILES[mode])
    for key in ("clips", "loader_samples", "batch_size", "train_steps", "kmeans_sizes", "kmeans_n_init", "kmeans_seeds",
                "repeats"):
        if getattr(args, key) is not None:
            prof[key] = getattr(args, key)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    cuda = device.type == "cuda"
    prof["batch_size"] = prof["batch_size"] or (64 if cuda else 16)
    prof["train_steps"] = prof["train_steps"] or (20 if cuda else 3)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    results = {"mode": mode, "command": [sys.executable] + sys.argv, "machine": machine(device), "profile": prof,
               "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    say(f"bench ({mode}) on {results['machine']['cpu']} x {os.cpu_count()} CPUs"
        + (f", {results['machine']['gpu']}" if cuda else "") + f"; torch {torch.__version__}; device {device}")
    if mode == "quick":
        say("QUICK MODE: reduced counts and model shapes; for development, not for BENCHMARKS.md")

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="dnr_bench_"))
    t0 = time.perf_counter()
    try:
        folder = work / "cremad"
        if not (folder / "manifest.json").is_file():
            make_cremad_like(folder, prof["clips"], prof["audio_frames"])
        rc = prepare_main(["pack", "--data_path", str(folder), "--workers", str(os.cpu_count() or 1),
                           "--progress", "off"])
        if rc != 0:
            raise SystemExit(f"pack failed ({rc})")
        results["data"] = {"clips": prof["clips"], "stored_frames": STORED_FRAMES, "frame": [FRAME_H, FRAME_W, 3],
                           "jpeg_quality": JPEG_QUALITY, "jpeg_bytes_mean": float(np.mean(
                               [p.stat().st_size for p in (folder / FRAMES_DIR).rglob("*.jpg")])),
                           "audio": [1, 128, prof["audio_frames"]]}
        say(f"data: {prof['clips']} clips, mean JPEG {results['data']['jpeg_bytes_mean'] / 1e3:.0f} kB, in {folder} "
            f"({time.perf_counter() - t0:.1f}s)")

        if "loader" not in skip:
            say(f"loader (num_workers=0, 1 thread, {prof['loader_samples']} samples, {prof['image_size']} px):")
            lo = measure_loaders(folder, prof["loader_samples"], prof["image_size"], device)
            for split in ("train", "eval"):
                lo[f"cache_cpu_over_jpeg_{split}"] = lo["cache_cpu"][split] / lo["jpeg"][split]
                lo[f"cache_gpu_raw_over_jpeg_{split}"] = lo["cache_gpu_raw"][split] / lo["jpeg"][split]
            results["loader"] = lo
            for key in ("jpeg", "cache_cpu", "cache_gpu_raw"):
                say(f"  {key:>14}: train {lo[key]['train']:8.1f} samples/s/core, eval {lo[key]['eval']:8.1f}")
            say(f"  {'device transform':>14}: train {lo['device_transform']['train']:8.1f} samples/s on {device}, "
                f"eval {lo['device_transform']['eval']:8.1f}")
            say(f"  ratios (target >= 5x): cache_cpu/jpeg train {lo['cache_cpu_over_jpeg_train']:.2f}x, eval "
                f"{lo['cache_cpu_over_jpeg_eval']:.2f}x; cache_gpu_raw/jpeg train {lo['cache_gpu_raw_over_jpeg_train']:.2f}x, "
                f"eval {lo['cache_gpu_raw_over_jpeg_eval']:.2f}x")

        if "train" not in skip:
            from dnr.data.base import DatasetInfo, ModalitySpec

            size = prof.get("model_image_size", prof["image_size"])
            frames = prof.get("model_audio_frames", prof["audio_frames"])
            info = DatasetInfo("cremad", EMOTIONS, (ModalitySpec("audio", "spectrogram", (1, 128, frames)),
                                                    ModalitySpec("visual", "frames", (2, 3, size, size))))
            say(f"train/eval (real model; audio (1, 128, {frames}), visual (2, 3, {size}, {size}); batch "
                f"{prof['batch_size']}, {prof['train_steps']} timed steps; eval batch {2 * prof['batch_size']}):")
            rates = model_rates(info, device, prof["batch_size"], prof["train_steps"])
            base = rates["eager"]
            for name, r in rates.items():
                if "train" in r:
                    r["train_over_eager"] = r["train"] / base["train"]
                    r["eval_over_eager"] = r["eval"] / base["eval"]
            results["model"] = {"rates": rates, "batch_size": prof["batch_size"], "steps": prof["train_steps"],
                                "shapes": {"audio": [1, 128, frames], "visual": [2, 3, size, size]}}
            say("  ratios vs eager: " + ", ".join(f"{n} train {r['train_over_eager']:.2f}x eval {r['eval_over_eager']:.2f}x"
                                                  for n, r in rates.items() if "train" in r and n != "eager"))

        if "diagnosis" not in skip and "model" in results:
            km = measure_diagnosis_kmeans(device, prof["repeats"])
            say(f"diagnosis k-means (MEASURED, {device}, n_init 10, N {CREMAD['train']} and {CREMAD['val']}, 2 modalities): "
                f"{km['seconds']:.2f}s")
            diag = {"kmeans": km, "assumption": "epoch = 5954/train rate + 1488/eval rate; diagnosis = 5954/eval rate "
                                                "(val features kept from the val evaluation) + measured k-means; rates measured here; loader paths scaled "
                                                "linearly to all CPU cores (workers) -- an assumption"}
            cores = os.cpu_count() or 1
            for name, r in results["model"]["rates"].items():
                if "train" not in r:
                    continue
                diag[name] = {"model_only": extrapolate(r, km["seconds"])}
                if "loader" in results:
                    lo = results["loader"]
                    for key in ("jpeg", "cache_cpu", "cache_gpu_raw"):
                        lt, le = lo[key]["train"] * cores, lo[key]["eval"] * cores
                        if key == "cache_gpu_raw":  # plus the device transform, in series on the device
                            dt = lo["device_transform"]
                            model_t = 1 / (1 / r["train"] + 1 / dt["train"])
                            model_e = 1 / (1 / r["eval"] + 1 / dt["eval"])
                            diag[name][f"{key}_x{cores}_workers"] = extrapolate({"train": model_t, "eval": model_e},
                                                                                km["seconds"], lt, le)
                        else:
                            diag[name][f"{key}_x{cores}_workers"] = extrapolate(r, km["seconds"], lt, le)
            results["diagnosis"] = diag
            say("diagnosis vs one epoch at CREMA-D scale (EXTRAPOLATED from the measured rates; target < 30%):")
            for name, d in diag.items():
                if not isinstance(d, dict) or "model_only" not in d:
                    continue
                e = d["model_only"]
                say(f"  {name:>20}: model only: epoch {e['epoch_s']:.1f}s, diagnosis {e['diagnosis_s']:.1f}s (extraction "
                    f"{e['extraction_s']:.1f}s + k-means {e['kmeans_s']:.2f}s) = {100 * e['diagnosis_over_epoch']:.1f}%"
                    + "".join(f" | {how.replace('_workers', ' workers')}: {100 * v['diagnosis_over_epoch']:.1f}% "
                              f"(epoch {v['epoch_s']:.0f}s)" for how, v in d.items() if how != "model_only"))

        if "kmeans" not in skip:
            sizes = [int(s) for s in str(prof["kmeans_sizes"]).split(",")]
            n_inits = [int(s) for s in str(prof["kmeans_n_init"]).split(",")]
            say(f"k-means, torch vs scikit-learn (D 512, k 6, same n_init, same float32 features; torch threads "
                f"{torch.get_num_threads()}, sklearn threads {results['machine'].get('sklearn_threads')}):")
            results["kmeans"] = measure_kmeans(sizes, n_inits, prof["repeats"], cuda, prof["kmeans_seeds"])
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    results["seconds"] = time.perf_counter() - t0
    path = Path(args.json or ROOT / "runs" / "bench" / f"bench_{device.type}_{mode}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
    say(f"done in {results['seconds']:.0f}s; results in {path}")
    return results


if __name__ == "__main__":
    main()
