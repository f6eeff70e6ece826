"""UME (Uni-Modal Ensemble, Du et al., ICML 2023): the model the trainer evaluates gives the mean of
the separately trained uni-modal models' predictions, the comparison fails on broken variants, the
run trains nothing, and results.json holds the ensemble's val-selected test accuracy.

No released code of the authors exists (umt.py says where we looked); the re-derivation below is
written from the paper (arXiv 2305.01233): each uni-modal model (encoder + linear classifier) in
evaluation mode, their logits averaged (or, with --ume_combine softmax, their probabilities)."""
import json
import math
import sys

import pytest
import torch
from torch.utils.data import DataLoader

from conftest import CODE, TINY
from dnr.methods import METHODS, create_method
from dnr.methods.ume import UnimodalEnsemble
from dnr.metrics import accuracy
from dnr.models import create_model
from test_equivalence import B, INFO, make_args, tiny_encoder  # noqa: F401  (tiny_encoder: the autouse fixture)
from test_equivalence_umt import make_teachers

sys.path.insert(0, str(CODE))
import main as trainer  # noqa: E402


def ume_reference(teachers, x, combine, variant=None):
    """The ensemble's logits from the uni-modal models themselves."""
    other = {"audio": "visual", "visual": "audio"}
    logits = []
    for m in INFO.modality_names:
        t = teachers[m]
        t.train(variant == "train_mode")
        with torch.no_grad():
            src = other[m] if variant == "swapped_members" else m  # the other member's weights on this input
            z = teachers[src].encoders[src](x[m])
            logits.append(teachers[src].fusion({src: z}).logits)
    stacked = torch.stack(logits)  # (M, B, C)
    if variant == "other_combine":
        combine = "softmax" if combine == "logits" else "logits"
    if variant == "sum":
        return stacked.sum(0)
    if combine == "logits":
        return stacked.mean(0)
    return torch.log(torch.softmax(stacked, -1).mean(0))


def ume_compare(combine, variant=None):
    teachers = make_teachers()
    torch.manual_seed(3)
    ensemble = UnimodalEnsemble(INFO, encoders={m: "tiny_conv" for m in INFO.modality_names})
    method = create_method("ume", make_args(ume_combine=combine), ensemble, INFO)
    for m, t in teachers.items():
        ensemble.load_member(m, t.state_dict())
    x = {m: torch.randn(B, 1, 6, 6) for m in INFO.modality_names}
    ensemble.eval()
    with torch.no_grad():
        out = ensemble(x)
    want = ume_reference(teachers, x, combine, variant)
    problems = []
    if not torch.allclose(out.logits, want, atol=1e-5, rtol=1e-5):
        problems.append(f"logits {float((out.logits - want).abs().max()):.2e} apart")
    for m, t in teachers.items():  # each member's own logits are the run's per-modality logits
        t.eval()
        with torch.no_grad():
            if not torch.allclose(out.unimodal_logits[m], t(x).logits, atol=1e-6):
                problems.append(f"member {m}'s logits differ")
    assert method.epoch_indices(0, None) == []  # the run trains nothing
    return problems


@pytest.mark.parametrize("combine", ["logits", "softmax"])
def test_ume_logits_equal_the_mean_of_the_members(combine):
    assert ume_compare(combine) == []


@pytest.mark.parametrize("combine, variant", [("logits", "sum"), ("logits", "other_combine"),
                                              ("softmax", "other_combine"), ("logits", "swapped_members"),
                                              ("logits", "train_mode")])
def test_ume_comparison_fails_on_a_broken_ensemble(combine, variant):
    assert ume_compare(combine, variant) != []


def test_ume_softmax_logits_are_the_log_mean_probability():
    teachers = make_teachers()
    ensemble = UnimodalEnsemble(INFO, encoders={m: "tiny_conv" for m in INFO.modality_names}, combine="softmax")
    for m, t in teachers.items():
        ensemble.load_member(m, t.state_dict())
    ensemble.eval()
    with torch.no_grad():
        out = ensemble({m: torch.randn(B, 1, 6, 6) for m in INFO.modality_names})
    probs = torch.stack([torch.softmax(u, 1) for u in out.unimodal_logits.values()]).mean(0)
    assert torch.allclose(torch.softmax(out.logits, 1), probs, atol=1e-6)
    assert torch.allclose(out.logits.exp().sum(1), torch.ones(B), atol=1e-5)
    assert math.isclose(float(out.logits.logsumexp(1).abs().max()), 0.0, abs_tol=1e-5)


def test_ume_refuses_bad_flags_and_foreign_members():
    with pytest.raises(ValueError, match="--ume_teacher_epochs"):
        METHODS["ume"].check_args(make_args(ume_teacher_epochs=-2))
    ensemble = UnimodalEnsemble(INFO, encoders={m: "tiny_conv" for m in INFO.modality_names})
    two = create_model(INFO, encoders={m: "tiny_conv" for m in INFO.modality_names})
    with pytest.raises(ValueError, match="not a uni-modal model of 'audio'"):
        ensemble.load_member("audio", two.state_dict())


# ---------------------------------------------------------------------- end to end
def members_accuracy(out, split, combine):
    """The ensemble's accuracy on `split`, computed here from the members' own best.pth."""
    args = trainer.get_args_parser().parse_args(TINY)
    splits = trainer.load_data(args, "baseline")
    data = dict(splits.items())[split]
    logits = []
    for m in splits.info.modality_names:
        saved = torch.load(out / f"teacher_{m}" / "best.pth", weights_only=True)
        model = create_model(splits.info.restrict([m]), **saved["model_args"])
        model.load_state_dict(saved["model"])
        model.eval()
        with torch.no_grad():
            rows = [model({m: b["inputs"][m]}).logits for b in DataLoader(data, batch_size=8)]
        logits.append(torch.cat(rows))
    stacked = torch.stack(logits)
    fused = stacked.mean(0) if combine == "logits" else torch.softmax(stacked, -1).mean(0).log()
    return accuracy(fused, torch.as_tensor(data.labels))


@pytest.mark.parametrize("combine", ["logits", "softmax"])
def test_ume_run_reports_the_ensembles_val_selected_test_accuracy(combine, tmp_path):
    out = tmp_path / "run"
    argv = TINY + ["--reinit_epoch", "0", "--no-probe", "--method", "ume", "--ume_combine", combine,
                   "--ume_teacher_epochs", "2", "--epochs", "2", "--ckpt_path", str(out)]
    assert trainer.cli(argv) == 0
    res = json.loads((out / "results.json").read_text())
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["val"]["acc"] for r in log] == [log[0]["val"]["acc"]] * 2  # nothing trains: same every epoch
    assert res["best_epoch"] == 0
    assert res["test"]["acc"] == pytest.approx(members_accuracy(out, "test", combine))
    assert res["val"]["acc"] == pytest.approx(members_accuracy(out, "val", combine))
    for m in ("audio", "visual"):  # per-modality accuracy = each member's own test accuracy
        member = json.loads((out / f"teacher_{m}" / "results.json").read_text())
        assert res["unimodal_test_acc"][m] == pytest.approx(member["test"]["acc"])
    # The run's checkpoint holds the members unchanged, and --eval_only evaluates the same ensemble.
    best = torch.load(out / "best.pth", weights_only=True)["model"]
    for m in ("audio", "visual"):
        member = torch.load(out / f"teacher_{m}" / "best.pth", weights_only=True)["model"]
        for k, v in member.items():
            mine = k.replace("fusion.", f"heads.{m}.") if k.startswith("fusion.") else k
            assert torch.equal(best[mine], v), k
    assert trainer.cli(TINY + ["--ckpt_path", str(out), "--eval_only"]) == 0
    assert json.loads((out / "eval.json").read_text())["test"]["acc"] == pytest.approx(res["test"]["acc"])
