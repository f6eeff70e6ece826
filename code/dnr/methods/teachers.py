"""Uni-modal teachers: the first stage of UMT and UME (Du et al., ICML 2023).

One uni-modal model per modality (`--method unimodal`: that modality's encoder and a linear
classifier, i.e. concat fusion over one modality), trained by this trainer with the run's own flags
into <out>/teacher_<modality> through `TrainContext.run_stage`: a finished teacher is re-read, a cut
one resumed, so a two-stage run resumes wherever it was cut. The teacher a run uses is the one its
stage selected on val (best.pth), as for every reported model.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, Mapping, Sequence

import torch
from torch import Tensor, nn

from .. import checkpoint as ckpt_io
from ..data.base import DatasetInfo
from ..models import MultimodalClassifier, create_model


def teacher_folder_name(modality: str) -> str:
    return f"teacher_{modality}"


def teacher_flags(args: argparse.Namespace, modality: str, epochs: int) -> dict:
    """The flags a teacher's stage changes: one modality, concat fusion (film and gated need two
    modalities; over one modality concat is its encoder + Linear(D, C)), its own epochs, and only
    its own modality's --encoders choice (the uni-modal model has no other encoder)."""
    own = [part for part in (args.encoders or "").split(",") if part.split("=", 1)[0].strip() == modality]
    return {"method": "unimodal", "unimodal_modality": modality, "fusion": "concat", "epochs": epochs,
            "encoders": ",".join(own)}


def train_teachers(ctx, modalities: Sequence[str], epochs: int, flag: str) -> Dict[str, Path]:
    """Run (or re-read, or resume) one teacher stage per modality; returns {modality: its folder}.
    A finished teacher trained for another number of epochs than `epochs` is refused, naming `flag`."""
    if ctx.run_stage is None:
        raise ValueError("uni-modal teachers need a TrainContext with run_stage (the trainer's)")
    folders = {}
    for m in modalities:
        folder = ctx.run_stage(teacher_folder_name(m), **teacher_flags(ctx.args, m, epochs))
        done = json.loads((folder / "results.json").read_text())["epochs"]
        if done != epochs:
            raise ValueError(f"{folder} holds a teacher trained for {done} epochs, this run asks for {epochs} "
                             f"({flag}); write this run elsewhere or keep the setting")
        folders[m] = folder
    return folders


def teacher_epochs(args: argparse.Namespace, value: int) -> int:
    """A teacher flag's epochs: 0 means the run's own --epochs."""
    return value if value > 0 else args.epochs


def read_teacher(folder: Path, device) -> dict:
    """The teacher's val-selected checkpoint (best.pth: model, epoch, model_args)."""
    return ckpt_io.load(Path(folder) / "best.pth", map_location=device)


def build_teacher(info: DatasetInfo, modality: str, saved: Mapping, device) -> MultimodalClassifier:
    """The frozen uni-modal model of `saved` (a teacher's best.pth), in evaluation mode on `device`."""
    model = create_model(info.restrict([modality]), **saved["model_args"])
    model.load_state_dict(saved["model"])
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@torch.no_grad()
def teacher_features(teachers: Mapping[str, nn.Module], inputs: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """Each frozen teacher's pooled feature of its own modality (evaluation mode: BatchNorm uses the
    teacher's running statistics and never updates them)."""
    out = {}
    for m, teacher in teachers.items():
        teacher.eval()
        out[m] = teacher.encoders[m](inputs[m])
    return out
