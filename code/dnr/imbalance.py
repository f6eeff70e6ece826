"""How imbalanced is a multimodal model? The field's measures beside accuracy, for any model whose
forward takes {modality: input} and returns `.logits` and `.features` (dnr.models.ModelOutput).

    shapley_values(value, players)            exact Shapley values of a set function (2^M calls)
    zero_absent(present, transform)           a device transform that zeroes absent modalities' inputs
    subset_accuracy(model, loader, device, modalities)   fused accuracy with each subset present
    modality_shapley(model, loader, device, modalities)  each modality's Shapley contribution to it
    model_cost(net, inputs)                   parameters and forward FLOPs per sample
    peak_memory(device)                       CUDA max allocated, or the process's peak RSS on a CPU
    epoch_seconds(records)                    mean seconds per epoch, from log.jsonl records
    run_cost(net, loader, device, records)    the three above for a training run (results.json "cost")
    diagnose_model(model, loaders, num_classes, ...)   all of it for one model, with D&R's purity
                                              diagnosis: what script/diagnose.py runs
    plot_model_diagnosis(report, path)        per modality: purity per split, t-SNE of train and val

Shapley contribution (as in the imbalance literature's "modality valuation"): v(S) is the fused
accuracy when only the modalities in S are present, the others' inputs set to zero (what the model
sees, after normalisation); phi_m = sum over S not holding m of |S|! (M - |S| - 1)! / M!
(v(S + m) - v(S)). The phi_m add up to v(all) - v(none). A modality the model does not use has
phi near 0; one the prediction rests on, a large share.
"""
from __future__ import annotations

import itertools
import math
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from .diagnose import Diagnosis, diagnose_features, diagnose_purity, minmax_scale
from .engine import Outputs, forward_pass, to_device
from .metrics import accuracy, linear_probe_accuracy
from .models import unwrap

__all__ = ["shapley_values", "zero_absent", "subset_accuracy", "subset_name", "modality_shapley", "model_cost",
           "peak_memory", "epoch_seconds", "run_cost", "ModelDiagnosis", "diagnose_model", "tsne_2d",
           "plot_model_diagnosis"]


def shapley_values(value: Callable[[FrozenSet[str]], float], players: Sequence[str]) -> Dict[str, float]:
    """Exact Shapley value of each player for the set function `value` (called once per subset)."""
    players = list(players)
    n = len(players)
    if n == 0 or len(set(players)) != n:
        raise ValueError(f"shapley_values needs distinct players, got {players}")
    cache: Dict[FrozenSet[str], float] = {}

    def v(subset) -> float:
        key = frozenset(subset)
        if key not in cache:
            cache[key] = float(value(key))
        return cache[key]

    out = {}
    for m in players:
        others = [p for p in players if p != m]
        total = 0.0
        for size in range(n):
            weight = math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)
            for subset in itertools.combinations(others, size):
                total += weight * (v(subset + (m,)) - v(subset))
        out[m] = total
    return out


def zero_absent(present, transform=None):
    """A device transform (inputs, train) -> inputs: `transform` (the dataset's own, if any), then
    every modality not in `present` replaced by zeros of the same shape."""
    present = frozenset(present)

    def apply(inputs: Dict[str, Tensor], train: bool) -> Dict[str, Tensor]:
        if transform is not None:
            inputs = transform(inputs, train)
        return {m: x if m in present else torch.zeros_like(x) for m, x in inputs.items()}

    return apply


def subset_name(subset, modalities: Sequence[str]) -> str:
    """'audio+visual' in the modalities' order; 'none' for the empty set."""
    return "+".join(m for m in modalities if m in subset) or "none"


def subset_accuracy(model: nn.Module, loader, device, modalities: Sequence[str], *, device_transform=None,
                    amp=None) -> Dict[FrozenSet[str], float]:
    """Fused accuracy over `loader` with each subset of `modalities` present (2^M passes; several
    processes: each pass gathers every shard, as the trainer's evaluation)."""
    accs = {}
    for size in range(len(modalities) + 1):
        for present in itertools.combinations(modalities, size):
            out = forward_pass(model, loader, device, amp=amp,
                               device_transform=zero_absent(present, device_transform), desc="shapley")
            accs[frozenset(present)] = accuracy(out.logits, out.labels)
    return accs


def modality_shapley(model: nn.Module, loader, device, modalities: Sequence[str], *, device_transform=None,
                     amp=None) -> Tuple[Dict[str, float], Dict[str, float]]:
    """({modality: Shapley contribution to the fused accuracy}, {subset name: accuracy})."""
    accs = subset_accuracy(model, loader, device, modalities, device_transform=device_transform, amp=amp)
    return (shapley_values(accs.__getitem__, modalities),
            {subset_name(s, modalities): a for s, a in sorted(accs.items(), key=lambda kv: len(kv[0]))})


@torch.no_grad()
def model_cost(net: nn.Module, inputs: Mapping[str, Tensor]) -> Dict[str, float]:
    """Parameters (all of the model's, extra heads a method builds included) and the FLOPs of one
    eval-mode forward pass per sample, counted by torch.utils.flop_counter on `inputs` (one batch):
    matrix products and convolutions, a multiply-add counted as 2; element-wise operations are not
    counted. A method's training overhead (extra passes, gradient surgery) shows in its seconds per
    epoch, not here."""
    from torch.utils.flop_counter import FlopCounterMode

    batch = next(iter(inputs.values())).shape[0]
    was_training = net.training
    net.eval()
    counter = FlopCounterMode(display=False)
    with counter:
        net(dict(inputs))
    net.train(was_training)
    return {"parameters": int(sum(p.numel() for p in net.parameters())),
            "flops_per_sample": counter.get_total_flops() / batch}


def peak_memory(device) -> Dict[str, object]:
    """The run's peak memory in MiB and which measure it is: on CUDA, the most memory PyTorch's
    tensors held on the device (torch.cuda.max_memory_allocated); on a CPU, the peak resident set
    size of the whole process (model, data, libraries), the closest the OS reports."""
    device = torch.device(device)
    if device.type == "cuda":
        return {"mb": torch.cuda.max_memory_allocated(device) / 2**20, "kind": "cuda_max_allocated"}
    try:
        import resource
    except ImportError:  # Windows
        return {"mb": None, "kind": "unavailable"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mb": rss / 2**20 if sys.platform == "darwin" else rss / 2**10,  # macOS: bytes; Linux: KiB
            "kind": "cpu_peak_rss"}


def epoch_seconds(records: Sequence[Mapping]) -> Dict[str, Optional[float]]:
    """Mean seconds per epoch over log.jsonl records: the whole epoch (training, evaluation,
    diagnoses) and the training pass alone (what a method's own cost changes)."""
    if not records:
        return {"seconds_per_epoch": None, "train_seconds_per_epoch": None}
    return {"seconds_per_epoch": float(np.mean([r["seconds"] for r in records])),
            "train_seconds_per_epoch": float(np.mean([r["train"]["seconds"] for r in records]))}


def run_cost(net: nn.Module, loader, device, records: Sequence[Mapping], device_transform=None) -> Dict[str, object]:
    """A training run's cost: `model_cost` on the first batch of `loader`, `epoch_seconds` of its
    log records and `peak_memory` (what results.json's "cost" holds)."""
    inputs = to_device(next(iter(loader))["inputs"], device, device_transform)
    return {**model_cost(net, inputs), **epoch_seconds(records), "peak_memory": peak_memory(device)}


# ---------------------------------------------------------------------------- one model, all measures
@dataclass
class ModelDiagnosis:
    """What `diagnose_model` measured. `diagnosis` is D&R's (train vs val purities, gap, strengths,
    their stds over the k-means seeds); the rest is on `eval_split` (test when given). `features`
    (split -> ({modality: (N, D)}, labels)) are kept for the figure, not written by `to_dict`."""

    diagnosis: Diagnosis
    purity: Dict[str, Dict[str, float]]  # modality -> split -> mean purity
    purity_std: Dict[str, Dict[str, float]]
    kmeans: Dict[str, object]  # repeats, seed, n_init, backend
    eval_split: str
    acc: float  # fused accuracy, every modality present
    shapley: Dict[str, float]
    subset_acc: Dict[str, float]
    unimodal_acc: Dict[str, float]  # each modality's slice of the head (concat / sum fusion)
    probe_acc: Dict[str, float]  # logistic regression on the frozen features, fitted on train
    samples: Dict[str, int]
    features: Dict[str, Tuple[Dict[str, Tensor], Tensor]] = field(default_factory=dict, repr=False)

    @property
    def modalities(self) -> List[str]:
        return list(self.purity)

    def to_dict(self) -> dict:
        d = self.diagnosis
        return {
            "modalities": self.modalities, "samples": self.samples, "kmeans": self.kmeans,
            "purity": self.purity, "purity_std": self.purity_std,
            "gap": d.gap, "strength": d.alpha, "strength_std": d.alpha_std,
            "eval_split": self.eval_split, "acc": self.acc,
            "shapley": self.shapley, "subset_acc": self.subset_acc,
            "unimodal_acc": self.unimodal_acc, "unimodal_source": "head" if self.unimodal_acc else "none",
            "probe_acc": self.probe_acc,
        }

    def summary(self) -> str:
        k = self.kmeans
        lines = [f"purity: k-means ({k['backend']}, n_init {k['n_init']}), mean ± std over {k['repeats']} seeds; "
                 f"strength = what D&R would apply; Shapley, head and probe on {self.eval_split} "
                 f"(fused acc {self.acc:.4f}, none present {self.subset_acc['none']:.4f})"]
        for m in self.modalities:
            purity = "  ".join(f"{s} {self.purity[m][s]:.3f}±{self.purity_std[m][s]:.3f}" for s in self.purity[m])
            std = (self.diagnosis.alpha_std or {}).get(m)
            lines.append(f"  {m:>10}: purity {purity}  strength {self.diagnosis.alpha[m]:.3f}"
                         + (f"±{std:.3f}" if std is not None else "")
                         + f"  Shapley {self.shapley[m]:+.4f}"
                         + (f"  head {self.unimodal_acc[m]:.4f}" if m in self.unimodal_acc else "")
                         + (f"  probe {self.probe_acc[m]:.4f}" if m in self.probe_acc else ""))
        return "\n".join(lines)


def diagnose_model(model: nn.Module, loaders: Mapping[str, object], num_classes: int, *, device=None,
                   repeats: int = 10, lam: float = 3.0, seed: int = 0, n_init: int = 10, backend: str = "torch",
                   strength=None, probe: bool = True, device_transform=None, amp=None) -> ModelDiagnosis:
    """Diagnose a trained multimodal model: D&R's purity diagnosis and the imbalance measures.

    `loaders`: "train" and "val" (the diagnosis compares them; use the evaluation transform for
    train), and optionally "test" (the split of the accuracies; else val). Batches are dicts
    {"inputs": {modality: tensor}, "label": (B,)} (and "index", optional in one process). The
    model's forward takes the inputs dict and returns `.logits` and `.features` (ModelOutput).
    Purity: mean ± std over `repeats` k-means seeds (seed, seed + 1, ...) on each split; the
    strengths tanh(lam |train - val|) from the mean purities (or `strength`, a Relearner rule).
    10 seeds by default: on the built-in dataset that cuts the strength's seed-to-seed std about
    threefold for the dominant modality, for a cost small beside the feature extraction (README,
    "How sure is a diagnosis").
    Shapley: each modality's contribution to the fused accuracy, absent inputs zeroed. Probe:
    logistic regression fitted on train features. The model is left in the mode it came in."""
    for split in ("train", "val"):
        if split not in loaders:
            raise ValueError(f"diagnose_model needs a {split!r} loader (the diagnosis compares train with val); "
                             f"got {sorted(loaders)}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    passes: Dict[str, Outputs] = {s: forward_pass(model, loader, device, features=True, amp=amp,
                                                  device_transform=device_transform, desc=s)
                                  for s, loader in loaders.items()}
    # The model's own order (MultimodalClassifier.modalities, or its encoders'), not the pass's sorted keys.
    net = unwrap(model)
    named = list(getattr(net, "modalities", None) or getattr(net, "encoders", None) or [])
    modalities = [m for m in named if m in passes["train"].features] or list(passes["train"].features)
    feats = {s: (o.features, o.labels) for s, o in passes.items()}
    kmeans = dict(repeats=repeats, seed=seed, n_init=n_init, backend=backend)
    diagnosis = diagnose_features(feats["train"], feats["val"], num_classes, strength=strength, lam=lam,
                                  modalities=modalities, **kmeans)
    purity = {m: dict(p) for m, p in diagnosis.purity.items()}
    purity_std = {m: dict((diagnosis.purity_std or {}).get(m, {"train": 0.0, "val": 0.0})) for m in modalities}
    for split in [s for s in feats if s not in ("train", "val")]:
        for m in modalities:
            est = diagnose_purity(feats[split][0][m], feats[split][1], num_classes, spread=True, **kmeans)
            purity[m][split], purity_std[m][split] = est.mean, est.std

    eval_split = "test" if "test" in loaders else "val"
    out = passes[eval_split]
    unimodal = {m: accuracy(u, out.labels) for m, u in (out.unimodal_logits or {}).items()}
    probe_acc = ({m: linear_probe_accuracy(feats["train"][0][m], feats["train"][1], out.features[m], out.labels,
                                           seed=seed) for m in modalities} if probe else {})
    shapley, subsets = modality_shapley(model, loaders[eval_split], device, modalities,
                                        device_transform=device_transform, amp=amp)
    model.train(was_training)
    return ModelDiagnosis(diagnosis=diagnosis, purity=purity, purity_std=purity_std, kmeans=kmeans,
                          eval_split=eval_split, acc=accuracy(out.logits, out.labels), shapley=shapley,
                          subset_acc=subsets, unimodal_acc=unimodal, probe_acc=probe_acc,
                          samples={s: len(o.labels) for s, o in passes.items()}, features=feats)


# ---------------------------------------------------------------------------- the figure
def tsne_2d(features: Tensor, labels: Tensor, max_samples: int = 500, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """2-D t-SNE of at most `max_samples` rows (a seeded random subset), scaled to [-1, 1] per
    dimension first as the diagnosis's k-means sees them. Returns (coords (n, 2), labels (n,))."""
    from sklearn.manifold import TSNE

    n = features.shape[0]
    rows = np.arange(n)
    if n > max_samples:
        rows = np.sort(np.random.default_rng(seed).choice(n, max_samples, replace=False))
    x = minmax_scale(features.detach().float().cpu()[torch.as_tensor(rows)]).double().numpy()
    perplexity = float(min(30.0, max(2.0, (len(rows) - 1) / 3)))  # must stay below the number of samples
    coords = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    return coords, labels.cpu().numpy()[rows]


def plot_model_diagnosis(report: ModelDiagnosis, path, *, tsne_samples: int = 500, seed: int = 0,
                         class_names: Optional[Sequence[str]] = None, title: str = "") -> None:
    """One row per modality: its purity on each split (mean ± std over the k-means seeds, with the
    strength and Shapley contribution in the title), then t-SNE of its train and val features,
    coloured by class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mods = report.modalities
    fig, axes = plt.subplots(len(mods), 3, figsize=(15, 4.2 * len(mods)), squeeze=False)
    cmap = plt.get_cmap("tab10" if (class_names is None or len(class_names) <= 10) else "tab20")
    for row, m in zip(axes, mods):
        splits = list(report.purity[m])
        row[0].bar(splits, [report.purity[m][s] for s in splits], yerr=[report.purity_std[m][s] for s in splits],
                   color=["tab:blue", "tab:orange", "tab:gray"][:len(splits)], capsize=4)
        k = len(class_names) if class_names is not None else None
        if k:
            row[0].axhline(1.0 / k, ls="--", color="k", lw=0.8, label="1 / classes")
            row[0].legend(fontsize=8)
        std = (report.diagnosis.alpha_std or {}).get(m)
        row[0].set_title(f"{m}: k-means purity (± std, {report.kmeans['repeats']} seeds)\nstrength "
                         f"{report.diagnosis.alpha[m]:.2f}" + (f" ± {std:.2f}" if std is not None else "")
                         + f", Shapley {100 * report.shapley[m]:+.1f} pts ({report.eval_split})", fontsize=9)
        row[0].set_ylim(0, 1.05)
        for ax, split in zip(row[1:], ("train", "val")):
            feats, labels = report.features[split]
            coords, y = tsne_2d(feats[m], labels, tsne_samples, seed)
            ax.scatter(coords[:, 0], coords[:, 1], c=y % cmap.N, cmap=cmap, vmin=0, vmax=cmap.N - 1, s=6)
            ax.set_title(f"{m} features, {split} (t-SNE, {len(y)} samples; purity {report.purity[m][split]:.2f})",
                         fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    if class_names is not None:
        handles = [plt.Line2D([], [], marker="o", ls="", color=cmap(i % cmap.N), label=str(c))
                   for i, c in enumerate(class_names)]
        axes[0][2].legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), title="class")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
