"""Device choice, seeding and determinism. Nothing here assumes a GPU or a GPU id."""
from __future__ import annotations

import os
import random

import numpy as np
import torch


def pick_device(choice: str) -> torch.device:
    """'auto' takes CUDA when present, else the CPU. Which GPU is the launcher's business
    (CUDA_VISIBLE_DEVICES, torchrun's LOCAL_RANK), never this code's."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device "
                           f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}); use --device cpu")
    if choice not in ("cpu", "cuda"):
        raise ValueError(f"unknown --device {choice!r}; choose auto, cpu or cuda")
    return torch.device(choice)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """A seed for one epoch of one run, so that an epoch's shuffling and augmentation depend only
    on (seed, epoch): a resumed run redraws exactly what the uninterrupted run drew."""
    return (int(seed) * 1_000_003 + int(epoch) * 7919 + 17) % 2**63


def set_deterministic(enabled: bool) -> None:
    if enabled:
        # cuBLAS needs this before its first call to be deterministic; harmless on the CPU.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    else:
        torch.backends.cudnn.benchmark = True


def worker_init(worker_id: int) -> None:
    """DataLoader workers: seed numpy and random from the worker's torch seed (itself drawn from
    the loader's generator), so augmentation with either library is reproducible too."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
