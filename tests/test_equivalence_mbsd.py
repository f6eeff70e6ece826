"""MBSD's training step equals the update of the only public MBSD code (SPEC section 4), and the
comparison fails on broken variants. Helpers (tiny conv encoders, SGD with momentum and weight
decay, the tolerance) come from test_equivalence.py."""
import copy

import pytest
import torch
import torch.nn.functional as F

from dnr.methods import create_method
from test_equivalence import (B, INFO, build, differences, encode, fused, make_args, project_step, reference_step,
                              state, tiny_encoder)  # noqa: F401  (tiny_encoder: the autouse fixture)


# xushaoxuan123/new-imbalance_leaderboard at 508a7b3, models/MSBD/MSBD_main.py L58-62 (out_a, out_v: the
# concat head's slices plus bias / 2), L82-113 (inside the window: CE of the fused, audio and visual
# logits; RS = sum of squared logit gaps / C; per sample, written into zero tensors one by one, w = max
# - min of the true-class probabilities when either modality's argmax is right, ps = the max, pw = the
# min; F.kl_div(ps, pw, 'none') = pw (log pw - ps); both terms w-weighted and divided by the batch size;
# nothing detached), L82 and L115 (outside the window: the fused CE only).
def mbsd_reference(model, x, y, inside=True, variant=None):
    ref = copy.deepcopy(model)
    feats = encode(ref, x)
    out = fused(ref, feats)
    w_fc, b_fc = ref.fusion.fc.weight, ref.fusion.fc.bias
    out_a = feats["audio"] @ w_fc[:, :4].t() + b_fc / 2
    out_v = feats["visual"] @ w_fc[:, 4:].t() + b_fc / 2
    loss = F.cross_entropy(out, y)
    hits = []
    if inside:
        if variant != "no_unimodal_ce":
            loss = loss + F.cross_entropy(out_a, y) + F.cross_entropy(out_v, y)
        pred_a, pred_v = torch.softmax(out_a, 1), torch.softmax(out_v, 1)
        gap = out_a - out_v if variant != "rs_on_probabilities" else pred_a - pred_v
        rs = 1 / out_a.shape[1] * torch.sum(gap ** 2, dim=1)
        w, ps, pw = torch.zeros(B), torch.zeros(B), torch.zeros(B)
        for i in range(B):
            a, v = pred_a[i][y[i]], pred_v[i][y[i]]
            hit = bool(pred_a[i].argmax() == y[i] or pred_v[i].argmax() == y[i])
            hits.append(hit)
            if hit:
                w[i] = max(a, v) - min(a, v)
            ps[i], pw[i] = max(a, v), min(a, v)
        if variant == "detached_weight":
            w = w.detach()
        if variant == "strong_as_target":  # the roles of the two probabilities swapped
            ps, pw = pw, ps
        if variant == "log_input":  # a "proper" KL, reading ps as a probability
            kl = F.kl_div(ps.log(), pw, reduction="none")
        else:
            kl = F.kl_div(ps, pw, reduction="none")
        loss = loss + (w @ rs) / B + (w @ kl) / B
    params = list(ref.parameters())
    grads = dict(zip(params, torch.autograd.grad(loss, params)))
    return ref, grads, hits


def mbsd_compare(inside=True, variant=None):
    model, x, y = build("mbsd", seed=3)
    epoch = 0 if inside else 5
    method = create_method("mbsd", make_args(mbsd_starts=0, mbsd_ends=None if inside else 4), model, INFO)
    before = state(model)
    ref, grads, hits = mbsd_reference(model, x, y, inside, variant)
    want = reference_step(ref, grads)
    got = project_step(method, model, x, y, epoch=epoch)
    if inside and variant is None:  # both branches of the weight occur in the batch
        assert any(hits) and not all(hits)
    return differences(before, got, want)


@pytest.mark.parametrize("inside", [True, False])
def test_mbsd_step_equals_the_reference_update(inside):
    assert mbsd_compare(inside) == []


@pytest.mark.parametrize("variant", ["no_unimodal_ce", "rs_on_probabilities", "detached_weight", "strong_as_target",
                                     "log_input"])
def test_mbsd_comparison_fails_on_a_broken_update(variant):
    assert mbsd_compare(True, variant) != []


def test_mbsd_outside_the_window_is_the_baseline():
    model, x, y = build("mbsd", seed=3)
    twin = copy.deepcopy(model)
    got = project_step(create_method("mbsd", make_args(mbsd_starts=2), model, INFO), model, x, y, epoch=1)
    want = project_step(create_method("baseline", make_args(), twin, INFO), twin, x, y, epoch=1)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_mbsd_three_modalities_average_the_pairs():
    from dnr.data import DatasetInfo, ModalitySpec
    from dnr.methods.mbsd import pair_distillation

    info = DatasetInfo("tiny3", ("a", "b", "c"), tuple(ModalitySpec(m, "spectrogram", (1, 6, 6))
                                                       for m in ("audio", "visual", "sensor")))
    torch.manual_seed(0)
    from dnr.methods import METHODS
    model = METHODS["mbsd"].build_model(info, encoders={m: "tiny_conv" for m in info.modality_names})
    x = {m: torch.randn(B, 1, 6, 6) for m in info.modality_names}
    y = torch.arange(B) % 3
    method = create_method("mbsd", make_args(), model, info)
    out = model(x)
    loss, logs = method.loss(out, y, 0)
    uni = out.unimodal_logits
    want = F.cross_entropy(out.logits, y) + sum(F.cross_entropy(s, y) for s in uni.values())
    pairs = [("audio", "visual"), ("audio", "sensor"), ("visual", "sensor")]
    want = want + sum(sum(pair_distillation(uni[m], uni[n], y)[:2]) for m, n in pairs) / 3
    assert torch.allclose(loss, want) and set(logs) >= {"mbsd_ce_audio", "mbsd_ce_visual", "mbsd_ce_sensor"}


def test_mbsd_refuses_mixing_fusions_and_bad_windows():
    from dnr.models import create_model
    model = create_model(INFO, fusion="film", encoders={m: "tiny_conv" for m in INFO.modality_names})
    x = {m: torch.randn(B, 1, 6, 6) for m in INFO.modality_names}
    method = create_method("mbsd", make_args(), model, INFO)
    with pytest.raises(ValueError, match="use --fusion concat or sum"):
        method.loss(model(x), torch.arange(B) % 4, 0)
    with pytest.raises(ValueError, match="--mbsd_ends"):
        type(method).check_args(make_args(mbsd_starts=3, mbsd_ends=1))
