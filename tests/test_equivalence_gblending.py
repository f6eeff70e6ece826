"""Gradient-Blending (CVPR 2020) against the authors' released loss and the paper's weight estimate.

The training step is compared with a re-derivation of the authors' released Caffe2 loss
(facebookresearch/VMZ at 4cc542d); the weight estimate (never released) with a re-derivation of the
paper's Algorithm 1 and Eq. 3; the schedule with Algorithms 2-3 and the paper's Sec. 3.3 super-epochs.
Each comparison is also run against broken variants, which it must report as different.
"""
import copy
import functools
import types

import pytest
import torch
import torch.nn.functional as F

from dnr.methods import METHODS, create_method
from dnr.methods.gblending import FUSED, blend_weights, schedule
from dnr.stepping import Batch, Updater
from test_equivalence import (B, INFO, LR, MOMENTUM, WD, build, differences, encode, fused, make_args,  # noqa: F401
                              project_step, reference_step, state, tiny_encoder)

HEADS = ["audio", "visual", FUSED]
RUN = dict(optimizer="sgd", learning_rate=LR, momentum=MOMENTUM, weight_decay=WD, lr_decay_step=0,
           lr_decay_ratio=0.1, random_seed=0, amp="off", grad_clip=0.0, epochs=4)


# ====================================================================== the step
# facebookresearch/VMZ at 4cc542d: c2/lib/models/audio_visual_model.py L483-498 (with g_blend, one
# FC classifier on each modality's pooled feature beside the fused classifier);
# c2/lib/models/loss/loss_creator.py L119-200 (softmax cross-entropy of the fused, audio and visual
# logits, each scaled by loss_scale, then by av_weight, audio_weight, visual_weight, and summed).
def step_reference(model, x, y, weights, variant=None):
    ref = copy.deepcopy(model)
    feats = encode(ref, x)
    w = dict(weights)
    if variant == "unweighted":
        w = {k: 1.0 for k in w}
    if variant == "swapped":
        w["audio"], w["visual"] = w["visual"], w["audio"]
    if variant == "fused_only":
        w = {"audio": 0.0, "visual": 0.0, FUSED: 1.0}
    if variant == "slice_heads":  # the fusion head's slices instead of the method's own classifiers
        fc = ref.fusion.fc
        uni = {"audio": feats["audio"] @ fc.weight[:, :4].t() + fc.bias / 2,
               "visual": feats["visual"] @ fc.weight[:, 4:].t() + fc.bias / 2}
    else:
        uni = {m: ref.unimodal_heads[m](feats[m].detach() if variant == "detached" else feats[m]) for m in feats}
    loss = (w["audio"] * F.cross_entropy(uni["audio"], y) + w["visual"] * F.cross_entropy(uni["visual"], y)
            + w[FUSED] * F.cross_entropy(fused(ref, feats), y))
    params = list(ref.parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return ref, {p: g for p, g in zip(params, grads) if g is not None}


def step_compare(variant=None):
    model, x, y = build("gblending", seed=2)
    method = create_method("gblending", make_args(**RUN), model, INFO)
    method.weights = {"audio": 0.2, "visual": 0.5, FUSED: 0.3}
    before = state(model)
    ref, grads = step_reference(model, x, y, method.weights, variant)
    want = reference_step(ref, grads)
    got = project_step(method, model, x, y)
    return differences(before, got, want)


def test_gblending_step_equals_the_authors_weighted_loss():
    assert step_compare() == []


@pytest.mark.parametrize("variant", ["unweighted", "swapped", "fused_only", "slice_heads", "detached"])
def test_gblending_step_comparison_fails_on_a_broken_loss(variant):
    assert step_compare(variant) != []


# ====================================================================== the weight formula
# The paper (CVPR 2020) Sec. 2.2, Fig. 3 and Eq. 3: O_N = L^V_N - L^T_N, dO = O_{N+n} - O_N,
# dG = L^V_N - L^V_{N+n}; Algorithm 1's last line and Proposition 1 (Eq. 6): w_k = G_k / O_k^2 / Z
# under the constraint sum_k w_k = 1.
def formula_reference(before, after, variant=None):
    raw = {}
    for k in before:
        (t0, v0), (t1, v1) = before[k], after[k]
        over = (v1 - t1) - (v0 - t0)
        if variant == "level":  # the overfitting at N + n instead of its change
            over = v1 - t1
        gain = (t0 - t1) if variant == "train_gain" else (v0 - v1)
        raw[k] = gain / (abs(over) if variant == "not_squared" else over * over)
    z = sum(raw.values())
    if variant == "unnormalised":
        z = 1.0
    if variant == "z_with_2":  # Proposition 1's Z as printed: sum of G / (2 O^2)
        z = sum(v / 2 for v in raw.values())
    return {k: v / z for k, v in raw.items()}


BEFORE = {"audio": (2.0, 2.1), "visual": (2.0, 2.05), FUSED: (2.0, 2.0)}
AFTER = {"audio": (1.0, 1.9), "visual": (0.5, 1.2), FUSED: (0.2, 1.5)}


def test_gblending_weights_equal_a_hand_derivation():
    # by hand: audio dO = 0.9 - 0.1 = 0.8, dG = 0.2 -> 0.3125; visual dO = 0.7 - 0.05, dG = 0.85 ->
    # 2.011834; fused dO = 1.3, dG = 0.5 -> 0.295858; Z = 2.620192
    got, parts = blend_weights(BEFORE, AFTER)
    assert got == pytest.approx({"audio": 0.119266, "visual": 0.767819, FUSED: 0.112915}, abs=2e-6)
    assert got == pytest.approx(formula_reference(BEFORE, AFTER), rel=1e-9)
    assert sum(got.values()) == pytest.approx(1.0)
    assert parts["audio"]["dO"] == pytest.approx(0.8) and parts["audio"]["dG"] == pytest.approx(0.2)
    assert parts["audio"]["ogr"] == pytest.approx(4.0)


@pytest.mark.parametrize("variant", ["level", "train_gain", "not_squared", "unnormalised", "z_with_2"])
def test_gblending_weight_comparison_fails_on_a_broken_formula(variant):
    got, _ = blend_weights(BEFORE, AFTER)
    want = formula_reference(BEFORE, AFTER, variant)
    assert max(abs(got[k] - want[k]) for k in got) > 1e-3


def test_gblending_heads_that_did_not_generalise():
    after = dict(AFTER, audio=(1.0, 2.3))  # audio's validation loss went up: weight 0
    got, _ = blend_weights(BEFORE, after)
    assert got["audio"] == 0 and sum(got.values()) == pytest.approx(1.0)
    worse = {k: (t, v + 1.0) for k, (t, v) in BEFORE.items()}  # nothing generalised: keep the previous
    previous = {"audio": 0.1, "visual": 0.6, FUSED: 0.3}
    assert blend_weights(BEFORE, worse, previous)[0] == previous
    assert blend_weights(BEFORE, worse)[0] == pytest.approx({k: 1 / 3 for k in HEADS})


# ====================================================================== the schedule
# The paper's Algorithm 3 (online: estimate at the start of every super-epoch, for that
# super-epoch's length), Algorithm 2 (offline: once, from the initial model, over all N epochs) and
# Sec. 3.3 (Kinetics: a first super-epoch of 10 epochs, then 5).
def test_gblending_schedule():
    assert schedule(22, "online", 10, 5) == {0: 10, 10: 5, 15: 5, 20: 2}
    assert schedule(8, "online", 10, 5) == {0: 8}
    assert schedule(7, "online", 0, 3) == {0: 3, 3: 3, 6: 1}
    assert schedule(22, "offline", 10, 5) == {0: 22}


@pytest.mark.parametrize("kind, warmup, n, want", [("online", 2, 1, [(0, 2), (2, 1), (3, 1)]),
                                                   ("offline", 2, 1, [(0, 4)])])
def test_gblending_estimates_at_the_scheduled_epochs(monkeypatch, kind, warmup, n, want):
    model, _, _ = build("gblending")
    args = make_args(**RUN, gblending_schedule=kind, gblending_warmup=warmup, gblending_super_epoch=n)
    method = create_method("gblending", args, model, INFO)
    calls = []
    ctx = fake_context(model)

    def separate(net, ctx, epoch, n):
        calls.append((epoch, n))
        return {k: (t - 0.5, v - 0.1 * (len(calls))) for k, (t, v) in BEFORE.items()}

    monkeypatch.setattr(method, "separate_measures", separate)
    monkeypatch.setattr("dnr.methods.gblending.measures", lambda *a, **k: dict(BEFORE))
    for epoch in range(4):
        method.on_epoch_start(epoch, ctx)
        extra = method.on_epoch_end(epoch, ctx)
        assert ("gblending_estimate" in extra) == (epoch in dict(want))
        assert extra["gblending_weights"] == method.weights
    assert calls == want
    assert [h["epoch"] for h in method.history] == [e for e, _ in want]


def test_gblending_fixed_weights_skip_estimation(monkeypatch):
    model, _, _ = build("gblending")
    args = make_args(**RUN, gblending_weights="audio=0.014,visual=0.63,fused=0.356")
    method = create_method("gblending", args, model, INFO)
    monkeypatch.setattr(method, "separate_measures", lambda *a: pytest.fail("estimated"))
    method.on_epoch_start(0, fake_context(model))
    assert method.weights == {"audio": 0.014, "visual": 0.63, FUSED: 0.356}


# ====================================================================== Algorithm 1 (GB Estimate)
# The paper's Algorithm 1: for each of the k + 1 heads, a network initialised from the checkpoint's
# parameters (the uni-modal one: that modality's trunk and classifier; the naive multimodal one:
# every trunk and the fused classifier) is trained n epochs on that head's loss alone; overfitting
# and generalisation of the head are measured before and after (Eq. 3), on the held-out split V and
# the training split T', and the weights follow (sum 1). Optimiser: SGD with the run's settings.
def toy_data():
    """Learnable tiny data: a class-dependent offset in every modality."""
    g = torch.Generator().manual_seed(5)

    def split(n):
        y = torch.arange(n) % INFO.num_classes
        x = {m: torch.randn(n, 1, 6, 6, generator=g) + (y.float() - 1.5)[:, None, None, None] * (1 + i)
             for i, m in enumerate(INFO.modality_names)}
        return x, y

    return split(16), split(8)


def fake_context(model):
    (xt, yt), (xv, yv) = toy_data()

    def features_of(net, split):
        x = xt if split == "train" else xv
        net.eval()
        with torch.no_grad():
            return net.encode(x), (yt if split == "train" else yv)

    def train_batches(epoch):
        return [Batch({m: v[i:i + B] for m, v in xt.items()}, yt[i:i + B], torch.arange(i, i + B), epoch, i // B)
                for i in range(0, 16, B)]

    return types.SimpleNamespace(model=model, device="cpu", train_loader=None, broadcast=lambda o: o,
                                 extract_features=functools.partial(features_of, model),
                                 extract_features_of=features_of, train_batches=train_batches)


def estimate_reference(model, ctx, n, variant=None):
    def logits(net, k, feats):
        return net.fusion(feats).logits if k == FUSED else net.unimodal_heads[k](feats[k])

    def measure(net, k):
        out = []
        for x_y in ("train", "val"):
            feats, y = ctx.extract_features_of(net, x_y)
            if variant == "train_mode":  # BatchNorm on batch statistics while measuring
                net.train()
                with torch.no_grad():
                    feats = net.encode({m: v for m, v in toy_inputs(x_y).items()})
            with torch.no_grad():
                out.append(float(F.cross_entropy(logits(net, k, feats), y)))
        return tuple(out)

    before = {k: measure(model, k) for k in HEADS}
    after = {}
    for k in HEADS:
        side = copy.deepcopy(model).train()
        if k == FUSED:
            params = list(side.encoders.parameters()) + list(side.fusion.parameters())
        else:
            params = list(side.encoders[k].parameters()) + list(side.unimodal_heads[k].parameters())
        if variant == "blended_loss":
            params = list(side.parameters())
        opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WD)
        for e in range(1 if variant == "one_epoch" else n):
            for batch in ctx.train_batches(e):
                if variant == "blended_loss":  # the copy learns from every head's loss
                    feats = side.encode(batch.inputs)
                    loss = sum(F.cross_entropy(logits(side, h, feats), batch.labels) for h in HEADS) / 3
                else:
                    mods = INFO.modality_names if k == FUSED else [k]
                    feats = {m: side.encoders[m](batch.inputs[m]) for m in mods}
                    loss = F.cross_entropy(logits(side, k, feats), batch.labels)
                opt.zero_grad()
                loss.backward()
                opt.step()
        after[k] = measure(side, k)
    return formula_reference(before, after)


def toy_inputs(split):
    (xt, _), (xv, _) = toy_data()
    return xt if split == "train" else xv


def estimate_compare(variant=None):
    model, _, _ = build("gblending", seed=3)
    ctx = fake_context(model)
    method = create_method("gblending", make_args(**RUN, gblending_warmup=0, gblending_super_epoch=2), model, INFO)
    start = state(model)
    want = estimate_reference(copy.deepcopy(model), ctx, 2, variant)
    method.on_epoch_start(0, ctx)
    got = method.weights
    if variant is None:  # a case in which every head generalised, the main model untouched
        assert all(w > 0 for w in got.values()), got
        assert method.history[0]["epochs_ahead"] == 2
        assert all(torch.equal(v, start[k]) for k, v in state(model).items())
    return max(abs(got[k] - want[k]) / max(want[k], 1e-12) for k in HEADS)


def test_gblending_estimate_equals_algorithm_1():
    assert estimate_compare() < 1e-5


@pytest.mark.parametrize("variant", ["blended_loss", "one_epoch", "train_mode"])
def test_gblending_estimate_comparison_fails_on_a_broken_recipe(variant):
    assert estimate_compare(variant) > 1e-3


# ====================================================================== state and flags
def test_gblending_state_survives_a_checkpoint(tmp_path):
    model, _, _ = build("gblending")
    args = make_args(**RUN, gblending_estimate="joint", gblending_warmup=0, gblending_super_epoch=1)
    method = create_method("gblending", args, model, INFO)
    ctx = fake_context(model)
    for epoch in range(2):
        method.on_epoch_start(epoch, ctx)
        ctx.model.train()
        for batch in ctx.train_batches(epoch):
            method.train_step(model, batch, Updater(model, torch.optim.SGD(model.parameters(), lr=LR), "cpu"))
    assert len(method.history) == 1 and method.reference is not None
    torch.save(method.state_dict(), tmp_path / "m.pth")
    again = create_method("gblending", args, model, INFO)
    again.load_state_dict(torch.load(tmp_path / "m.pth", weights_only=True))
    assert again.weights == method.weights and again.weights != {k: 1 / 3 for k in HEADS}
    assert again.reference == method.reference and again.history == method.history
    with pytest.raises(KeyError, match="Gradient-Blending"):
        again.load_state_dict({})


@pytest.mark.parametrize("flags, message", [
    (dict(gblending_super_epoch=0), "--gblending_super_epoch must be >= 1"),
    (dict(gblending_warmup=-1), "--gblending_warmup must be >= 0"),
    (dict(gblending_weights="audio=0.5,fused"), "--gblending_weights: 'fused' is not head=weight"),
])
def test_gblending_check_args(flags, message):
    with pytest.raises(ValueError, match=message):
        METHODS["gblending"].check_args(make_args(**RUN, **flags))


def test_gblending_weights_must_name_every_head():
    model, _, _ = build("gblending")
    with pytest.raises(ValueError, match="--gblending_weights names"):
        create_method("gblending", make_args(**RUN, gblending_weights="audio=0.5,fused=0.5"), model, INFO)


# ====================================================================== the trainer
@pytest.mark.parametrize("flags", [
    ["--gblending_estimate", "joint", "--gblending_warmup", "0", "--gblending_super_epoch", "1"],  # reference kept
    ["--gblending_schedule", "offline"],  # the weights of epoch 0's estimate kept
])
def test_gblending_resume_matches_uninterrupted_run(tmp_path, monkeypatch, flags):
    import test_main
    from test_main import _results_without_timing, read_log, run, trainer

    common = ["--method", "gblending", "--epochs", "3", "--deterministic", "--device", "cpu", "--no-probe"] + flags
    rc, full = run(common, tmp_path, "full")
    assert rc == 0
    estimated = [r["epoch"] for r in read_log(full) if "gblending_estimate" in r]
    assert estimated == ([1, 2] if "joint" in flags else [0])
    say = trainer.say

    def stop_after_epoch_0(*parts):
        say(*parts)
        if str(parts[0]).startswith("epoch   0/"):  # printed once epoch 0's checkpoint is written
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "say", stop_after_epoch_0)
    rc, cut = run(common, tmp_path, "cut")
    assert rc != 0 and not (cut / "results.json").exists()
    monkeypatch.setattr(trainer, "say", say)
    rc, _ = run(common + ["--resume"], tmp_path, "cut")
    assert rc == 0
    assert _results_without_timing(cut / "results.json") == _results_without_timing(full / "results.json")
    assert [r["train"]["loss"] for r in read_log(cut)] == [r["train"]["loss"] for r in read_log(full)]
    assert test_main.EXTRA["gblending"]  # the registry-wide end-to-end tests run it on a short schedule


def test_gblending_copies_see_each_epochs_own_order():
    """A copy's epoch e draws the run's epoch-e order (the sampler's (seed, epoch) seed); the
    sampler is handed back set for the epoch the run is about to train."""
    from dnr.distributed import EpochBatchSampler
    from dnr.runtime import epoch_seed

    model, _, _ = build("gblending")
    ctx = fake_context(model)
    sampler = EpochBatchSampler(16, B)
    sampler.set_epoch(epoch_seed(0, 3))
    ctx.train_loader = types.SimpleNamespace(batch_sampler=sampler)
    seen, batches = [], ctx.train_batches

    def recording(epoch):
        seen.append((epoch, sampler.seed))
        return batches(epoch)

    ctx.train_batches = recording
    args = make_args(**dict(RUN, epochs=6), gblending_warmup=0, gblending_super_epoch=2)
    create_method("gblending", args, model, INFO).on_epoch_start(4, ctx)
    assert seen == [(4, epoch_seed(0, 4)), (5, epoch_seed(0, 5))] * 3  # three heads, two epochs each
    assert sampler.seed == epoch_seed(0, 3) and sampler.indices is None
