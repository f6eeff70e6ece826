"""One epoch of training, one evaluation pass, and feature extraction. Method-agnostic: what
differs between methods happens in their hooks (methods/base.py)."""
from __future__ import annotations

import time
from typing import Dict, Mapping, Tuple

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from .methods.base import Method
from .metrics import accuracy, classification_metrics


def to_device(inputs: Mapping[str, Tensor], device) -> Dict[str, Tensor]:
    return {m: x.to(device, non_blocking=True) for m, x in inputs.items()}


def train_one_epoch(model: nn.Module, method: Method, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    device, epoch: int, *, grad_clip: float = 0.0, progress: bool = True) -> Dict[str, float]:
    """Train for one pass over `loader`; returns mean loss, accuracies and the method's own logs."""
    model.train()
    start = time.perf_counter()
    n, loss_sum, correct = 0, 0.0, 0.0
    uni_correct: Dict[str, float] = {}
    extra_sum: Dict[str, float] = {}
    bar = tqdm(loader, desc=f"epoch {epoch} train", leave=False, disable=not progress, dynamic_ncols=True)
    for step, batch in enumerate(bar):
        inputs = to_device(batch["inputs"], device)
        labels = batch["label"].to(device, non_blocking=True)
        out = method.forward(model, inputs)
        loss, extra = method.loss(out, labels, epoch)
        if not torch.isfinite(loss.detach()):
            raise FloatingPointError(
                f"non-finite loss ({loss.item()}) at epoch {epoch}, step {step}: lower "
                f"--learning_rate or check the inputs of this batch (indices {batch['index'][:8].tolist()}...)"
            )
        optimizer.zero_grad(set_to_none=True)
        method.backward(loss, out, labels, model)
        extra.update(method.before_step(model, out, labels, epoch))
        if grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()

        b = labels.shape[0]
        n += b
        loss_sum += float(loss.detach()) * b
        correct += float((out.logits.detach().argmax(1) == labels).sum())
        for m, logits in (out.unimodal_logits or {}).items():
            uni_correct[m] = uni_correct.get(m, 0.0) + float((logits.detach().argmax(1) == labels).sum())
        for k, v in extra.items():
            extra_sum[k] = extra_sum.get(k, 0.0) + float(v) * b
        bar.set_postfix(loss=f"{loss_sum / n:.3f}", acc=f"{correct / n:.3f}")
    stats = {"loss": loss_sum / max(n, 1), "acc": correct / max(n, 1),
             "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - start}
    stats.update({f"acc_{m}": c / n for m, c in uni_correct.items()})
    stats.update({k: v / n for k, v in extra_sum.items()})
    return stats


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, device, *, progress: bool = False, desc: str = "eval"):
    """Fused logits (N, C), per-modality logits {m: (N, C)} (or {}), labels (N,), on the CPU."""
    model.eval()
    logits, labels, uni = [], [], {}
    for batch in tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True):
        out = model(to_device(batch["inputs"], device))
        logits.append(out.logits.float().cpu())
        labels.append(batch["label"])
        for m, l in (out.unimodal_logits or {}).items():
            uni.setdefault(m, []).append(l.float().cpu())
    return torch.cat(logits), {m: torch.cat(v) for m, v in uni.items()}, torch.cat(labels)


def evaluate(model: nn.Module, loader: DataLoader, device, num_classes: int, *, progress: bool = False,
             desc: str = "eval") -> Dict[str, float]:
    """acc, macro_f1, map, loss of the fused logits, and acc_<modality> from the head slices."""
    logits, uni, labels = predict(model, loader, device, progress=progress, desc=desc)
    stats = classification_metrics(logits, labels, num_classes)
    stats["loss"] = float(torch.nn.functional.cross_entropy(logits, labels))
    stats.update({f"acc_{m}": accuracy(l, labels) for m, l in uni.items()})
    return stats


@torch.no_grad()
def extract_features(model: nn.Module, loader: DataLoader, device, *, progress: bool = False,
                     desc: str = "features") -> Tuple[Dict[str, Tensor], Tensor]:
    """Pooled per-modality features in eval mode, kept on `device` (so the diagnosis k-means runs
    where the model runs), and the labels (N,)."""
    model.eval()
    encoder = getattr(model, "module", model)  # DistributedDataParallel wraps the classifier
    feats: Dict[str, list] = {}
    labels = []
    for batch in tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True):
        for m, f in encoder.encode(to_device(batch["inputs"], device)).items():
            feats.setdefault(m, []).append(f.float())
        labels.append(batch["label"])
    return {m: torch.cat(v) for m, v in feats.items()}, torch.cat(labels)
