#!/usr/bin/env python3
"""How much does a D&R diagnosis move with the k-means seed? (never run by the tests)

The published method clusters once, with one fixed seed. This measures, on the features of a
finished run's kept epochs (`--keep_every`), the spread of each purity and of the strength
tanh(lambda |P_train - P_val|) over --seeds k-means seeds (seed r for both splits), for each
k-means backend and number of restarts (n_init), and how long one k-means takes. The README's
table ("How sure is a diagnosis") was made with:

    OMP_NUM_THREADS=1 OUT=runs/purity_spread_baseline sh script/baseline.sh --keep_every 5
    OMP_NUM_THREADS=1 python bench/purity_spread.py runs/purity_spread_baseline --epochs 5 10 15 \\
        --json runs/purity_spread.json > runs/purity_spread.md

i.e. the baseline with the demo settings of script/baseline.sh (30 epochs, lr 0.01), at the epochs
its D&R diagnoses follow (0-based 5, 10, 15). Prints markdown; --json keeps every purity. The same
with SEED=1 and SEED=2 (into runs/purity_spread_baseline_seed1, --json runs/purity_spread_seed1.json,
...), then the summary over every diagnosis of the three runs, from the JSON files alone:

    python bench/purity_spread.py --summarize runs/purity_spread.json runs/purity_spread_seed1.json \
        runs/purity_spread_seed2.json
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "script"))
sys.path.insert(0, str(ROOT / "code"))
import diagnose as cli  # noqa: E402  (script/diagnose.py: finds, checks and loads a run's checkpoint)
from dnr.diagnose import diagnose_purity  # noqa: E402
from dnr.engine import extract_features  # noqa: E402


def measure(feats, labels, k, backend, n_init, seeds):
    """Every seed's purity (seed r = 0 .. seeds-1) and the mean seconds of one k-means."""
    start = time.perf_counter()
    est = diagnose_purity(feats, labels, k, seed=0, n_init=n_init, backend=backend, repeats=seeds, spread=True)
    return list(est.values), (time.perf_counter() - start) / seeds


def fmt(values, digits=3):
    v = np.asarray(values, dtype=float)
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


def grouped_strength_std(rows, repeats: int, lam: float) -> float:
    """The std of the strength that --diagnosis_repeats R applies (tanh(lam |mean of R train purities -
    mean of R val purities|)), measured: each diagnosis's seeds cut into disjoint groups of R, one
    strength per group, the within-diagnosis variances pooled over the diagnoses."""
    variances = []
    for r in rows:
        tr, va = np.asarray(r["purity"]["train"]), np.asarray(r["purity"]["val"])
        groups = [slice(i, i + repeats) for i in range(0, len(tr) - repeats + 1, repeats)]
        if len(groups) < 2:
            return math.nan
        alpha = [math.tanh(lam * abs(tr[g].mean() - va[g].mean())) for g in groups]
        variances.append(np.var(alpha, ddof=1))
    return float(np.sqrt(np.mean(variances)))


def summarize(files) -> str:
    """Per modality, backend and n_init, over every diagnosis of every file: the mean (and the
    largest) std over the k-means seeds, the widest range of the strength, and the std of the
    strength from the mean purities of R seeds (measured on disjoint groups of seeds; std / sqrt(R)
    in brackets, the estimate for independent seeds)."""
    groups, lam = {}, None
    for f in files:
        data = json.loads(Path(f).read_text())
        lam = data["lam"]
        for r in data["rows"]:
            groups.setdefault((r["modality"], r["backend"], r["n_init"]), []).append(r)
    head = ["modality", "backend", "n_init", "diagnoses", "std purity train", "std purity val",
            "std strength, R = 1 (largest)", "widest strength range", "std strength, R = 5 (≈ /√5)",
            "std strength, R = 10 (≈ /√10)", "s / k-means"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (m, backend, n_init), rows in sorted(groups.items()):
        def std(get):
            return [float(np.std(get(r), ddof=1)) for r in rows]

        sa = std(lambda r: r["alpha"])
        r5, r10 = (grouped_strength_std(rows, R, lam) for R in (5, 10))
        out.append(f"| {m} | {backend} | {n_init} | {len(rows)} | {np.mean(std(lambda r: r['purity']['train'])):.3f} | "
                   f"{np.mean(std(lambda r: r['purity']['val'])):.3f} | {np.mean(sa):.3f} ({max(sa):.3f}) | "
                   f"{max(max(r['alpha']) - min(r['alpha']) for r in rows):.3f} | "
                   f"{r5:.3f} ({np.mean(sa) / math.sqrt(5):.3f}) | {r10:.3f} ({np.mean(sa) / math.sqrt(10):.3f}) | "
                   f"{np.mean([r['seconds'] for r in rows]):.2f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, nargs="?", help="a run folder with epoch_XXX.pth files (trained with --keep_every)")
    p.add_argument("--epochs", type=int, nargs="+", default=[5, 10, 15], help="0-based epochs (default: 5 10 15)")
    p.add_argument("--seeds", type=int, default=20, help="k-means seeds 0 .. N-1 (default: 20)")
    p.add_argument("--n_init", type=int, nargs="+", default=[1, 10], help="k-means restarts (default: 1 10)")
    p.add_argument("--backends", nargs="+", default=["torch", "sklearn"], help="(default: torch sklearn)")
    p.add_argument("--lam", type=float, default=3.0, help="lambda of the strength (default: 3)")
    p.add_argument("--json", type=Path, default=None, help="also write every purity here")
    p.add_argument("--summarize", type=Path, nargs="+", default=None, metavar="JSON",
                   help="measure nothing: the summary table over these --json files")
    args = p.parse_args(argv)
    if args.summarize:
        print(summarize(args.summarize))
        return 0
    if args.run is None:
        p.error("give a run folder, or --summarize JSON ...")

    start = time.perf_counter()
    logged = {}  # the run's own diagnoses (torch, its n_init, seed 0): a check that the features match
    log = args.run / "log.jsonl"
    if log.is_file():
        for line in log.read_text().splitlines():
            rec = json.loads(line)
            if "diagnosis" in rec:
                logged[rec["epoch"]] = rec["diagnosis"]
    rows, raw = [], []
    run_args = None
    for epoch in args.epochs:
        path = cli.checkpoint_path(args.run, ("epoch", epoch))
        saved, splits, model, evals = cli.load_run(path, args.run, "cpu")
        run_args = saved["args"]
        k = splits.info.num_classes
        feats = {s: extract_features(model, evals[s], torch.device("cpu"), device_transform=splits.device_transform)
                 for s in ("train", "val")}
        for m in splits.info.modality_names:
            for backend in args.backends:
                for n_init in args.n_init:
                    purity, secs = {}, 0.0
                    for s in ("train", "val"):
                        purity[s], t = measure(feats[s][0][m], feats[s][1], k, backend, n_init, args.seeds)
                        secs += t / 2
                    alpha = [math.tanh(args.lam * abs(a - b)) for a, b in zip(purity["train"], purity["val"])]
                    check = ""
                    if backend == "torch" and n_init == run_args["kmeans_n_init"] and epoch in logged:
                        d = logged[epoch]
                        same = (d["purity"][m]["train"], d["purity"][m]["val"]) == (purity["train"][0], purity["val"][0])
                        check = "same as the run's log" if same else "DIFFERS from the run's log"
                    rows.append(dict(epoch=epoch, modality=m, backend=backend, n_init=n_init, purity=purity,
                                     alpha=alpha, seconds=secs, check=check))
                    raw.append(rows[-1])
                    print(f"[purity_spread] epoch {epoch} {m} {backend} n_init {n_init}: strength {fmt(alpha)} "
                          f"({secs:.2f} s per k-means) {check}", file=sys.stderr, flush=True)

    print(f"k-means seeds 0-{args.seeds - 1} on the features of `{args.run}` (method {run_args['method']}, "
          f"{run_args['epochs']} epochs, lr {run_args['learning_rate']}, seed {run_args['random_seed']}); "
          f"strength = tanh({args.lam:g} |P_train - P_val|) with the same seed on both splits; mean ± std over "
          f"the seeds (sample std), [min, max] of the strength; torch {torch.__version__}, "
          f"scikit-learn {__import__('sklearn').__version__}, Python {platform.python_version()}, "
          f"{torch.get_num_threads()} thread(s); {time.perf_counter() - start:.0f} s in all.\n")
    head = ["after epoch", "modality", "backend", "n_init", "purity train", "purity val", "strength",
            "strength [min, max]", "strength, seed 0", "s / k-means"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        a = r["alpha"]
        print(f"| {r['epoch']} | {r['modality']} | {r['backend']} | {r['n_init']} | {fmt(r['purity']['train'])} | "
              f"{fmt(r['purity']['val'])} | {fmt(a)} | [{min(a):.3f}, {max(a):.3f}] | {a[0]:.3f} | "
              f"{r['seconds']:.2f} |")
    checks = sorted({r["check"] for r in rows if r["check"]})
    if checks:
        print(f"\nSeed 0 of torch with the run's n_init against the diagnoses in its log.jsonl: {'; '.join(checks)}.")
    if args.json:
        args.json.write_text(json.dumps({"run": str(args.run), "seeds": args.seeds, "lam": args.lam,
                                         "rows": raw}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
