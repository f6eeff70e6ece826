"""Multi-process training with PyTorch's own engine (torchrun + DistributedDataParallel).

`torchrun --nproc_per_node N code/main.py ...` sets RANK / WORLD_SIZE / LOCAL_RANK; without them
everything here degrades to a single process. Backend: NCCL when the processes use CUDA, gloo on
the CPU. Each process drives the GPU `LOCAL_RANK` of the ones it can see (CUDA_VISIBLE_DEVICES
chooses them; nothing here names a GPU).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_INFO = DistInfo()


def init_distributed_mode(device_choice: str) -> DistInfo:
    """Join the process group torchrun describes, if any. Returns this process's place in it."""
    global _INFO
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) <= 1:
        _INFO = DistInfo()
        return _INFO
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = device_choice != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local % torch.cuda.device_count())
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    _INFO = DistInfo(rank, world, local)
    return _INFO


def process_device(device: torch.device) -> torch.device:
    """With several CUDA processes, this process's own GPU (set by init_distributed_mode)."""
    if device.type == "cuda" and _INFO.enabled:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def info() -> DistInfo:
    return _INFO


def is_main_process() -> bool:
    return _INFO.is_main


def barrier() -> None:
    if _INFO.enabled:
        dist.barrier()


def cleanup() -> None:
    if _INFO.enabled and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s object on every rank (identity in a single process)."""
    if not _INFO.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's tensor along dim 0 (sizes may differ), in rank order."""
    if not _INFO.enabled:
        return t
    t = t.contiguous()
    size = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(size) for _ in range(_INFO.world_size)]
    dist.all_gather(sizes, size)
    biggest = int(max(s.item() for s in sizes))
    padded = torch.zeros((biggest,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.zeros_like(padded) for _ in range(_INFO.world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


def all_reduce_sum(values: List[float], device) -> List[float]:
    if not _INFO.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_dict(values, device, mean: bool = False):
    """Sum (or mean) of a {name: float} over processes; same keys on every rank."""
    if not _INFO.enabled:
        return dict(values)
    keys = sorted(values)
    totals = all_reduce_sum([values[k] for k in keys], device)
    scale = 1.0 / _INFO.world_size if mean else 1.0
    return {k: v * scale for k, v in zip(keys, totals)}


def average_gradients(params) -> None:
    """Average .grad over processes (for gradients a method rewrote after DDP's own reduction)."""
    if not _INFO.enabled:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(_INFO.world_size)


class EpochBatchSampler(Sampler[List[int]]):
    """Shuffled batches from a permutation that depends only on (seed, epoch), split across ranks.

    Every rank sees the same global batches (global batch = batch_size x world_size); rank r takes
    the r-th contiguous slice of each (slices differ in size by at most one). So one process with
    batch B x N and N processes with batch B see the same samples in the same steps, and a resumed
    run redraws what the killed run drew. The last global batch keeps its leftover samples unless
    that would leave a rank with fewer than 2 (BatchNorm cannot train on one sample); then they are
    dropped.
    """

    def __init__(self, n: int, batch_size: int, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        self.n, self.batch_size, self.rank, self.world = n, batch_size, rank, world_size
        self.shuffle = shuffle
        self.seed = 0
        self.indices: Optional[List[int]] = None  # None: every sample once

    def set_epoch(self, seed: int, indices: Optional[Sequence[int]] = None) -> None:
        """This epoch's seed, and optionally the samples it draws from (a method's re-sampling;
        repeats allowed), else every sample once."""
        self.seed = int(seed)
        if indices is not None:
            indices = [int(i) for i in indices]
            bad = [i for i in indices if not 0 <= i < self.n]
            if bad:
                raise ValueError(f"epoch indices outside the training split [0, {self.n}): {bad[:5]}")
        self.indices = indices

    def _global_positions(self) -> List[List[int]]:
        """The epoch's global batches as positions in its pool (the indices set_epoch got, else
        0..n-1)."""
        size = self.n if self.indices is None else len(self.indices)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed)
            order = torch.randperm(size, generator=g).tolist()
        else:
            order = list(range(size))
        step = self.batch_size * self.world
        batches = [order[i:i + step] for i in range(0, len(order), step)]
        if batches and len(batches[-1]) < 2 * self.world:
            batches.pop()
        return batches

    def _global_batches(self) -> List[List[int]]:
        pool = list(range(self.n)) if self.indices is None else self.indices
        return [[pool[i] for i in batch] for batch in self._global_positions()]

    def _own_slice(self, batch: List[int]) -> List[int]:
        base, extra = divmod(len(batch), self.world)
        start = self.rank * base + min(self.rank, extra)
        return batch[start:start + base + (1 if self.rank < extra else 0)]

    def batch_positions(self) -> List[List[int]]:
        """This process's batches of the epoch, in the order it yields them, as positions in the
        list of indices set_epoch got (a re-sampling method tells its repeated samples apart with
        them: batch.step indexes this list)."""
        return [self._own_slice(batch) for batch in self._global_positions()]

    def __iter__(self) -> Iterator[List[int]]:
        for batch in self._global_batches():
            yield self._own_slice(batch)

    def __len__(self) -> int:
        return len(self._global_batches())


class ShardSampler(Sampler[int]):
    """Evaluation: rank r takes samples r, r + N, r + 2N, ... (no padding, no duplicates)."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, n, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
