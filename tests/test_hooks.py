"""The method hooks that later methods build on, each through the real trainer on a tiny built-in
dataset: several optimiser steps per batch, a first stage run into the run folder (resumable),
extra modules built with the model, and per-epoch re-sampling of the training set."""
import json
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import CODE, TINY
from dnr.methods import METHODS, Method
from dnr.stepping import StepResult

sys.path.insert(0, str(CODE))
import main as trainer  # noqa: E402

QUICK = TINY + ["--reinit_epoch", "0", "--no-probe"]
FAST = QUICK + ["--epochs", "2"]


def register(monkeypatch):
    """A class decorator: the method is in the registry for this test only."""
    def wrap(cls):
        monkeypatch.setitem(METHODS, cls.name, cls)
        return cls

    return wrap


def test_train_step_may_take_one_optimiser_step_per_modality(tmp_path, monkeypatch):
    """Alternating uni-modal updates (MLA, ReconBoost): a step per modality and batch, each through
    its own head slice, with the run's updater (clipping, mixed precision)."""
    calls = []

    @register(monkeypatch)
    class Alternating(Method):
        name = "test_alternating"

        def train_step(self, model, batch, update):
            out = None
            for m in self.info.modality_names:
                with update.autocast():
                    out = model(batch.inputs)
                    loss = F.cross_entropy(out.unimodal_logits[m], batch.labels)
                update.zero_grad()
                loss.backward()
                grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
                calls.append((batch.epoch, batch.step, m, grads))
                update.step()
            return StepResult(loss, out, {"steps_per_batch": float(len(self.info.modality_names))})

    out = tmp_path / "run"
    assert trainer.cli(FAST + ["--method", Alternating.name, "--ckpt_path", str(out)]) == 0
    steps_per_epoch = 40 // 16  # 40 samples, batch 16, the leftover 8 kept
    assert len(calls) == 2 * 3 * 2 == 2 * (steps_per_epoch + 1) * 2
    for _, _, m, grads in calls:  # each sub-step moves only its own encoder (and the head)
        other = "visual" if m == "audio" else "audio"
        assert any(g.startswith(f"encoders.{m}.") for g in grads)
        assert not any(g.startswith(f"encoders.{other}.") for g in grads)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[0]["train"]["steps_per_batch"] == 2.0


def test_a_first_stage_runs_once_into_the_run_folder_and_is_reread(tmp_path, monkeypatch):
    """Two-stage methods (uni-modal teachers first): the stage is this trainer run into
    <out>/<name>; a finished stage is re-read on resume, never retrained."""
    stages = []

    @register(monkeypatch)
    class TwoStage(Method):
        name = "test_two_stage"

        def before_training(self, ctx):
            folder = ctx.run_stage("teacher_visual", method="unimodal", unimodal_modality="visual", epochs=1)
            teacher = torch.load(folder / "best.pth", weights_only=True)
            stages.append((folder, teacher["epoch"], json.loads((folder / "results.json").read_text())["seconds"]))
            # The teacher's encoder starts the student's: a typical use of a first stage.
            own = {k[len("encoders.visual."):]: v for k, v in teacher["model"].items()
                   if k.startswith("encoders.visual.")}
            ctx.model.encoders["visual"].load_state_dict(own)

    out = tmp_path / "run"
    argv = FAST + ["--method", TwoStage.name, "--ckpt_path", str(out)]
    assert trainer.cli(argv) == 0
    folder, epoch, seconds = stages[0]
    assert folder == out / "teacher_visual" and epoch == 0
    assert json.loads((folder / "results.json").read_text())["method"] == "unimodal"
    # A longer run resumed from the same folder: the stage is re-read, not run again.
    assert trainer.cli(QUICK + ["--epochs", "3", "--method", TwoStage.name, "--ckpt_path", str(out), "--resume"]) == 0
    assert len(stages) == 2 and stages[1] == stages[0]
    assert [json.loads(line)["epoch"] for line in (out / "log.jsonl").read_text().splitlines()] == [0, 1, 2]


def test_a_method_builds_its_own_modules_with_the_model(tmp_path, monkeypatch):
    """Extra heads belong to the model (optimiser, checkpoint, DDP see them) and are rebuilt by
    --eval_only through the same factory."""

    @register(monkeypatch)
    class ExtraHeads(Method):
        name = "test_extra_heads"

        @classmethod
        def build_model(cls, info, **model_args):
            model = super().build_model(info, **model_args)
            dims = {m: model.encoders[m].out_dim for m in info.modality_names}
            model.extra_heads = nn.ModuleDict({m: nn.Linear(d, info.num_classes) for m, d in dims.items()})
            return model

        def loss(self, out, labels, epoch):
            heads = self.model.extra_heads
            uni = sum(F.cross_entropy(heads[m](out.features[m]), labels) for m in heads)
            return F.cross_entropy(out.logits, labels) + uni, {}

    out = tmp_path / "run"
    torch.manual_seed(0)
    assert trainer.cli(FAST + ["--method", ExtraHeads.name, "--ckpt_path", str(out)]) == 0
    last = torch.load(out / "last.pth", weights_only=True)
    assert {k for k in last["model"] if k.startswith("extra_heads.")} == {
        f"extra_heads.{m}.{p}" for m in ("audio", "visual") for p in ("weight", "bias")}
    momentum = last["optimizer"]["state"]
    n_params = sum(1 for k in last["model"] if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert len(momentum) == n_params  # every parameter, the extra heads included, was stepped
    assert trainer.cli(TINY + ["--ckpt_path", str(out), "--eval_only"]) == 0
    ev = json.loads((out / "eval.json").read_text())
    best = json.loads((out / "results.json").read_text())
    assert ev["test"]["acc"] == pytest.approx(best["test"]["acc"])


def test_a_method_can_resample_the_training_set_each_epoch(tmp_path, monkeypatch):
    """Per-sample re-sampling (sample-level modality valuation): epoch_indices decides which
    training samples an epoch draws (repeats allowed); the loop shuffles them."""
    seen = {}

    @register(monkeypatch)
    class Resample(Method):
        name = "test_resample"

        def epoch_indices(self, epoch, ctx):
            labels = ctx.extract_features("train")[1]
            if epoch == 0:
                return None
            chosen = torch.nonzero(labels < 5).flatten().tolist()
            return chosen + chosen[:8]  # the first eight twice

        def train_step(self, model, batch, update):
            seen.setdefault(batch.epoch, []).extend(batch.index.tolist())
            return super().train_step(model, batch, update)

    out = tmp_path / "run"
    assert trainer.cli(FAST + ["--method", Resample.name, "--ckpt_path", str(out)]) == 0
    from dnr.data import build_datasets

    args = trainer.get_args_parser().parse_args(TINY)
    labels = build_datasets("builtin", args).train.labels
    assert sorted(seen[0]) == list(range(40))
    chosen = torch.nonzero(labels < 5).flatten().tolist()
    assert sorted(seen[1]) == sorted(chosen + chosen[:8])
    assert seen[1] != sorted(seen[1])  # shuffled
