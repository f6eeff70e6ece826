#!/usr/bin/env python3
"""The GPU checks and timings in one short run, for a session that has a GPU:

    python bench/gpu_check.py --out runs/bench/gpu            # on a CUDA machine (about 5 minutes)
    python bench/gpu_check.py --allow_cpu --out runs/bench/cpu_check   # the same steps on a CPU, shrunk

Steps (each prints PASS/FAIL and its time; a failed step does not stop the others):
  1. the device: CUDA available, card name, capability, bf16 support, torch/CUDA versions;
  2. the trainer, one epoch on the tiny built-in dataset, with --amp bf16 --channels_last and with
     --amp fp16 --channels_last (CUDA only: fp16 needs it);
  3. the trainer, two epochs and a diagnosis on generated CREMA-D-shaped data (360 x 480 JPEG
     frames, 1 x 128 x 1024 fbank), packed, with --frame_cache gpu and --frame_cache cpu, AMP,
     channels_last and 2 DataLoader workers;
  4. k-means on the GPU against the CPU (torch) and scikit-learn: time, purity, inertia, and that
     the labels stay on the features' device;
  5. the benchmark (bench/bench.py; full mode on CUDA, --quick on a CPU; extra arguments after
     `--` go to it).
Everything is written under --out: the runs, gpu_check.json (all results) and bench.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "code"))
sys.path.insert(0, str(ROOT / "bench"))

import bench  # noqa: E402

TINY = ["--builtin_train_size", "64", "--builtin_val_size", "32", "--builtin_test_size", "32",
        "--builtin_image_size", "32", "--batch_size", "16", "--epochs", "1", "--reinit_epoch", "0",
        "--progress", "off"]


def say(*a) -> None:
    print(*a, flush=True)


def step(name: str, results: dict):
    """Decorator-like runner: results[name] = {"ok", "seconds", ...} and a PASS/FAIL line."""
    def run(fn):
        start = time.perf_counter()
        try:
            out = fn() or {}
            results[name] = {"ok": True, **out}
        except Exception as err:  # noqa: BLE001  (report every step)
            results[name] = {"ok": False, "error": f"{type(err).__name__}: {err}",
                             "traceback": traceback.format_exc(limit=6)}
        results[name]["seconds"] = time.perf_counter() - start
        r = results[name]
        say(f"[{'PASS' if r['ok'] else 'FAIL'}] {name} ({r['seconds']:.1f}s)"
            + ("" if r["ok"] else f": {r['error']}"))
        return r
    return run


def trainer_run(argv, out: Path) -> dict:
    import main as trainer

    rc = trainer.cli(argv + ["--ckpt_path", str(out)])
    if rc != 0:
        raise RuntimeError(f"main.py exited with {rc}: {' '.join(argv)}")
    res = json.loads((out / "results.json").read_text())
    return {"test_acc": res["test"]["acc"], "seconds_run": res["seconds"], "device": res["device"],
            "amp": res["amp"], "argv": argv}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "runs" / "bench" / "gpu_check"), help="output folder")
    p.add_argument("--allow_cpu", action="store_true", help="run the CPU-safe steps without a GPU (shrunk)")
    p.add_argument("bench_args", nargs="*", help="after --: extra arguments for bench/bench.py")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    results: dict = {"command": [sys.executable] + sys.argv}

    @step("1 device", results)
    def _():
        info = {"torch": torch.__version__, "cuda_available": cuda, "cuda": torch.version.cuda}
        if cuda:
            info.update(name=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                        bf16=torch.cuda.is_bf16_supported(), count=torch.cuda.device_count(),
                        memory_gib=torch.cuda.get_device_properties(0).total_memory / 2**30)
            say(f"    GPU: {info['name']} (capability {info['capability']}, {info['memory_gib']:.0f} GiB, bf16 "
                f"{info['bf16']}); torch {torch.__version__}, CUDA {torch.version.cuda}")
        else:
            say(f"    no CUDA device (torch {torch.__version__}, built with CUDA {torch.version.cuda})")
            if not args.allow_cpu:
                raise RuntimeError("no CUDA device; pass --allow_cpu to run the CPU-safe steps")
        return info

    if not cuda and not args.allow_cpu:
        (out / "gpu_check.json").write_text(json.dumps(results, indent=1) + "\n")
        return results
    device = "cuda" if cuda else "cpu"
    amps = ["bf16", "fp16"] if cuda else ["bf16"]

    for amp in amps:
        step(f"2 trainer builtin --amp {amp} --channels_last", results)(
            lambda amp=amp: trainer_run(TINY + ["--device", device, "--amp", amp, "--channels_last"],
                                        out / f"builtin_{amp}"))

    data = out / "data" / "cremad"

    @step("3a generate and pack CREMA-D-shaped data", results)
    def _():
        if not (data / "manifest.json").is_file():
            bench.make_cremad_like(data, 48 if cuda else 24)
        from dnr.data.prepare import main as prepare_main

        if prepare_main(["pack", "--data_path", str(data), "--progress", "off"]) != 0:
            raise RuntimeError("pack failed")
        return {"folder": str(data)}

    size = "224" if cuda else "32"  # the real input size on a GPU; shrunk on a CPU
    for cache in ("gpu", "cpu"):
        amp = amps[-1]

        def cremad_run(cache=cache, amp=amp):
            # Two epochs and a diagnosis after the second: features through the device transform,
            # k-means on the training device, inside the trainer.
            r = trainer_run(["--dataset", "cremad", "--data_path", str(data), "--cremad_audio", "fbank",
                             "--cremad_image_size", size, "--frame_cache", cache, "--device", device, "--amp", amp,
                             "--channels_last", "--batch_size", "8", "--epochs", "2", "--reinit_epoch", "1",
                             "--reinit_num", "1", "--no-probe", "--progress", "off", "--num_workers", "2"],
                            out / f"cremad_{cache}")
            diagnoses = json.loads((out / f"cremad_{cache}" / "results.json").read_text())["diagnoses"]
            if len(diagnoses) != 1:
                raise RuntimeError(f"expected one diagnosis, got {diagnoses}")
            return {**r, "diagnosis_seconds": diagnoses[0]["seconds"], "purity": diagnoses[0]["purity"]}

        step(f"3b trainer cremad --frame_cache {cache} --amp {amp} --channels_last, with a diagnosis", results)(cremad_run)

    @step("4 k-means GPU vs CPU vs scikit-learn", results)
    def _():
        from sklearn.cluster import KMeans

        from dnr.diagnose import kmeans, minmax_scale, purity_score

        n = 20000 if cuda else 3000
        features, y = bench.synthetic_features(n)
        xt = minmax_scale(torch.from_numpy(features))  # what the diagnosis clusters
        x = xt.numpy()
        row = {"n": n, "n_init": 10}
        kmeans(xt[:500], 6, n_init=2)
        row["torch_cpu_s"], lab = bench.timed(lambda: kmeans(xt, 6, n_init=10, seed=0), 1)
        row["torch_cpu_purity"], row["torch_cpu_inertia"] = purity_score(y, lab), bench.inertia(x, lab.numpy())
        row["sklearn_s"], lab = bench.timed(lambda: KMeans(6, n_init=10, random_state=0).fit_predict(x), 1)
        row["sklearn_purity"], row["sklearn_inertia"] = purity_score(y, lab), bench.inertia(x, lab)
        if cuda:
            xg = xt.cuda()
            kmeans(xg[:500], 6, n_init=2)
            row["torch_cuda_s"], lab = bench.timed(lambda: kmeans(xg, 6, n_init=10, seed=0), 1, "cuda")
            if lab.device.type != "cuda":
                raise RuntimeError(f"k-means on CUDA features returned labels on {lab.device}")
            row["torch_cuda_purity"], row["torch_cuda_inertia"] = purity_score(y, lab.cpu()), bench.inertia(x, lab.cpu().numpy())
            row["sklearn_over_torch_cuda"] = row["sklearn_s"] / row["torch_cuda_s"]
        row["sklearn_over_torch_cpu"] = row["sklearn_s"] / row["torch_cpu_s"]
        say("    " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
        return row

    @step("5 benchmark", results)
    def _():
        extra = list(args.bench_args) + ([] if cuda else ["--quick"])
        return {"json": str(out / "bench.json"),
                "summary": _bench_summary(bench.main(["--device", device, "--json", str(out / "bench.json")] + extra))}

    failed = [k for k, v in results.items() if isinstance(v, dict) and not v.get("ok", True)]
    results["failed"] = failed
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    say(f"gpu_check: {len(failed)} failed step(s){': ' + ', '.join(failed) if failed else ''}; "
        f"results in {out / 'gpu_check.json'}")
    return results


def _bench_summary(r: dict) -> dict:
    keep = {"machine": r.get("machine")}
    if "loader" in r:
        keep["loader"] = {k: v for k, v in r["loader"].items() if "over" in k}
    if "model" in r:
        keep["train_rates"] = {k: v.get("train") for k, v in r["model"]["rates"].items()}
    return keep


if __name__ == "__main__":
    res = main()
    sys.exit(1 if res.get("failed") or not res.get("1 device", {}).get("ok") else 0)
