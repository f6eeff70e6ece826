"""UMT (Uni-Modal Teacher, Du et al., ICML 2023): one training step equals the paper's update, the
comparison fails on broken variants, and the teacher stage is a resumable first stage.

No released code of the authors exists (umt.py says where we looked), so the re-derivation below is
written from the paper (arXiv 2305.01233, the UMT objective; arXiv 2106.11059, the same objective in
its first version): cross-entropy of the fused logits plus, per modality, the mean squared error
between the multimodal encoder's feature (the fusion head's input) and the frozen uni-modal
teacher's feature of the same input."""
import copy
import json
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import CODE, TINY
from dnr.methods import create_method
from dnr.models import create_model
from test_equivalence import (B, INFO, build, differences, make_args, project_step, reference_step, state,
                              tiny_encoder)  # noqa: F401  (tiny_encoder: the autouse fixture)

sys.path.insert(0, str(CODE))
import main as trainer  # noqa: E402

WEIGHT = 2.5  # not 1, so a weight left out shows


def make_teachers(seed=1):
    """Tiny uni-modal models (encoder + Linear), BatchNorm statistics off their defaults."""
    torch.manual_seed(seed)
    teachers = {}
    for m in INFO.modality_names:
        t = create_model(INFO.restrict([m]), encoders={m: "tiny_conv"})
        with torch.no_grad():
            for _ in range(2):
                t({m: torch.randn(B, 1, 6, 6) * 3 - 0.5})
        teachers[m] = t.eval()
    return teachers


def umt_reference(model, teachers, x, y, weight, variant=None):
    """Gradients of CE(fused) + weight * sum_m mean((z_m - t_m)^2), teachers frozen in eval mode."""
    ref = copy.deepcopy(model).train()
    teachers = copy.deepcopy(teachers)
    other = {"audio": "visual", "visual": "audio"}
    with torch.no_grad():
        for t in teachers.values():
            t.train(variant == "teacher_train_mode")
        targets = {}
        for m in INFO.modality_names:
            src = other[m] if variant == "swapped_teachers" else m  # the other teacher on this input
            targets[m] = teachers[m](x) if variant == "teacher_logits" else teachers[src].encoders[src](x[m])
    out = ref(x)
    loss = F.cross_entropy(out.logits, y)
    for m in INFO.modality_names:
        if variant == "teacher_logits":  # distillation of the predictions (classic KD), not the features
            term = F.mse_loss(out.unimodal_logits[m], targets[m].logits)
        elif variant == "sum_reduction":
            term = ((out.features[m] - targets[m]) ** 2).sum()
        else:
            term = F.mse_loss(out.features[m], targets[m])
        loss = loss + (1.0 if variant == "no_weight" else weight) * term
    if variant == "ce_only":
        loss = F.cross_entropy(out.logits, y)
    params = list(ref.parameters())
    return ref, dict(zip(params, torch.autograd.grad(loss, params)))


def umt_compare(variant=None):
    model, x, y = build("umt")
    teachers = make_teachers()
    teacher_before = {m: state(t) for m, t in teachers.items()}
    method = create_method("umt", make_args(umt_weight=WEIGHT), model, INFO)
    method.set_teachers(teachers)
    before = state(model)
    ref, grads = umt_reference(model, teachers, x, y, WEIGHT, variant)
    want = reference_step(ref, grads)
    got = project_step(method, model, x, y)
    # The teachers never change: no step, and no BatchNorm statistics updated by their passes.
    frozen = [f"teacher {m} {k} changed" for m, t in teachers.items() for k, v in state(t).items()
              if not torch.equal(v, teacher_before[m][k])]
    return frozen + differences(before, got, want)


def test_umt_step_equals_the_papers_update():
    assert umt_compare() == []


@pytest.mark.parametrize("variant", ["teacher_train_mode", "no_weight", "sum_reduction", "teacher_logits",
                                     "swapped_teachers", "ce_only"])
def test_umt_comparison_fails_on_a_broken_update(variant):
    assert umt_compare(variant) != []


def test_umt_refuses_bad_flags():
    from dnr.methods import METHODS

    with pytest.raises(ValueError, match="--umt_weight"):
        METHODS["umt"].check_args(make_args(umt_weight=-1.0))
    with pytest.raises(ValueError, match="--umt_teacher_epochs"):
        METHODS["umt"].check_args(make_args(umt_teacher_epochs=-1))


# ---------------------------------------------------------------------- the teacher stage, end to end
QUICK = TINY + ["--reinit_epoch", "0", "--no-probe", "--method", "umt"]


def epochs_of(folder):
    return [json.loads(line)["epoch"] for line in (folder / "log.jsonl").read_text().splitlines()]


def test_umt_teachers_are_a_first_stage_and_a_cut_one_resumes(tmp_path, monkeypatch, capsys):
    """The teachers train into <out>/teacher_<m> before the multimodal model; a run cut inside a
    teacher's stage continues with --resume from that teacher's last finished epoch; a finished run
    resumed for more epochs re-reads its teachers and never retrains them."""
    out = tmp_path / "run"
    argv = QUICK + ["--epochs", "2", "--umt_teacher_epochs", "2", "--ckpt_path", str(out)]
    real, calls = trainer.train_one_epoch, []

    def cut_in_second_teacher(*args, **kw):  # epochs: audio 0, 1; visual 0, then stop
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(trainer, "train_one_epoch", cut_in_second_teacher)
    assert trainer.cli(argv) == 130
    assert epochs_of(out / "teacher_audio") == [0, 1] and (out / "teacher_audio" / "results.json").exists()
    assert epochs_of(out / "teacher_visual") == [0] and not (out / "teacher_visual" / "results.json").exists()
    assert not (out / "last.pth").exists()
    assert "--resume" in trainer.stop_message(trainer.get_args_parser().parse_args(argv), argv, 2)

    monkeypatch.setattr(trainer, "train_one_epoch", real)
    counted = []
    monkeypatch.setattr(trainer, "train_one_epoch", lambda *a, **k: counted.append(1) or real(*a, **k))
    assert trainer.cli(argv + ["--resume"]) == 0
    assert len(counted) == 1 + 2  # the visual teacher's epoch 1, then the multimodal model's two epochs
    assert epochs_of(out / "teacher_visual") == [0, 1] and epochs_of(out) == [0, 1]
    res = json.loads((out / "results.json").read_text())
    assert res["method"] == "umt"
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert {"loss_ce", "umt_mse_audio", "umt_mse_visual"} <= set(log[0]["train"])

    counted.clear()
    assert trainer.cli(QUICK + ["--epochs", "3", "--umt_teacher_epochs", "2", "--ckpt_path", str(out),
                                "--resume"]) == 0
    assert len(counted) == 1 and epochs_of(out) == [0, 1, 2]
    # Teachers of another schedule than the flag asks for are refused, naming the flag.
    capsys.readouterr()
    assert trainer.cli(QUICK + ["--epochs", "4", "--umt_teacher_epochs", "3", "--ckpt_path", str(out),
                                "--resume"]) == 1
    assert "trained for 2 epochs" in capsys.readouterr().err


def test_umt_refuses_teachers_that_changed_under_a_resumed_run(tmp_path, capsys):
    out = tmp_path / "run"
    argv = QUICK + ["--umt_teacher_epochs", "1", "--ckpt_path", str(out)]
    assert trainer.cli(argv + ["--epochs", "1"]) == 0
    best = out / "teacher_audio" / "best.pth"
    saved = torch.load(best, weights_only=True)
    saved["epoch"] = 7  # another selected teacher
    torch.save(saved, best)
    capsys.readouterr()
    assert trainer.cli(argv + ["--epochs", "2", "--resume"]) == 1
    assert "teachers selected at epochs {'audio': 0, 'visual': 0}" in capsys.readouterr().err
