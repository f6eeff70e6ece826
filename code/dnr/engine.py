"""One epoch of training, one evaluation pass, and feature extraction. Method-agnostic: what
differs between methods happens in their hooks (methods/base.py). Distributed-aware: with several
processes, each handles its shard and the results are gathered in dataset order."""
from __future__ import annotations

import contextlib
import time
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

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
def to_device(inputs: Mapping[str, Tensor], device, transform: Optional[DeviceTransform] = None,
              train: bool = False) -> Dict[str, Tensor]:
    """Move a batch to `device`, then apply the dataset's device transform (e.g. --frame_cache gpu's
    batched crop/flip/resize of uint8 frames). It runs outside autocast: the model gets float32."""
    moved = {m: x.to(device, non_blocking=True) for m, x in inputs.items()}
    return moved if transform is None else transform(moved, train)


def autocast(device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def train_one_epoch(model: nn.Module, method: Method, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    device, epoch: int, *, grad_clip: float = 0.0, progress: bool = True,
                    amp: Optional[torch.dtype] = None, scaler=None,
                    device_transform: Optional[DeviceTransform] = None) -> Dict[str, float]:
    """Train for one pass over `loader`; returns mean loss, accuracies and the method's own logs
    (averaged over every process's samples). `device_transform` gets train=True."""
    model.train()
    start = time.perf_counter()
    n, loss_sum, correct = 0, 0.0, 0.0
    uni_correct: Dict[str, float] = {}
    extra_sum: Dict[str, float] = {}
    bar = tqdm(loader, desc=f"epoch {epoch} train", leave=False, disable=not progress, dynamic_ncols=True)
    for step, batch in enumerate(bar):
        inputs = to_device(batch["inputs"], device, device_transform, train=True)
        labels = batch["label"].to(device, non_blocking=True)
        with autocast(device, amp):
            out = method.forward(model, inputs, labels)
            loss, extra = method.loss(out, labels, epoch)
        if not torch.isfinite(loss.detach()):
            raise FloatingPointError(
                f"non-finite loss ({loss.item()}) at epoch {epoch}, step {step}: lower "
                f"--learning_rate or check the inputs of this batch (indices {batch['index'][:8].tolist()}...)"
            )
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:  # fp16: scale the loss, then hand the hooks true gradients
            method.backward(scaler.scale(loss), out, labels, model)
            scaler.unscale_(optimizer)
        else:
            method.backward(loss, out, labels, model)
        extra.update(method.before_step(model, out, labels, epoch))
        if grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
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
    # Sum over processes (keys are the same on every rank: same model, same method).
    keys_u, keys_e = sorted(uni_correct), sorted(extra_sum)
    totals = dist.all_reduce_sum([n, loss_sum, correct] + [uni_correct[k] for k in keys_u]
                                 + [extra_sum[k] for k in keys_e], device)
    n, loss_sum, correct = totals[:3]
    n = max(n, 1)
    stats = {"loss": loss_sum / n, "acc": correct / n,
             "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - start}
    stats.update({f"acc_{m}": c / n for m, c in zip(keys_u, totals[3:3 + len(keys_u)])})
    stats.update({k: v / n for k, v in zip(keys_e, totals[3 + len(keys_u):])})
    return stats


def _in_dataset_order(indices: Tensor, *tensors: Tensor):
    """Gather every process's rows and sort them by dataset index (identity in one process)."""
    indices = dist.all_gather_cat(indices)
    order = torch.argsort(indices)
    return [dist.all_gather_cat(t)[order] for t in tensors]


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, device, *, progress: bool = False, desc: str = "eval",
            amp: Optional[torch.dtype] = None, device_transform: Optional[DeviceTransform] = None,
            features_out: Optional[dict] = None):
    """Fused logits (N, C), per-modality logits {m: (N, C)} (or {}), labels (N,), on the CPU.

    With a dict as `features_out`, it also receives "features" ({m: (N, D)} on `device`) and
    "labels", exactly what `extract_features` returns for this loader: the forward pass computes
    the pooled features anyway, so a diagnosis after this evaluation need not run it again."""
    model.eval()
    net = unwrap(model)
    logits, labels, index, uni, feats = [], [], [], {}, {}
    for batch in tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True):
        inputs = to_device(batch["inputs"], device, device_transform)
        with autocast(device, amp):
            out = net(inputs)
        logits.append(out.logits.float())
        labels.append(batch["label"].to(device))
        index.append(batch["index"].to(device))
        for m, l in (out.unimodal_logits or {}).items():
            uni.setdefault(m, []).append(l.float())
        if features_out is not None:
            for m, f in out.features.items():
                feats.setdefault(m, []).append(f.float())
    names, feat_names = sorted(uni), sorted(feats)
    gathered = _in_dataset_order(torch.cat(index), torch.cat(logits), torch.cat(labels),
                                 *[torch.cat(uni[m]) for m in names], *[torch.cat(feats[m]) for m in feat_names])
    if features_out is not None:
        features_out["features"] = dict(zip(feat_names, gathered[2 + len(names):]))
        features_out["labels"] = gathered[1].cpu()
    return (gathered[0].cpu(), {m: g.cpu() for m, g in zip(names, gathered[2:2 + len(names)])},
            gathered[1].cpu())


def evaluate(model: nn.Module, loader: DataLoader, device, num_classes: int, *, progress: bool = False,
             desc: str = "eval", amp: Optional[torch.dtype] = None,
             device_transform: Optional[DeviceTransform] = None, features_out: Optional[dict] = None) -> Dict[str, float]:
    """acc, macro_f1, f1_weighted, map, loss of the fused logits, and acc_<modality> from the head
    slices; `features_out` as in `predict`."""
    logits, uni, labels = predict(model, loader, device, progress=progress, desc=desc, amp=amp,
                                  device_transform=device_transform, features_out=features_out)
    stats = classification_metrics(logits, labels, num_classes)
    stats["loss"] = float(torch.nn.functional.cross_entropy(logits, labels))
    stats.update({f"acc_{m}": accuracy(l, labels) for m, l in uni.items()})
    return stats


@torch.no_grad()
def extract_features(model: nn.Module, loader: DataLoader, device, *, progress: bool = False,
                     desc: str = "features", amp: Optional[torch.dtype] = None,
                     device_transform: Optional[DeviceTransform] = None) -> Tuple[Dict[str, Tensor], Tensor]:
    """Pooled per-modality features in eval mode, kept on `device` (so the diagnosis k-means runs
    where the model runs), and the labels (N,), in dataset order (all processes' shards)."""
    model.eval()
    net = unwrap(model)
    feats: Dict[str, list] = {}
    labels, index = [], []
    for batch in tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True):
        inputs = to_device(batch["inputs"], device, device_transform)
        with autocast(device, amp):
            encoded = net.encode(inputs)
        for m, f in encoded.items():
            feats.setdefault(m, []).append(f.float())
        labels.append(batch["label"].to(device))
        index.append(batch["index"].to(device))
    names = sorted(feats)
    gathered = _in_dataset_order(torch.cat(index), torch.cat(labels), *[torch.cat(feats[m]) for m in names])
    return {m: g for m, g in zip(names, gathered[1:])}, gathered[0].cpu()
