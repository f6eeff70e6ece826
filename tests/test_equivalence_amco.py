"""amco equals its reconstructed update (SPEC section 4).

No authors' code exists and the paper could not be read (see the method's docstring); the
re-derivation below is written in our words from the description the method follows:
GeWu-Lab/BalanceBenchmark at 596b434, balancemm/trainer/AMCo_trainer.py (train_loop: p_t =
sin(pi/2 min(eps, l_t) / eps), N = int(p_t U) of U units zero at random positions, l_t += epoch / 10
after each batch, l_t and the dependence flags reset every epoch; training_step: CE of the fused
output plus the CE of each uni-modal output, each backward summed into the gradients; then the
joint softmax of the concatenated uni-modal outputs, the first modality whose mean block mass
reaches sigma flagged dependent) and balancemm/models/avclassify_model.py L198-226 (the dependent
modality's pooled feature times the mask, times 1 / (1 - p_t), or 10 when |p_t - 1| <= 0.1; the
uni-modal outputs are the concat head's slices on those features, bias / 2 each). Mask positions:
the re-derivation shares the method's draw (torch's global generator), as the OPM test does.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from dnr.methods import create_method
from dnr.methods.amco import dependence_shares, mask_ratio
from test_equivalence import (INFO, build, differences, fit_head_half, make_args, project_step, reference_step,
                              state, tiny_encoder)  # noqa: F401  (tiny_encoder: the autouse fixture)

B = 8


def amco_reference(model, x, y, progress, eps, target, seed, variant=None):
    ref = copy.deepcopy(model).train()
    a, v = ref.encoders["audio"](x["audio"]), ref.encoders["visual"](x["visual"])
    p = math.sin(math.pi / 2 * min(eps, progress) / eps)
    torch.manual_seed(seed)
    keep = torch.ones(4)
    keep[torch.randperm(4)[:int(p * 4)]] = 0.0
    scale = 1 / (1 - p) if abs(p - 1) > 0.1 else 10.0
    if variant == "no_rescale":
        scale = 1.0
    if variant == "mask_other":
        target = "visual" if target == "audio" else "audio"
    a_m, v_m = a, v
    if target == "audio":
        a_m = a * keep * scale
    elif target == "visual":
        v_m = v * keep * scale
    w, b = ref.fusion.fc.weight, ref.fusion.fc.bias
    out = torch.cat([a_m, v_m], 1) @ w.t() + b
    uni_in = (a, v) if variant == "unimodal_unmasked" else (a_m, v_m)
    out_a = uni_in[0] @ w[:, :4].t() + b / 2
    out_v = uni_in[1] @ w[:, 4:].t() + b / 2
    loss = F.cross_entropy(out, y)
    if variant != "no_unimodal":
        loss = loss + F.cross_entropy(out_a, y) + F.cross_entropy(out_v, y)
    params = list(ref.parameters())
    grads = dict(zip(params, torch.autograd.grad(loss, params)))
    joint = torch.softmax(torch.cat([out_a, out_v], 1).detach(), 1)
    shares = (float(joint[:, :4].sum() / B), float(joint[:, 4:].sum() / B))
    return ref, grads, p, shares


CASES = {"ramping": 0.2, "saturated": 0.9, "start": 0.0}  # l at this step (eps 0.3)


def amco_compare(case, variant=None, target="audio"):
    model, x, y = build("amco", seed=2)
    fit_head_half(model, x, y, "audio")
    method = create_method("amco", make_args(), model, INFO)  # sigma 0.5, eps 0.3, window from epoch 0
    method.on_epoch_start(2, None)
    method.progress, method.dependent = CASES[case], [target]
    before = state(model)
    ref, grads, p, shares = amco_reference(model, x, y, CASES[case], 0.3, target, seed=11, variant=variant)
    want = reference_step(ref, grads)
    torch.manual_seed(11)
    got = project_step(method, model, x, y, epoch=2)
    if variant is None:
        assert method.progress == pytest.approx(CASES[case] + 0.2)  # l += epoch / 10
        assert method.step_info["amco_ratio"] == pytest.approx(p)
    return differences(before, got, want)


@pytest.mark.parametrize("case", sorted(CASES))
def test_amco_step_equals_the_reconstructed_update(case):
    assert amco_compare(case) == []


@pytest.mark.parametrize("variant", ["no_rescale", "mask_other", "unimodal_unmasked", "no_unimodal"])
def test_amco_comparison_fails_on_a_broken_update(variant):
    assert amco_compare("ramping", variant) != []


def test_mask_ratio_schedule_and_mask_units():
    """l starts at 0 every epoch and grows by epoch / 10 per step: nothing masked in epoch 0; in
    epoch 1 the ratios are sin(0), sin(pi/6), sin(pi/3), then 1."""
    model, x, y = build("amco", seed=2)
    method = create_method("amco", make_args(), model, INFO)
    ratios = {}
    for epoch in (0, 1, 1):
        method.on_epoch_start(epoch, None)
        method.dependent = ["visual"]
        ratios[epoch] = []
        with torch.no_grad():
            for _ in range(5):
                out = method.forward(model.train(), x, y)
                ratios[epoch].append(method.step_info["amco_ratio"])
                zero_units = int((out.features["visual"].abs().sum(0) == 0).sum())
                assert zero_units == int(ratios[epoch][-1] * 4)
                assert (out.features["audio"].abs().sum(0) > 0).all()
    assert ratios[0] == [0.0] * 5
    assert ratios[1] == pytest.approx([0.0, 0.5, math.sin(math.pi / 3), 1.0, 1.0])
    assert mask_ratio(0.15, 0.3) == pytest.approx(math.sin(math.pi / 4))


def test_dependence_marking_persists_within_the_epoch_and_resets():
    model, x, y = build("amco", seed=2)
    fit_head_half(model, x, y, "audio")  # audio's slice confident: its share of the joint softmax is high
    method = create_method("amco", make_args(), model, INFO)
    method.on_epoch_start(0, None)
    out = method.forward(model.train(), x, y)
    shares = dependence_shares(out.unimodal_logits)
    assert shares["audio"] >= 0.5 > shares["visual"] and sum(shares.values()) == pytest.approx(1.0)
    method.loss(out, y, 0)
    assert method.dependent == ["audio"]
    # A later step where nobody reaches sigma keeps the mark; the next epoch starts with none.
    method.args.amco_sigma = 0.99
    method.loss(method.forward(model.train(), x, y), y, 0)
    assert method.dependent == ["audio"]
    method.on_epoch_start(1, None)
    assert method.dependent == [] and method.progress == 0.0


def test_outside_the_window_plain_cross_entropy():
    model, x, y = build("amco", seed=2)
    method = create_method("amco", make_args(amco_starts=3), model, INFO)
    method.on_epoch_start(1, None)
    method.dependent = ["audio"]
    out = method.forward(model.train(), x, y)
    loss, logs = method.loss(out, y, 1)
    assert logs == {} and method.dependent == ["audio"]
    assert torch.allclose(loss, F.cross_entropy(model(x).logits, y))


def test_bad_flags_are_refused():
    from dnr.methods import METHODS

    for flags, name in (({"amco_sigma": 0.0}, "--amco_sigma"), ({"amco_eps": 0.0}, "--amco_eps"),
                        ({"amco_starts": 4, "amco_ends": 2}, "--amco_ends")):
        with pytest.raises(ValueError, match=name):
            METHODS["amco"].check_args(make_args(**flags))


def test_amco_three_modalities_masks_from_epoch_one(tmp_path):
    """Three modalities end to end: shares over three blocks, masking from epoch 1 on."""
    import json
    import sys

    from conftest import CODE, TINY

    sys.path.insert(0, str(CODE))
    import main as trainer

    out = tmp_path / "run"
    rc = trainer.cli(TINY + ["--ckpt_path", str(out), "--device", "cpu", "--no-probe", "--method", "amco",
                             "--builtin_modalities", "audio,visual,sensor", "--epochs", "2", "--amco_sigma", "0.34"])
    assert rc == 0
    logs = [json.loads(line)["train"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert {f"amco_share_{m}" for m in ("audio", "visual", "sensor")} <= set(logs[1])
    assert logs[0]["amco_ratio"] == 0.0 and logs[1]["amco_ratio"] > 0.0
