"""Results over seeds: read the results.json of finished runs and write a table a paper can quote.

    python script/summarize.py runs/builtin_*          # markdown table on stdout
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, Iterable, List, Sequence, Tuple


def find_results(paths: Iterable) -> Tuple[List[dict], List[Path]]:
    """Every run's results.json at or below the given run folders; also the folders that have a
    last.pth but no results.json yet (unfinished runs), so they are reported, not silently dropped.
    A run's first stages (e.g. UMT's teachers in <run>/teacher_audio) are not runs of their own:
    their seconds are added to the run's ("stage_seconds" lists them), so "seconds" is the whole cost."""
    runs, unfinished = [], []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"no run folder {p}")
        files = [p] if p.is_file() else sorted(p.rglob("results.json"))
        stages = {}  # owning run folder -> {stage name: seconds}
        for f in files:
            owner = _stage_owner(f.parent, p)
            if owner is not None:
                stages.setdefault(owner, {})[f.parent.name] = json.loads(f.read_text()).get("seconds", 0.0)
        for f in files:
            if _stage_owner(f.parent, p) is not None:
                continue
            res = json.loads(f.read_text())
            res["_path"] = str(f.parent)
            if f.parent in stages:
                res["stage_seconds"] = stages[f.parent]
                res["seconds"] = res.get("seconds", 0.0) + sum(stages[f.parent].values())
            runs.append(res)
        if p.is_dir():
            cut = {c.parent for c in p.rglob("last.pth") if not (c.parent / "results.json").exists()}
            cut = {_stage_owner(c, p) or c for c in cut}  # a run cut in a first stage is that run
            unfinished += sorted(c for c in cut if not (c / "results.json").exists())
    return runs, unfinished


def _stage_owner(folder: Path, root: Path):
    """The run folder (one holding args.json) strictly above `folder`, at or below `root`, if any."""
    for parent in folder.parents:
        if (parent / "args.json").exists():
            return parent
        if parent == root or root not in parent.parents:
            return None
    return None


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    vals = [v for v in values if v is not None]
    if not vals:
        return math.nan, math.nan
    m = sum(vals) / len(vals)
    s = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return m, s


def pm(values: Sequence[float], scale: float = 100.0, digits: int = 2) -> str:
    """'mean ± std' over the seeds; one seed has no spread to show: 'mean ± –'."""
    m, s = mean_std(values)
    if math.isnan(m):
        return "-"
    spread = f"{s * scale:.{digits}f}" if sum(v is not None for v in values) > 1 else "–"
    return f"{m * scale:.{digits}f} ± {spread}"


def group(runs: List[dict]) -> Dict[Tuple[str, str, str], List[dict]]:
    """Runs that differ only in their seed: same dataset, method (+ fusion) and modalities."""
    groups: Dict[Tuple[str, str, str], List[dict]] = {}
    for r in runs:
        label = r["method"] + ("" if r.get("fusion", "concat") == "concat" else f" ({r['fusion']})")
        groups.setdefault((r["dataset"], label, "+".join(r["modalities"])), []).append(r)
    for rs in groups.values():
        rs.sort(key=lambda r: r["seed"])
    return groups


def summarize(runs: List[dict]) -> List[dict]:
    rows = []
    groups = group(runs)
    # Multimodal runs first, then runs on fewer modalities; by method within each.
    def order(item):
        (dataset, method, mods), rs = item
        return dataset, -len(rs[0]["modalities"]), method, mods

    for (dataset, method, mods), rs in sorted(groups.items(), key=order):
        modalities = rs[0]["modalities"]
        seeds = [r["seed"] for r in rs]
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"{dataset}/{method}/{mods}: several runs share a seed: "
                             + ", ".join(r["_path"] for r in rs))
        on: Dict[str, List[dict]] = {}  # the row's runs by the machine they ran on
        for r in rs:
            on.setdefault(machine_of(r), []).append(r)
        row = {
            "dataset": dataset, "method": method, "modalities": modalities, "seeds": seeds,
            "test_acc": pm([r["test"]["acc"] for r in rs]),
            "test_macro_f1": pm([r["test"]["macro_f1"] for r in rs]),
            "test_map": pm([r["test"]["map"] for r in rs]),
            "val_acc": pm([r["val"]["acc"] for r in rs]),
            "best_test_acc": pm([r["best_test_acc"] for r in rs]),
            "unimodal": {m: pm([r["unimodal_test_acc"].get(m) for r in rs]) for m in modalities},
            "probe": {m: pm([r.get("probe_test_acc", {}).get(m) for r in rs]) for m in modalities},
            # Shapley contribution to the fused test accuracy, in points; "-" for runs made before it existed.
            "shapley": {m: pm([r.get("shapley_test_acc", {}).get(m) for r in rs]) for m in modalities},
            "cost": cost_of(rs),
            "machines": sorted(on),
            # Seconds compare only within one machine: a row whose seeds ran on several keeps them apart.
            "cost_by_machine": {m: cost_of(ms) for m, ms in on.items()},
            "seconds_by_machine": {m: mean_std([r["seconds"] for r in ms])[0] for m, ms in on.items()},
            "epochs": rs[0]["epochs"],
            "seconds": mean_std([r["seconds"] for r in rs])[0],
            "diagnoses": [],
        }
        n_diag = min(len(r["diagnoses"]) for r in rs)
        for i in range(n_diag):
            ds = [r["diagnoses"][i] for r in rs]
            row["diagnoses"].append({
                "epoch": ds[0]["epoch"],
                "applied": ds[0]["applied"],
                "purity": {m: {s: pm([d["purity"][m][s] for d in ds], scale=1.0, digits=3)
                               for s in ("train", "val")} for m in modalities},
                "alpha": {m: pm([d["alpha"][m] for d in ds], scale=1.0, digits=3) for m in modalities},
            })
        rows.append(row)
    return rows


def machine_of(run: dict) -> str:
    """Where a run's seconds were measured, in words (results.json's versions.machine)."""
    m = run.get("versions", {}).get("machine")
    if not m:
        return "not recorded"
    where = f"{m['cpu']} ({m['cpu_capability']}, {m['threads']} thread{'s' if m['threads'] != 1 else ''})"
    return where + (f", GPU {m['gpu']}" if m.get("gpu") else "")


def cost_of(rs: List[dict]) -> dict:
    """Means over the seeds of results.json's "cost" (None where no run has it)."""
    costs = [r["cost"] for r in rs if r.get("cost")]

    def mean(get):
        vals = [get(c) for c in costs]
        vals = [v for v in vals if v is not None]
        return sum(vals) / len(vals) if vals else None

    kinds = sorted({c["peak_memory"]["kind"] for c in costs})
    return {"parameters": mean(lambda c: c["parameters"]), "flops_per_sample": mean(lambda c: c["flops_per_sample"]),
            "seconds_per_epoch": mean(lambda c: c["seconds_per_epoch"]),
            "train_seconds_per_epoch": mean(lambda c: c["train_seconds_per_epoch"]),
            "peak_memory_mb": mean(lambda c: c["peak_memory"]["mb"]), "peak_memory_kind": "/".join(kinds)}


MEMORY_KINDS = {"cpu_peak_rss": "CPU: peak resident set size of the whole process",
                "cuda_max_allocated": "CUDA: most memory held by tensors (torch.cuda.max_memory_allocated)"}


def markdown(rows: List[dict]) -> str:
    """Two tables: accuracy (mean ± std over seeds, in %), and purities/strengths per diagnosis."""
    if not rows:
        return "no finished runs\n"
    modalities = []
    for r in rows:
        modalities += [m for m in r["modalities"] if m not in modalities]
    head = (["dataset", "method", "modalities", "seeds", "test acc", "test macro-F1", "test mAP", "val acc"]
            + [f"{m} acc (head)" for m in modalities] + [f"{m} acc (probe)" for m in modalities]
            + ["best test acc (test-selected)", "epochs", "s / run"] + [f"{m} Shapley (pts)" for m in modalities])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    # Where one row's seeds ran on several machines, every machine gets a number and that row's seconds
    # are given per machine ("270 [1] / 994 [2]"): a mean over machines would describe none of them.
    names = sorted({m for r in rows for m in r.get("machines", [])})
    numbered = any(len(r.get("machines", [])) > 1 for r in rows)

    def tag(m):
        return f" [{names.index(m) + 1}]"

    def seconds_cell(r):
        by = r.get("seconds_by_machine", {})
        if len(by) > 1:
            return " / ".join(f"{by[m]:.0f}{tag(m)}" for m in sorted(by, key=names.index))
        return f"{r['seconds']:.0f}"

    for r in rows:
        cells = ([r["dataset"], r["method"], "+".join(r["modalities"]), str(len(r["seeds"])), r["test_acc"],
                  r["test_macro_f1"], r["test_map"], r["val_acc"]]
                 + [r["unimodal"].get(m, "-") for m in modalities] + [r["probe"].get(m, "-") for m in modalities]
                 + [r["best_test_acc"], str(r["epochs"]), seconds_cell(r)]
                 + [r.get("shapley", {}).get(m, "-") for m in modalities])
        lines.append("| " + " | ".join(cells) + " |")
    costed = [r for r in rows if r.get("cost", {}).get("parameters") is not None]
    if costed:
        kinds = sorted({k for r in costed for k in r["cost"]["peak_memory_kind"].split("/") if k})
        lines += ["", "Shapley (pts): each modality's Shapley contribution to the fused test accuracy at the selected "
                      "epoch (other modalities' inputs zeroed); they add up to the accuracy minus that with every "
                      "input zeroed.", "",
                  "Cost (mean over seeds): parameters; forward FLOPs per sample (torch.utils.flop_counter: matrix "
                  "products and convolutions, a multiply-add = 2); seconds per epoch (training, evaluation, "
                  "diagnoses) and of its training pass alone; peak memory (" + "; ".join(
                      MEMORY_KINDS.get(k, k) for k in kinds) + ")" + (
                      "; a method whose seeds ran on several machines has a line per machine, numbered as "
                      "below" if numbered else "") + ":", ""]
        head = ["method", "modalities", "parameters (M)", "GFLOPs / sample", "s / epoch", "training s / epoch",
                "peak memory (MiB)"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

        def num(v, fmt):
            return "-" if v is None else format(v, fmt)

        for r in costed:
            by = r.get("cost_by_machine", {})
            per = [(r["method"], r["cost"])]
            if len(by) > 1:
                per = [(r["method"] + tag(m), by[m]) for m in sorted(by, key=names.index)
                       if by[m]["parameters"] is not None]
            for label, c in per:
                lines.append("| " + " | ".join([
                    label, "+".join(r["modalities"]), num(c["parameters"] / 1e6, ".2f"),
                    num(c["flops_per_sample"] and c["flops_per_sample"] / 1e9, ".3f"),
                    num(c["seconds_per_epoch"], ".1f"), num(c["train_seconds_per_epoch"], ".1f"),
                    num(c["peak_memory_mb"], ".0f")]) + " |")
    machines: Dict[str, List[str]] = {}
    for r in rows:
        for m in r.get("machines", []):
            label = r["method"] + ("" if len(r["modalities"]) > 1 else f" ({r['modalities'][0]})")
            machines.setdefault(m, []).append(label)
    if machines:  # seconds compare only between runs on the same machine
        lines += ["", "Seconds measured on: " + "; ".join(
            f"{tag(m).strip() + ' ' if numbered else ''}{m}: {', '.join(dict.fromkeys(methods))}"
            for m, methods in sorted(machines.items())) + "."]
    diag_rows = [(r, d) for r in rows for d in r["diagnoses"]]
    if diag_rows:
        lines += ["", "Diagnoses (purity of k-means clusters of each encoder's features; strength "
                      "a = tanh(lambda |train - val|); mean ± std over seeds):", ""]
        head = ["method", "modalities", "after epoch", "applied"] + [f"{m} {k}" for m in modalities
                                                       for k in ("purity train", "purity val", "strength")]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r, d in diag_rows:
            cells = [r["method"], "+".join(r["modalities"]), str(d["epoch"]), "yes" if d["applied"] else "no"]
            for m in modalities:
                if m in d["purity"]:
                    cells += [d["purity"][m]["train"], d["purity"][m]["val"], d["alpha"][m]]
                else:
                    cells += ["-", "-", "-"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
