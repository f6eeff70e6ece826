"""Run methods over seeds through the one trainer, then tabulate and plot them.

Each run is `code/main.py ... --method M --random_seed S --ckpt_path OUT/M_seedS`; a run with a
results.json is re-read, never recomputed; one with only a last.pth is resumed.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence

from .report import find_results, markdown, summarize

MAIN = Path(__file__).resolve().parents[1] / "main.py"


def expand_methods(methods: Sequence[str], modalities: Sequence[str]) -> List[List[str]]:
    """'unimodal' becomes one uni-modal run per modality; 'unimodal:NAME' names one. Returns the
    main.py flags of each entry."""
    runs = []
    for m in methods:
        if m == "unimodal":
            runs += [["--method", "unimodal", "--unimodal_modality", name] for name in modalities]
        elif m.startswith("unimodal:"):
            runs.append(["--method", "unimodal", "--unimodal_modality", m.split(":", 1)[1]])
        else:
            runs.append(["--method", m])
    return runs


def run_name(flags: Sequence[str], seed: int) -> str:
    method = flags[flags.index("--method") + 1]
    if method == "unimodal":
        method += "_" + flags[flags.index("--unimodal_modality") + 1]
    return f"{method}_seed{seed}"


def last_wins(argv: Sequence[str]) -> List[str]:
    """The flags as main.py will read them: when a flag is given twice (a script's default, then the
    user's value), only the last one is kept, so the printed command shows the value used.
    `--no-X` and `--X` count as the same flag."""
    groups: List[List[str]] = []
    for token in argv:
        if token.startswith("--") or not groups:
            groups.append([token])
        else:
            groups[-1].append(token)

    def key(group):
        name = group[0].split("=", 1)[0]
        return "--" + name[5:] if name.startswith("--no-") else name

    last = {key(g): i for i, g in enumerate(groups)}
    return [t for i, g in enumerate(groups) if last[key(g)] == i for t in g]


def run_all(out: Path, methods: Sequence[str], seeds: Sequence[int], modalities: Sequence[str],
            extra: Sequence[str], python: str = sys.executable) -> List[Path]:
    done = []
    failed = out / "failed.txt"
    failed.unlink(missing_ok=True)  # earlier failures are retried now
    for flags in expand_methods(methods, modalities):
        for seed in seeds:
            folder = out / run_name(flags, seed)
            if (folder / "results.json").exists():
                print(f"[compare] {folder}: finished earlier, re-read", flush=True)
                done.append(folder)
                continue
            cmd = [python, str(MAIN), *last_wins([*extra, *flags, "--random_seed", str(seed),
                                                  "--ckpt_path", str(folder)])]
            if (folder / "last.pth").exists():
                cmd.append("--resume")
            print("[compare] " + " ".join(cmd), flush=True)
            rc = subprocess.run(cmd).returncode
            if rc != 0:  # one failed run (e.g. a diverging method) must not stop the comparison
                print(f"[compare] {folder}: FAILED with exit status {rc}; see its output above", flush=True)
                with failed.open("a") as f:
                    f.write(f"{folder.name}: exit status {rc}\n")
                continue
            done.append(folder)
    return done


def read_curves(folder: Path) -> Dict[str, List[float]]:
    """Per-epoch test accuracy (fused and per modality) from a run's log.jsonl."""
    curves: Dict[str, List[float]] = {}
    for line in (folder / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        for k, v in rec["test"].items():
            if k == "acc" or k.startswith("acc_"):
                curves.setdefault(k, []).append(v)
    return curves


def read_purity(folder: Path) -> Dict[str, Dict[int, float]]:
    """Purity per epoch from a run's log.jsonl: {"<modality>/<split>": {epoch: purity}}, from
    --track_purity_every's records, or, for runs without them, from the diagnoses (D&R's, or
    --track_purity's), which are fewer points."""
    tracked: Dict[str, Dict[int, float]] = {}
    diagnosed: Dict[str, Dict[int, float]] = {}
    for line in (folder / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        for key, into in (("tracked_purity", tracked), ("diagnosis", diagnosed)):
            for m, p in rec.get(key, {}).get("purity", {}).items():
                for split, value in p.items():
                    into.setdefault(f"{m}/{split}", {})[rec["epoch"]] = value
    return tracked or diagnosed


def _mean_band(series: List[Dict[int, float]]):
    """Epochs present in every seed's series, and the mean and std over the seeds there."""
    import numpy as np

    epochs = sorted(set.intersection(*(set(s) for s in series)))
    arr = np.array([[s[e] for e in epochs] for s in series])
    return np.array(epochs), arr.mean(0), arr.std(0)


def plot(runs: List[dict], path: Path) -> None:
    """Test accuracy per epoch (mean over seeds with a +/- std band), one line per method; one panel
    for the fused prediction and one per modality (head-slice accuracy). Below each modality's
    accuracy, when runs recorded it: its purity per epoch (train solid, val dashed), per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups: Dict[str, List[Dict[str, List[float]]]] = {}
    purity: Dict[str, List[Dict[str, Dict[int, float]]]] = {}
    modalities: List[str] = []
    for r in runs:
        label = r["method"] + ("" if len(r["modalities"]) > 1 else f" ({r['modalities'][0]} only)")
        groups.setdefault(label, []).append(read_curves(Path(r["_path"])))
        purity.setdefault(label, []).append(read_purity(Path(r["_path"])))
        modalities += [m for m in r["modalities"] if m not in modalities]
    # One colour per method in every panel, distinct for up to 40 methods (tab10 repeats after 10).
    palette = ([f"C{i}" for i in range(10)] if len(groups) <= 10 else plt.get_cmap("tab20").colors
               + (plt.get_cmap("tab20b").colors if len(groups) > 20 else ()))
    colours = {label: palette[i % len(palette)] for i, label in enumerate(sorted(groups))}
    panels = ["acc"] + [f"acc_{m}" for m in modalities]
    with_purity = any(p for ps in purity.values() for p in ps)
    rows = 2 if with_purity else 1
    fig, axes = plt.subplots(rows, len(panels), figsize=(5 * len(panels), 4 * rows), squeeze=False)
    for ax, key in zip(axes[0], panels):
        for label, curves in sorted(groups.items()):
            series = [c[key] for c in curves if key in c]
            if not series:
                continue
            n = min(len(s) for s in series)
            arr = np.array([s[:n] for s in series]) * 100
            mean, std = arr.mean(0), arr.std(0)
            ax.plot(np.arange(n), mean, label=label, color=colours[label])
            ax.fill_between(np.arange(n), mean - std, mean + std, alpha=0.2, color=colours[label])
        ax.set_title("test accuracy (fused)" if key == "acc" else f"test accuracy, {key[4:]} (head slice)")
        ax.set_xlabel("epoch")
        ax.set_ylabel("%")
        ax.grid(alpha=0.3)
    # A legend of many methods would cover the fused panel's curves: it goes to the free cell below it.
    if with_purity and len(groups) > 6:
        handles, labels = axes[0][0].get_legend_handles_labels()
        axes[1][0].legend(handles, labels, fontsize=7, ncol=2, loc="upper left", frameon=False)
    else:
        axes[0][0].legend(fontsize=8)
    if with_purity:
        axes[1][0].axis("off")
        axes[1][0].text(0.0, 0.0, "below each modality's accuracy:\nthe k-means purity of its encoder's\nfeatures "
                        "(mean over seeds),\ntrain solid, val dashed;\nfrom --track_purity_every, else the\n"
                        "diagnoses (D&R's or --track_purity's)", fontsize=9, va="bottom")
        for ax, m in zip(axes[1][1:], modalities):
            if not any(f"{m}/train" in p for ps in purity.values() for p in ps):
                ax.text(0.5, 0.5, "no purity recorded", ha="center", va="center", transform=ax.transAxes)
            for label, per_seed in sorted(purity.items()):
                for split, style in (("train", "-"), ("val", "--")):
                    series = [p[f"{m}/{split}"] for p in per_seed if f"{m}/{split}" in p]
                    if len(series) != len(per_seed) or not series:
                        continue
                    epochs, mean, std = _mean_band(series)
                    ax.plot(epochs, mean, style, marker=".", color=colours[label],
                            label=label if split == "train" else None)
                    ax.fill_between(epochs, mean - std, mean + std, alpha=0.12, color=colours[label])
            ax.set_title(f"purity, {m} (train solid, val dashed)")
            ax.set_xlabel("epoch")
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(out: Path, folders: Sequence[Path] = None) -> str:
    runs, unfinished = find_results([out] if folders is None else folders)
    for u in unfinished:
        print(f"[compare] note: {u} is unfinished; left out of the table", flush=True)
    if not runs:
        raise FileNotFoundError(f"no finished run (results.json) under {out}")
    text = markdown(summarize(runs))
    failed = out / "failed.txt"
    if failed.exists():
        text += "\nRuns that failed (not in the table):\n\n" + "".join(
            f"- {line}\n" for line in failed.read_text().splitlines())
    (out / "results.md").write_text(text)
    plot(runs, out / "results.png")
    return text
