"""MMCosine's training step equals its authors' update, and its evaluation uses their logits
(SPEC section 4; the helpers and the tiny two-encoder model are those of test_equivalence.py)."""
import argparse
import copy

import pytest
import torch
import torch.nn.functional as F

from dnr.methods import METHODS, create_method
from dnr.methods.mmcosine import CosineFusion
from test_equivalence import (B, INFO, differences, make_args, project_step, reference_step, state,  # noqa: F401
                              tiny_encoder)

SCALE = 10.0


def build(fusion="concat", seed=0):
    """As test_equivalence.build, with a choice of fusion head."""
    torch.manual_seed(seed)
    model = METHODS["mmcosine"].build_model(INFO, fusion=fusion, encoders={m: "tiny_conv" for m in INFO.modality_names})
    with torch.no_grad():
        for _ in range(3):
            model({m: torch.randn(B, 1, 6, 6) * 2 + 0.5 for m in INFO.modality_names})
    x = {m: torch.randn(B, 1, 6, 6) for m in INFO.modality_names}
    y = torch.arange(B) % INFO.num_classes
    return model, x, y


def weight_of(ref, fusion, m):
    """The class weights (C, D) modality m's features meet, read off the raw head."""
    base = ref.fusion.base
    if fusion == "concat":
        return base.fc.weight[:, :4] if m == "audio" else base.fc.weight[:, 4:]
    return base.heads[m].weight


# GeWu-Lab/MMCosine_ICASSP23 at 00ba0a9, main_CD.py L109 (features from the training-mode forward),
# L113-118 (each modality: its features normalised over dim 1, times the transposed slice of
# fc_out.weight normalised over dim 0, i.e. per class; both times --scaling; summed, no bias),
# L141 (CE of the sum; --lam 0, so no NCE term), L144-146 (backward, SGD step: the bias has no
# gradient and is skipped).
def mmcosine_reference(model, x, y, fusion="concat", scale=SCALE, variant=None):
    ref = copy.deepcopy(model).train()
    feats = {m: ref.encoders[m](x[m]) for m in INFO.modality_names}
    out = 0
    for m, z in feats.items():
        w_t = weight_of(ref, fusion, m).t()  # (D, C)
        if variant == "joint_norm":  # one cosine over the concatenated feature and class row
            z = z / torch.cat(list(feats.values()), 1).norm(dim=1, keepdim=True)
            full = torch.cat([weight_of(ref, fusion, k) for k in feats], 1)  # (C, sum D)
            w_t = w_t / full.norm(dim=1)[None]
        else:
            if variant != "no_feature_norm":
                z = F.normalize(z, dim=1)
            if variant == "weight_norm_wrong_dim":
                w_t = F.normalize(w_t, dim=1)
            elif variant != "no_weight_norm":
                w_t = F.normalize(w_t, dim=0)
        out = out + (1.0 if variant == "no_scale" else scale) * (z @ w_t)
    if variant == "with_bias":
        base = ref.fusion.base
        out = out + (base.fc.bias if fusion == "concat" else sum(h.bias for h in base.heads.values()))
    params = [p for p in ref.parameters() if p.requires_grad]
    got = torch.autograd.grad(F.cross_entropy(out, y), params, allow_unused=True)
    return ref, {p: g for p, g in zip(params, got) if g is not None}


def mmcosine_compare(fusion="concat", variant=None, **flags):
    model, x, y = build(fusion)
    method = create_method("mmcosine", make_args(**flags), model, INFO)
    before = state(model)
    ref, grads = mmcosine_reference(model, x, y, fusion, flags.get("mmcosine_scale", SCALE), variant)
    want = reference_step(ref, grads)
    got = project_step(method, model, x, y)
    return differences(before, got, want)


@pytest.mark.parametrize("fusion", ["concat", "sum"])
def test_mmcosine_step_equals_the_authors_update(fusion):
    assert mmcosine_compare(fusion) == []


def test_mmcosine_scale_flag_reaches_the_logits():
    assert mmcosine_compare(mmcosine_scale=3.0) == []


@pytest.mark.parametrize("variant", ["no_weight_norm", "weight_norm_wrong_dim", "joint_norm", "no_scale",
                                     "with_bias", "no_feature_norm"])
def test_mmcosine_comparison_fails_on_a_broken_update(variant):
    assert mmcosine_compare("concat", variant) != []


def test_mmcosine_bias_is_frozen_and_never_moves():
    model, x, y = build()
    method = create_method("mmcosine", make_args(), model, INFO)
    bias = model.fusion.base.fc.bias.detach().clone()
    assert not model.fusion.base.fc.bias.requires_grad
    project_step(method, model, x, y)
    assert torch.equal(model.fusion.base.fc.bias, bias)


# main_CD.py L181 and L196: the fused prediction is the model's own output, fc_out([a; v]) with
# its bias; L185-189: each modality's accuracy from its scaled cosine logits. main_vox2.py L192-193:
# the summed cosine logits (our --mmcosine_eval cosine).
@pytest.mark.parametrize("how", ["linear", "cosine"])
def test_mmcosine_evaluation_logits(how):
    model, x, y = build()
    create_method("mmcosine", make_args(mmcosine_eval=how), model, INFO)
    model.eval()
    with torch.no_grad():
        out = model(x)
        feats = {m: model.encoders[m](x[m]) for m in INFO.modality_names}
        fc = model.fusion.base.fc
        cos = {m: SCALE * F.normalize(feats[m], dim=1) @ F.normalize(weight_of(model, "concat", m), dim=1).t()
               for m in feats}
        linear = torch.cat([feats["audio"], feats["visual"]], 1) @ fc.weight.t() + fc.bias
    want = linear if how == "linear" else cos["audio"] + cos["visual"]
    assert torch.allclose(out.logits, want, atol=1e-5)
    assert not torch.allclose(linear, cos["audio"] + cos["visual"], atol=1e-3)  # the case tells them apart
    for m in feats:
        assert torch.allclose(out.unimodal_logits[m], cos[m], atol=1e-5)


def test_mmcosine_scale_and_evaluation_are_saved_with_the_model():
    model, _, _ = build()
    create_method("mmcosine", make_args(mmcosine_scale=4.0, mmcosine_eval="cosine"), model, INFO)
    rebuilt = METHODS["mmcosine"].build_model(INFO, encoders={m: "tiny_conv" for m in INFO.modality_names})
    assert float(rebuilt.fusion.scale) == SCALE and float(rebuilt.fusion.cosine_eval) == 0.0
    rebuilt.load_state_dict(model.state_dict())
    assert float(rebuilt.fusion.scale) == 4.0 and float(rebuilt.fusion.cosine_eval) == 1.0


@pytest.mark.parametrize("fusion", ["film", "gated"])
def test_mmcosine_refuses_heads_without_per_modality_weights(fusion):
    with pytest.raises(ValueError, match="--fusion"):
        METHODS["mmcosine"].check_args(make_args(fusion=fusion))
    with pytest.raises(ValueError, match="--fusion"):
        CosineFusion(METHODS["baseline"].build_model(INFO, fusion=fusion).fusion)


def test_mmcosine_refuses_a_bad_scale():
    with pytest.raises(ValueError, match="--mmcosine_scale"):
        METHODS["mmcosine"].check_args(make_args(fusion="concat", mmcosine_scale=0.0))


def test_mmcosine_default_flags():
    p = argparse.ArgumentParser()
    METHODS["mmcosine"].add_args(p)
    args = p.parse_args([])
    assert (args.mmcosine_scale, args.mmcosine_eval) == (10.0, "linear")
