"""ReconBoost's training steps equal its authors' updates (SPEC section 4), and its schedule.

As in test_equivalence.py: one step of the project's method through `train_step` (a real SGD with
momentum and weight decay) on tiny encoders with BatchNorm is compared with an independent
re-derivation, written here from the authors' released code, to 1e-5 of every parameter's and
BatchNorm buffer's update; each re-derivation has broken variants that the comparison must report.

huacong/ReconBoost at 14ab57a (read in our words):
  train.py L329-334  out_join: `DynamicNet.forward(mask_model=m)` (models/dynamic_net.py L96-135):
                     the other learners already in the ensemble, in training mode, without
                     gradient, summed and multiplied by the boost rate; with an empty ensemble
                     (stage 0, no pretraining) the constant c0, seen as one column (softmax 1).
  train.py L336-340  out_obj = the learner of the stage's modality (encoder, then `fc`, which
                     L287-288 replaced by the shared `Head`); boosting loss per sample
                     -w1 mean_c(t log softmax(out_obj)) + w2 mean_c(t softmax(out_join) log softmax(out_obj)).
  train.py L344-352  from stage 1 on: the previous learner runs again (training mode),
                     ga = MSE(softmax(out_obj).detach(), softmax(pre).detach()); loss
                     mean(boosting + alpha ga), backward.
  train.py L296      phase 1's SGD (new per phase) holds model.parameters(): the encoder and the head.
  train.py L366-402  the learner joins the ensemble (`add`), then phase 2: a new SGD over
                     `net_ensemble.parameters()` (dynamic_net.py L59-73: the members' encoders,
                     the head once, the boost rate), CE(`forward_grad`) = CE(rate * sum of members).
  schedule.py L50-61 fixed mode: audio at even stages, visual at odd; MOSEI (L42-48) cycles three.
"""
import copy
import json

import pytest
import torch
import torch.nn.functional as F

from test_equivalence import B, INFO, differences, make_args, sgd, state, tiny_encoder  # noqa: F401 (autouse fixture)
from dnr.data import DatasetInfo, ModalitySpec
from dnr.engine import forward_pass
from dnr.methods import METHODS, create_method
from dnr.methods.reconboost import BoostedEnsemble, phase_of
from dnr.stepping import Batch, Updater

INFO3 = DatasetInfo("tiny3", ("a", "b", "c", "d"), tuple(ModalitySpec(m, "spectrogram", (1, 6, 6))
                                                        for m in ("audio", "visual", "sensor")))
W1, W2, ALPHA, RATE = 5.0, 1.0, 0.5, 1.7
# (info, epoch with --reconboost_boost_epochs 2 --reconboost_correct_epochs 1, modality, members, previous):
# written out by hand from the authors' schedule, not from phase_of.
BOOST_CASES = {
    "stage0": (INFO, 0, "audio", (), None),  # empty ensemble: q_y = 1
    "stage1": (INFO, 3, "visual", ("audio",), "audio"),
    "stage2": (INFO, 7, "audio", ("audio", "visual"), "visual"),
    "three_stage2": (INFO3, 6, "sensor", ("audio", "visual"), "visual"),
    "three_stage3": (INFO3, 9, "audio", ("audio", "visual", "sensor"), "sensor"),
}
RECTIFY_CASES = {
    "stage0": (INFO, 2, ("audio",)),
    "stage1": (INFO, 5, ("audio", "visual")),
    "three_stage1": (INFO3, 5, ("audio", "visual")),
}


def make(info, seed=0):
    """The method's model on tiny encoders, BatchNorm statistics moved off their defaults, a boost
    rate away from 1, and a fixed batch."""
    torch.manual_seed(seed)
    model = METHODS["reconboost"].build_model(info, encoders={m: "tiny_conv" for m in info.modality_names})
    with torch.no_grad():
        for _ in range(3):
            for m in info.modality_names:
                model.encoders[m](torch.randn(B, 1, 6, 6) * 2 + 0.5)
        model.fusion.rate.fill_(RATE)
    x = {m: torch.randn(B, 1, 6, 6) for m in info.modality_names}
    y = torch.arange(B) % info.num_classes
    return model, x, y


def args_for(**flags):
    return make_args(reconboost_boost_epochs=2, reconboost_correct_epochs=1, **flags)


def set_members(ref, members):
    """The authors' ensemble list, as the model's 0/1 buffer."""
    ref.fusion.members.copy_(torch.tensor([float(m in members) for m in ref.modalities]))


def learner(ref, m, x):
    return ref.fusion.head(ref.encoders[m](x[m]))  # the shared Head as every learner's fc


def reference_boost_grads(ref, x, y, modality, members, previous, consolidation="detached", variant=None):
    """Phase 1 gradients of one batch (train.py L329-352), on `ref` in place."""
    ref.train()
    rate = ref.fusion.rate
    if variant == "no_rate":
        rate = 1.0
    others_on = variant != "eval_mode_others"
    with torch.set_grad_enabled(variant == "others_with_grad"):
        ref.train(others_on)
        others = [learner(ref, j, x) for j in members if j != modality]
        ref.train()
        out_join = rate * sum(others) if others else None
    out_obj = learner(ref, modality, x)
    t = F.one_hot(y, out_obj.shape[1]).float()
    q = torch.ones(B, 1) if out_join is None else torch.softmax(out_join, 1)
    log_p = torch.log_softmax(out_obj, 1)
    reduce = (lambda v: v.sum(-1)) if variant == "sum_classes" else (lambda v: v.mean(-1))
    if variant == "no_reconcile":
        boosting = -W1 * reduce(t * log_p)
    elif variant == "sign":
        boosting = -W1 * reduce(t * log_p) - W2 * reduce(t * q * log_p)
    else:
        boosting = -W1 * reduce(t * log_p) + W2 * reduce(t * q * log_p)
    loss = boosting
    if previous is not None and variant != "one_pass":
        pre = learner(ref, previous, x)
        keep = consolidation == "gradient" or variant == "consolidation_gradient"
        ga = F.mse_loss((out_obj if keep else out_obj.detach()).softmax(1), pre.detach().softmax(1))
        loss = boosting + ALPHA * ga
    params = list(ref.encoders[modality].parameters()) + list(ref.fusion.head.parameters())
    grads = dict(zip(params, torch.autograd.grad(loss.mean(), params)))
    if variant == "all_parameters":  # every parameter stepped: the others decay
        grads = {p: grads.get(p, torch.zeros_like(p)) for p in ref.parameters()}
    return grads


def reference_rectify_grads(ref, x, y, members, variant=None):
    """Phase 2 gradients of one batch (train.py L397-402, dynamic_net.py L137-170), on `ref` in place."""
    ref.train()
    used = ref.modalities if variant == "all_learners" else members
    logits = [learner(ref, j, x) for j in used]
    total = sum(logits) / (len(logits) if variant == "mean_of_learners" else 1)
    loss = F.cross_entropy(ref.fusion.rate * total, y)
    params = [p for j in used for p in ref.encoders[j].parameters()] + list(ref.fusion.head.parameters())
    if variant != "fixed_rate":
        params.append(ref.fusion.rate)
    return dict(zip(params, torch.autograd.grad(loss, params)))


def sgd_step(ref, grads, opt=None):
    for p in ref.parameters():
        p.grad = grads.get(p)
    opt = opt or sgd(ref)  # SGD skips parameters without a gradient: the authors' per-phase parameter lists
    opt.step()
    return opt


def project(method, model, x, y, epoch, step=0, updater=None):
    model.train()
    updater = updater or Updater(model, sgd(model), "cpu")
    method.train_step(model, Batch(x, y, torch.arange(B), epoch, step), updater)
    return updater


def boost_compare(case, variant=None, consolidation="detached"):
    info, epoch, modality, members, previous = BOOST_CASES[case]
    model, x, y = make(info, seed=3)
    method = create_method("reconboost", args_for(reconboost_consolidation=consolidation), model, info)
    before = state(model)
    ref = copy.deepcopy(model)
    set_members(ref, members)
    sgd_step(ref, reference_boost_grads(ref, x, y, modality, members, previous, consolidation, variant))
    project(method, model, x, y, epoch)
    return differences(before, state(model), state(ref))


def rectify_compare(case, variant=None):
    info, epoch, members = RECTIFY_CASES[case]
    model, x, y = make(info, seed=4)
    method = create_method("reconboost", args_for(), model, info)
    before = state(model)
    ref = copy.deepcopy(model)
    set_members(ref, members)
    sgd_step(ref, reference_rectify_grads(ref, x, y, members, variant))
    project(method, model, x, y, epoch)
    return differences(before, state(model), state(ref))


@pytest.mark.parametrize("case", sorted(BOOST_CASES))
def test_reconboost_boosting_step_equals_the_authors_update(case):
    assert boost_compare(case) == []


@pytest.mark.parametrize("case", ["stage1", "three_stage3"])
def test_reconboost_consolidation_gradient_flag_equals_its_reading(case):
    assert boost_compare(case, consolidation="gradient") == []


@pytest.mark.parametrize("variant", ["no_reconcile", "sign", "sum_classes", "no_rate", "others_with_grad",
                                     "eval_mode_others", "one_pass", "consolidation_gradient", "all_parameters"])
def test_reconboost_boosting_comparison_fails_on_a_broken_update(variant):
    assert boost_compare("stage2", variant) != []


@pytest.mark.parametrize("case", sorted(RECTIFY_CASES))
def test_reconboost_rectification_step_equals_the_authors_update(case):
    assert rectify_compare(case) == []


@pytest.mark.parametrize("case,variant", [("stage1", "fixed_rate"), ("stage0", "all_learners"),
                                          ("stage1", "mean_of_learners")])
def test_reconboost_rectification_comparison_fails_on_a_broken_update(case, variant):
    assert rectify_compare(case, variant) != []


def reset_compare(variant=None):
    """Three steps with one optimiser: the last boosting batch (epoch 1, step 5), then the first
    two rectification batches (epoch 2): the authors build a fresh SGD for phase 2, so its first
    step has no momentum from phase 1, and its second has the first's."""
    model, x, y = make(INFO, seed=5)
    batches = [({m: v * s for m, v in x.items()}, y) for s in (1.0, 0.5, -0.8)]
    method = create_method("reconboost", args_for(), model, INFO)
    before = state(model)
    ref = copy.deepcopy(model)
    set_members(ref, ())
    opt = sgd_step(ref, reference_boost_grads(ref, *batches[0], "audio", (), None))
    set_members(ref, ("audio",))
    fresh = None if variant == "carry_momentum" else sgd(ref)
    opt = sgd_step(ref, reference_rectify_grads(ref, *batches[1], ("audio",)), fresh or opt)
    sgd_step(ref, reference_rectify_grads(ref, *batches[2], ("audio",)), None if variant == "fresh_every_step" else opt)
    updater = project(method, model, *batches[0], epoch=1, step=5)
    project(method, model, *batches[1], epoch=2, step=0, updater=updater)
    project(method, model, *batches[2], epoch=2, step=1, updater=updater)
    return differences(before, state(model), state(ref))


def test_reconboost_phases_start_with_a_fresh_optimiser_state():
    assert reset_compare() == []


@pytest.mark.parametrize("variant", ["carry_momentum", "fresh_every_step"])
def test_reconboost_reset_comparison_fails_on_a_broken_schedule(variant):
    assert reset_compare(variant) != []


# ---------------------------------------------------------------------- schedule and prediction
def test_reconboost_schedule_two_modalities_default():
    """Their defaults: 4 boosting + 4 rectification epochs per stage, audio at even stages; a
    learner joins the ensemble after its first boosting phase."""
    order = ("audio", "visual")
    table = [(p.stage, p.kind, p.modality, p.members, p.previous, p.opens)
             for p in (phase_of(e, order, 4, 4) for e in range(20))]
    assert table[0] == (0, "boost", "audio", (), None, True)
    assert table[1:4] == [(0, "boost", "audio", (), None, False)] * 3
    assert table[4] == (0, "rectify", "audio", ("audio",), None, True)
    assert table[7] == (0, "rectify", "audio", ("audio",), None, False)
    assert table[8] == (1, "boost", "visual", ("audio",), "audio", True)
    assert table[12] == (1, "rectify", "visual", ("audio", "visual"), "audio", True)
    assert table[16] == (2, "boost", "audio", ("audio", "visual"), "visual", True)
    assert [t[5] for t in table] == [e % 4 == 0 for e in range(20)]


def test_reconboost_schedule_three_modalities_and_pretraining():
    order = ("audio", "visual", "sensor")
    got = [(p.modality, p.members, p.previous) for p in (phase_of(e, order, 1, 0) for e in range(5))]
    assert got == [("audio", (), None), ("visual", ("audio",), "audio"), ("sensor", ("audio", "visual"), "visual"),
                   ("audio", order, "sensor"), ("visual", order, "audio")]
    assert all(phase_of(e, order, 1, 0).opens for e in range(5))  # no rectification: every epoch opens a phase
    assert phase_of(0, order, 4, 4, pretrained=True).members == order  # --use_pretrain: all learners from stage 0


def test_reconboost_prediction_is_the_ensemble_of_its_members():
    """The model's forward (what validation and test use) is rate * the sum of the members' learners,
    zeros with no member; the evaluation pass returns it."""
    model, x, y = make(INFO, seed=6)
    model.eval()
    with torch.no_grad():
        f = {m: learner(model, m, x) for m in INFO.modality_names}
        assert torch.equal(model(x).logits, torch.zeros(B, INFO.num_classes))
        set_members(model, ("visual",))
        assert torch.allclose(model(x).logits, RATE * f["visual"], atol=1e-6)
        set_members(model, ("audio", "visual"))
        assert torch.allclose(model(x).logits, RATE * (f["audio"] + f["visual"]), atol=1e-6)
        for m in f:
            assert torch.allclose(model(x).unimodal_logits[m], f[m], atol=1e-6)
    out = forward_pass(model, [{"inputs": x, "label": y}], "cpu")
    assert torch.allclose(out.logits, RATE * (f["audio"] + f["visual"]), atol=1e-6)
    assert model.state_dict()["fusion.members"].tolist() == [1.0, 1.0]  # a checkpoint evaluates as it trained


def test_reconboost_heads_shared_or_per_modality():
    shared = BoostedEnsemble({"a": 4, "b": 4}, 3)
    assert shared.shared and not hasattr(shared, "heads")
    own = BoostedEnsemble({"a": 4, "b": 2}, 3)  # features of different sizes: one Linear per learner
    assert not own.shared and set(own.heads) == {"a", "b"}
    own.set_members(("a", "b"))
    feats = {"a": torch.randn(5, 4), "b": torch.randn(5, 2)}
    assert torch.allclose(own(feats).logits, own.heads["a"](feats["a"]) + own.heads["b"](feats["b"]), atol=1e-6)


def test_reconboost_epoch_start_sets_the_members_and_state_round_trips():
    model, x, y = make(INFO3)
    method = create_method("reconboost", args_for(), model, INFO3)
    ctx = type("Ctx", (), {"model": model})()
    method.on_epoch_start(6, ctx)  # stage 2 boosts sensor: audio and visual are in
    assert model.fusion.members.tolist() == [1.0, 1.0, 0.0]
    method.pretrained = True
    other = create_method("reconboost", args_for(), model, INFO3)
    other.load_state_dict(method.state_dict())
    assert other.pretrained


@pytest.mark.parametrize("flag,value", [("reconboost_boost_epochs", 0), ("reconboost_correct_epochs", -1),
                                        ("reconboost_weight1", -1.0), ("reconboost_weight2", -0.1),
                                        ("reconboost_alpha", -1.0), ("reconboost_pretrain_epochs", -2),
                                        ("fusion", "sum")])
def test_reconboost_check_args_names_the_flag(flag, value):
    with pytest.raises(ValueError, match=f"--{flag}"):
        METHODS["reconboost"].check_args(make_args(**{flag: value}))


# ---------------------------------------------------------------------- first stage and resume
def test_reconboost_pretraining_loads_each_stage_once(tmp_path):
    """--reconboost_pretrain_epochs: one uni-modal stage per modality, its best encoder loaded; a
    resumed run (pretrained carried by the method state) does not load them again."""
    model, x, y = make(INFO, seed=7)
    donor, _, _ = make(INFO, seed=8)
    calls = []

    def run_stage(name, **flags):
        calls.append((name, flags))
        folder = tmp_path / name
        folder.mkdir()
        torch.save({"model": donor.state_dict(), "epoch": 0}, folder / "best.pth")
        return folder

    method = create_method("reconboost", args_for(reconboost_pretrain_epochs=3), model, INFO)
    ctx = type("Ctx", (), {"model": model, "run_stage": staticmethod(run_stage)})()
    method.before_training(ctx)
    assert [name for name, _ in calls] == ["reconboost_pretrain_audio", "reconboost_pretrain_visual"]
    assert calls[0][1]["method"] == "unimodal" and calls[0][1]["unimodal_modality"] == "audio"
    assert calls[0][1]["epochs"] == 3
    for k, v in donor.encoders.state_dict().items():
        assert torch.equal(model.encoders.state_dict()[k], v), k
    head_before = model.fusion.head.fc1.weight.clone()
    assert not torch.equal(head_before, donor.fusion.head.fc1.weight)  # the head stays fresh, as theirs
    resumed = create_method("reconboost", args_for(reconboost_pretrain_epochs=3), model, INFO)
    resumed.load_state_dict(method.state_dict())
    resumed.before_training(ctx)
    assert len(calls) == 2


def test_reconboost_pretraining_end_to_end(tmp_path):
    import main as trainer
    from conftest import TINY

    out = tmp_path / "run"
    rc = trainer.cli(TINY + ["--ckpt_path", str(out), "--method", "reconboost", "--epochs", "2", "--no-probe",
                             "--reconboost_pretrain_epochs", "1", "--reconboost_boost_epochs", "1",
                             "--reconboost_correct_epochs", "1"])
    assert rc == 0
    for m in ("audio", "visual"):
        assert (out / f"reconboost_pretrain_{m}" / "results.json").is_file()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    # Every learner is in the ensemble from stage 0: the boosting epoch already ran the other one.
    assert {"acc_audio", "acc_visual"} <= set(log[0]["train"]) and "reconboost_consolidation" not in log[0]["train"]


def test_reconboost_resume_mid_phase_matches_an_uninterrupted_run(tmp_path):
    """Cut after epoch 0 of a two-epoch boosting phase: the resumed run keeps the phase's optimiser
    state (no reset at a phase's second epoch) and ends with the same weights."""
    import main as trainer
    from conftest import TINY

    common = TINY + ["--method", "reconboost", "--no-probe", "--deterministic", "--device", "cpu",
                     "--reconboost_boost_epochs", "2", "--reconboost_correct_epochs", "1"]
    assert trainer.cli(common + ["--ckpt_path", str(tmp_path / "full"), "--epochs", "4"]) == 0
    assert trainer.cli(common + ["--ckpt_path", str(tmp_path / "cut"), "--epochs", "1"]) == 0
    assert trainer.cli(common + ["--ckpt_path", str(tmp_path / "cut"), "--epochs", "4", "--resume"]) == 0
    full = torch.load(tmp_path / "full" / "last.pth", weights_only=True)["model"]
    cut = torch.load(tmp_path / "cut" / "last.pth", weights_only=True)["model"]
    assert full["fusion.members"].tolist() == [1.0, 0.0]  # epoch 3 boosts visual; audio joined
    for k in full:
        assert torch.equal(full[k], cut[k]), k
