"""What one optimisation step works with: the batch, and an `Updater` that owns the run's
optimiser, mixed precision (autocast, fp16 loss scaling) and gradient clipping.

A method's `train_step` (methods/base.py) calls the updater instead of the optimiser, so the same
step works with or without --amp and --grad_clip, and a method that takes several optimiser
steps per batch (alternating uni-modal updates) is written once.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, Iterator, Mapping, Optional

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from .data.base import DeviceTransform

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def to_device(inputs: Mapping[str, Tensor], device, transform: Optional[DeviceTransform] = None,
              train: bool = False) -> Dict[str, Tensor]:
    """Move a batch to `device`, then apply the dataset's device transform (e.g. --frame_cache gpu's
    batched crop/flip/resize of uint8 frames). It runs outside autocast: the model gets float32."""
    moved = {m: x.to(device, non_blocking=True) for m, x in inputs.items()}
    return moved if transform is None else transform(moved, train)


@dataclass
class Batch:
    """One training batch on the device: inputs {modality: (B, ...)}, labels (B,), the samples'
    dataset indices (B,), and where it sits in the run (0-based epoch and step)."""

    inputs: Mapping[str, Tensor]
    labels: Tensor
    index: Tensor
    epoch: int
    step: int


def training_batches(loader: DataLoader, device, epoch: int,
                     transform: Optional[DeviceTransform] = None) -> Iterator[Batch]:
    """The loader's batches as training sees them: on `device`, through the device transform with
    train=True (augmentation), numbered from step 0."""
    for step, raw in enumerate(loader):
        yield Batch(inputs=to_device(raw["inputs"], device, transform, train=True),
                    labels=raw["label"].to(device, non_blocking=True), index=raw["index"], epoch=epoch, step=step)


class Updater:
    """zero_grad -> backward -> (method's gradient surgery) -> clip -> step, with the run's
    settings. With an fp16 scaler, `scale` multiplies the loss and `unscale` hands true gradients
    to what comes after it (a method's `before_step`, the clipping)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device, *,
                 amp: Optional[torch.dtype] = None, scaler=None, grad_clip: float = 0.0):
        self.model, self.optimizer, self.device = model, optimizer, device
        self.amp, self.scaler, self.grad_clip = amp, scaler, grad_clip

    def autocast(self):
        return autocast(self.device, self.amp)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def scale(self, loss: Tensor) -> Tensor:
        return loss if self.scaler is None else self.scaler.scale(loss)

    def unscale(self) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)

    def step(self) -> None:
        if self.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()


def check_finite(loss: Tensor, batch: Batch) -> None:
    """A non-finite loss stops the run, naming the epoch, the step and the first samples."""
    if not torch.isfinite(loss.detach()):
        raise FloatingPointError(
            f"non-finite loss ({loss.item()}) at epoch {batch.epoch}, step {batch.step}: lower "
            f"--learning_rate or check the inputs of this batch (indices {batch.index[:8].tolist()}...)"
        )


@dataclass
class StepResult:
    """What a step reports: the loss (for the epoch mean), the model output whose logits give the
    training accuracy, and the method's own numbers {name: float} (averaged over the epoch)."""

    loss: Tensor
    out: object  # models.ModelOutput
    logs: Dict[str, float]


def build_optimizer(args, params):
    """The run's optimiser and learning-rate schedule from its flags (--optimizer, --learning_rate,
    --momentum, --weight_decay, --lr_decay_step, --lr_decay_ratio): the trainer's, and any side copy
    a method trains (Gradient-Blending's), so both follow the same rule."""
    params = list(params)
    if args.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=args.learning_rate, momentum=args.momentum, weight_decay=args.weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=args.learning_rate, betas=(0.9, 0.999), eps=1e-8,
                               weight_decay=args.weight_decay)
    # step_size 0 means "no decay": a StepLR with gamma 1 keeps the scheduler in the checkpoint either way.
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(args.lr_decay_step, 1),
                                            gamma=args.lr_decay_ratio if args.lr_decay_step > 0 else 1.0)
    return opt, sched


def learning_rate_at(args, epoch: int) -> float:
    """The learning rate build_optimizer's schedule gives at a 0-based epoch."""
    if args.lr_decay_step > 0:
        return args.learning_rate * args.lr_decay_ratio ** (epoch // args.lr_decay_step)
    return args.learning_rate
