"""Markdown tables of one benchmark JSON written by bench.py (what BENCHMARKS.md quotes).

    python bench/tables.py runs/bench/bench_cpu_full.json

Prints the machine, the command and the four result tables; every number is read from the file.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def x(v: float) -> str:
    return f"{v:.2f}x"


def machine(r: dict) -> str:
    m = r["machine"]
    rows = [
        ("CPU", f"{m['cpu']}, {m['cpu_count']} cores (torch threads {m['torch_threads']}, "
                f"scikit-learn threads {m.get('sklearn_threads', '?')}), capability {m.get('cpu_capability', '?')}"),
        ("GPU", m.get("gpu") or "none: CPU figures only"),
        ("software", f"Python {m['python']}, torch {m['torch']}, torchvision {m['torchvision']}, scikit-learn "
                     f"{m['sklearn']}, numpy {m['numpy']}, Pillow {m['pillow']}" + (f", CUDA {m['cuda']}" if m.get("cuda") else "")),
        ("load average at the start", ", ".join(f"{v:.2f}" for v in m["load_average"])),
        ("command", "`" + " ".join(Path(r["command"][0]).name if i == 0 else a for i, a in enumerate(r["command"])) + "`"),
        ("total time", f"{r['seconds']:.0f} s"),
    ]
    return "| | |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)


def loader(r: dict) -> str:
    L = r["loader"]
    out = ["| path | train (samples/s/core) | eval (samples/s/core) | train vs JPEG | eval vs JPEG |",
           "|---|---|---|---|---|",
           f"| JPEG (`--frame_cache off`) | {L['jpeg']['train']:.0f} | {L['jpeg']['eval']:.0f} | 1.00x | 1.00x |"]
    for key, name in (("cache_cpu", "cache, augmentation in the loader (`cpu`)"),
                      ("cache_gpu_raw", "cache, raw uint8 for the device (`gpu`, loader side)")):
        out.append(f"| {name} | {L[key]['train']:.0f} | {L[key]['eval']:.0f} | "
                   f"{x(L[f'{key}_over_jpeg_train'])} | {x(L[f'{key}_over_jpeg_eval'])} |")
    dt = L.get("device_transform")
    if dt:
        out.append(f"| device transform of `gpu` mode on {r['machine']['device']} (whole batches, not per core) | "
                   f"{dt['train']:.0f} | {dt['eval']:.0f} | | |")
    return "\n".join(out)


def model(r: dict) -> str:
    M = r["model"]
    out = [f"Batch {M['batch_size']}, {M['steps']} timed steps per mode; audio {tuple(M['shapes']['audio'])}, "
           f"visual {tuple(M['shapes']['visual'])}.", "",
           "| mode | train (samples/s) | extraction (samples/s) | train vs eager | extraction vs eager |",
           "|---|---|---|---|---|"]
    for name, v in M["rates"].items():
        out.append(f"| {name} | {v['train']:.2f} | {v['eval']:.2f} | {x(v['train_over_eager'])} | {x(v['eval_over_eager'])} |")
    return "\n".join(out)


def diagnosis(r: dict) -> str:
    D = r["diagnosis"]
    modes = [k for k in D if k not in ("kmeans", "assumption")]
    loaders = [k for k in D[modes[0]] if k != "model_only"]
    head = ["| mode | epoch (s) | diagnosis: extraction + k-means (s) | diagnosis / epoch, model only | "
            + " | ".join(f"with {k.replace('_x', ' on ').replace('_workers', ' workers')}" for k in loaders) + " |",
            "|---" * (4 + len(loaders)) + "|"]
    for mode in modes:
        e = D[mode]["model_only"]
        head.append(f"| {mode} | {e['epoch_s']:.0f} | {e['extraction_s']:.0f} + {e['kmeans_s']:.2f} | "
                    f"{100 * e['diagnosis_over_epoch']:.1f}% | "
                    + " | ".join(f"{100 * D[mode][k]['diagnosis_over_epoch']:.1f}%" for k in loaders) + " |")
    parts = ", ".join(f"{k} {v:.2f} s" for k, v in D["kmeans"]["parts"].items())
    return "\n".join(head) + f"\n\nk-means of one diagnosis, measured: {D['kmeans']['seconds']:.2f} s ({parts})."


def kmeans(r: dict) -> str:
    rows = r["kmeans"]
    cuda = any("torch_cuda_s" in row for row in rows)
    out = ["| N | n_init | torch CPU (s) | scikit-learn (s) | sklearn / torch CPU | "
           + ("torch GPU (s) | sklearn / torch GPU | " if cuda else "")
           + "purity torch / sklearn | inertia torch / sklearn |",
           "|---" * (7 + 2 * cuda) + "|"]
    for row in rows:
        out.append(f"| {row['n']:,} | {row['n_init']} | {row['torch_cpu_s']:.3f} | {row['sklearn_s']:.3f} | "
                   f"{x(row['sklearn_over_torch_cpu'])} | "
                   + (f"{row['torch_cuda_s']:.4f} | {row['sklearn_over_torch_cuda']:.1f}x | " if cuda else "")
                   + f"{row['torch_cpu_purity']:.3f} / {row['sklearn_purity']:.3f} | "
                   f"{row['torch_cpu_inertia']:.0f} / {row['sklearn_inertia']:.0f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", type=Path, help="a results file written by bench/bench.py --json")
    a = p.parse_args(argv)
    try:
        r = json.loads(a.json.read_text())
    except (OSError, json.JSONDecodeError) as err:
        print(f"error: cannot read {a.json}: {err}", file=sys.stderr)
        return 2
    sections = [("Machine", "machine", machine), ("1. Loader", "loader", loader),
                ("2. Training step and feature extraction", "model", model),
                ("3. Diagnosis vs one epoch at CREMA-D scale", "diagnosis", diagnosis),
                ("4. k-means", "kmeans", kmeans)]
    for title, key, fn in sections:
        if key in r:
            print(f"### {title}\n\n{fn(r)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
