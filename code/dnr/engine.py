"""One epoch of training and one forward pass over a loader. Method-agnostic: what differs
between methods happens in their hooks (methods/base.py). Distributed-aware: with several
processes, each handles its shard and the results are gathered in dataset order."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import distributed as dist
from .data.base import DeviceTransform
from .methods.base import Method
from .metrics import accuracy, classification_metrics
from .models import unwrap
from .stepping import AMP_DTYPES, Updater, autocast, to_device, training_batches

__all__ = ["AMP_DTYPES", "to_device", "train_one_epoch", "Outputs", "forward_pass", "metrics_of",
           "evaluate", "extract_features", "FeatureSource"]


def train_one_epoch(model: nn.Module, method: Method, loader: DataLoader, update: Updater, epoch: int, *,
                    progress: bool = True, device_transform: Optional[DeviceTransform] = None,
                    log_every: int = 0, log=print) -> Dict[str, float]:
    """Train for one pass over `loader`, one `method.train_step` per batch; returns mean loss,
    accuracies and the method's own numbers (averaged over every process's samples).
    `device_transform` gets train=True. With `log_every` > 0, a line every that many steps goes
    to `log` (for output that is not a terminal, where there is no progress bar)."""
    model.train()
    device = update.device
    start = time.perf_counter()
    sums: Dict[str, float] = {}  # sample-weighted sums; "n" counts the samples

    def add(key: str, value: float) -> None:
        sums[key] = sums.get(key, 0.0) + value

    bar = tqdm(loader, desc=f"epoch {epoch} train", leave=False, disable=not progress, dynamic_ncols=True)
    for batch in training_batches(bar, device, epoch, device_transform):
        result = method.train_step(model, batch, update)
        b = batch.labels.shape[0]
        add("n", b)
        add("loss", float(result.loss.detach()) * b)
        add("acc", float((result.out.logits.detach().argmax(1) == batch.labels).sum()))
        for m, logits in (result.out.unimodal_logits or {}).items():
            add(f"acc_{m}", float((logits.detach().argmax(1) == batch.labels).sum()))
        for k, v in result.logs.items():
            add(k, float(v) * b)
        bar.set_postfix(loss=f"{sums['loss'] / sums['n']:.3f}", acc=f"{sums['acc'] / sums['n']:.3f}")
        if log_every > 0 and (batch.step + 1) % log_every == 0:
            log(f"  epoch {epoch} step {batch.step + 1}/{len(loader)} loss {sums['loss'] / sums['n']:.4f} "
                f"train acc {sums['acc'] / sums['n']:.3f} ({time.perf_counter() - start:.0f}s)")
    # Sum over processes (keys are the same on every rank: same model, same method).
    totals = dist.all_reduce_dict(sums, device)
    n = max(totals.pop("n", 0.0), 1)
    stats = {"loss": totals.pop("loss", 0.0) / n, "acc": totals.pop("acc", 0.0) / n,
             "lr": update.optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - start}
    stats.update({k: v / n for k, v in sorted(totals.items())})
    return stats


@dataclass
class Outputs:
    """What one pass over a loader collected, in dataset order (all processes' shards): labels
    (N,) and, when asked for, fused logits (N, C) and per-modality logits {m: (N, C)} on the CPU,
    and pooled features {m: (N, D)} on the model's device (where the D&R k-means runs)."""

    labels: Tensor
    logits: Optional[Tensor] = None
    unimodal_logits: Dict[str, Tensor] = field(default_factory=dict)
    features: Dict[str, Tensor] = field(default_factory=dict)


@torch.no_grad()
def forward_pass(model: nn.Module, loader: DataLoader, device, *, head: bool = True, features: bool = False,
                 progress: bool = False, desc: str = "eval", amp: Optional[torch.dtype] = None,
                 device_transform: Optional[DeviceTransform] = None) -> Outputs:
    """The model in eval mode over `loader`. `head=False` runs the encoders only (features for a
    diagnosis or a probe); `features=True` keeps the pooled features of a full pass too, so a
    diagnosis after an evaluation need not run the encoders again.

    Batches are dicts {"inputs": {modality: tensor}, "label": (B,), "index": (B,)}; "index" (the
    dataset position, which puts several processes' shards back in order) may be left out in one
    process, for a loader of one's own that keeps its order. The model returns an object with
    `.logits` (B, C), `.features` {modality: (B, D)} and optionally `.unimodal_logits`."""
    model.eval()
    net = unwrap(model)
    keep_features = features or not head
    cols: Dict[str, list] = {}  # "labels", "index", "logits", "uni/<m>", "feat/<m>"
    seen = 0  # samples so far: the positions of batches without an "index"

    def put(key: str, value: Tensor) -> None:
        cols.setdefault(key, []).append(value)

    for batch in tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True):
        inputs = to_device(batch["inputs"], device, device_transform)
        with autocast(device, amp):
            if head:
                out = net(inputs)
                feats = out.features
            else:
                out, feats = None, net.encode(inputs)
        labels = batch["label"].to(device)
        if "index" not in batch and dist.info().enabled:
            raise ValueError("forward_pass with several processes needs each batch's 'index' (dataset positions)")
        index = batch["index"] if "index" in batch else torch.arange(seen, seen + len(labels))
        seen += len(labels)
        put("labels", labels)
        put("index", index.to(device))
        if out is not None:
            put("logits", out.logits.float())
            for m, u in (out.unimodal_logits or {}).items():
                put(f"uni/{m}", u.float())
        if keep_features:
            for m, f in feats.items():
                put(f"feat/{m}", f.float())
    keys = sorted(k for k in cols if k != "index")
    gathered = dict(zip(keys, _in_dataset_order(torch.cat(cols["index"]), *[torch.cat(cols[k]) for k in keys])))
    return Outputs(
        labels=gathered["labels"].cpu(),
        logits=gathered["logits"].cpu() if "logits" in gathered else None,
        unimodal_logits={k[4:]: v.cpu() for k, v in gathered.items() if k.startswith("uni/")},
        features={k[5:]: v for k, v in gathered.items() if k.startswith("feat/")},
    )


def _in_dataset_order(indices: Tensor, *tensors: Tensor):
    """Gather every process's rows and sort them by dataset index (identity in one process)."""
    indices = dist.all_gather_cat(indices)
    order = torch.argsort(indices)
    return [dist.all_gather_cat(t)[order] for t in tensors]


def metrics_of(outputs: Outputs, num_classes: int) -> Dict[str, float]:
    """acc, macro_f1, f1_weighted, map, loss of the fused logits, and acc_<modality> from the
    per-modality logits (the head slices)."""
    stats = classification_metrics(outputs.logits, outputs.labels, num_classes)
    stats["loss"] = float(torch.nn.functional.cross_entropy(outputs.logits, outputs.labels))
    stats.update({f"acc_{m}": accuracy(u, outputs.labels) for m, u in sorted(outputs.unimodal_logits.items())})
    return stats


def evaluate(model: nn.Module, loader: DataLoader, device, num_classes: int, **kw) -> Dict[str, float]:
    """`metrics_of` one full pass (keyword arguments as `forward_pass`)."""
    return metrics_of(forward_pass(model, loader, device, **kw), num_classes)


def extract_features(model: nn.Module, loader: DataLoader, device, **kw) -> Tuple[Dict[str, Tensor], Tensor]:
    """Pooled per-modality features in eval mode ({m: (N, D)} on `device`) and the labels (N,):
    the form `Relearner.step` and a probe take."""
    out = forward_pass(model, loader, device, head=False, desc=kw.pop("desc", "features"), **kw)
    return out.features, out.labels


class FeatureSource:
    """`source(split)` -> extract_features of the model on that split's loader: what a diagnosis
    (TrainContext.extract_features) calls. A pass that already computed a split's features for the
    current weights hands them over with `keep` (the epoch's val evaluation), which spares the
    diagnosis one pass over val; `clear` forgets them once the weights may change."""

    def __init__(self, model: nn.Module, loaders: Mapping[str, DataLoader], device, **kw):
        self.model, self.loaders, self.device, self.kw = model, loaders, device, kw
        self.kept: Dict[str, Tuple[Dict[str, Tensor], Tensor]] = {}

    def keep(self, split: str, outputs: Outputs) -> None:
        self.kept[split] = (outputs.features, outputs.labels)

    def clear(self) -> None:
        self.kept.clear()

    def remembering(self, split: str) -> Tuple[Dict[str, Tensor], Tensor]:
        """As calling it, but what it extracts is kept until `clear`: for a first diagnosis of
        weights that a second one (D&R's, after --track_purity_every's) will cluster again."""
        if split not in self.kept:
            self.kept[split] = self(split)
        return self.kept[split]

    def __call__(self, split: str) -> Tuple[Dict[str, Tensor], Tensor]:
        if split in self.kept:
            return self.kept[split]
        return extract_features(self.model, self.loaders[split], self.device, desc=f"features {split}", **self.kw)
