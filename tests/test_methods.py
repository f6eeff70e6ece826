"""Each comparison method's defining mechanism on small constructed inputs."""
import argparse
import math

import pytest
import torch
import torch.nn.functional as F

from dnr.data import DatasetInfo, ModalitySpec
from dnr.methods import METHODS, create_method
from dnr.methods.agm import agm_coefficients, mono_scores, response_passes, shapley_responses
from dnr.methods.common import ratio_to_others, true_class_score
from dnr.methods.mmpareto import integrate, pareto_weights
from dnr.methods.ogm_ge import ogm_coefficients
from dnr.methods.opm import drop_probabilities
from dnr.methods.pmr import class_prototypes, prototype_logits
from dnr.models import ModelOutput, create_model
from dnr.stepping import Batch, Updater

INFO = DatasetInfo("vec", ("a", "b", "c"),
                   (ModalitySpec("audio", "vector", (6,)), ModalitySpec("visual", "vector", (6,))))
INFO3 = DatasetInfo("vec3", ("a", "b", "c"), INFO.modalities + (ModalitySpec("text", "vector", (4,)),))


def make_args(**kw):
    p = argparse.ArgumentParser()
    for cls in METHODS.values():
        cls.add_args(p)
    args = p.parse_args([])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def model_and_batch(info=INFO, b=6, seed=0):
    torch.manual_seed(seed)
    model = create_model(info)
    x = {s.name: torch.randn(b, *s.shape) for s in info.modalities}
    y = torch.arange(b) % info.num_classes
    return model, x, y


# ---------------------------------------------------------------- shared
def test_true_class_score_and_ratio():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    y = torch.tensor([0, 1])
    assert true_class_score(logits, y) == pytest.approx(math.exp(2) / (math.exp(2) + 1) + 0.5)
    assert ratio_to_others({"a": 6.0, "v": 3.0}) == {"a": 2.0, "v": 0.5}
    assert ratio_to_others({"a": 6.0, "v": 3.0, "t": 1.0})["a"] == pytest.approx(6.0 / 2.0)


# ---------------------------------------------------------------- OGM-GE
def test_ogm_coefficient_for_a_known_batch():
    y = torch.tensor([0, 1, 2])
    strong = torch.eye(3) * 5.0  # confident and right
    weak = torch.zeros(3, 3)  # uniform
    s_a, s_v = true_class_score(strong, y), true_class_score(weak, y)
    coeff, rho = ogm_coefficients({"audio": s_a, "visual": s_v}, alpha=0.8)
    assert rho["audio"] == pytest.approx(s_a / s_v) and s_v == pytest.approx(1.0)
    assert coeff["audio"] == pytest.approx(1 - math.tanh(0.8 * s_a / s_v))
    assert coeff["visual"] == 1.0
    first, _ = ogm_coefficients({"audio": s_a, "visual": s_v}, alpha=0.8, formula="relu_minus_one")
    assert first["audio"] == pytest.approx(1 - math.tanh(0.8 * (s_a / s_v - 1)))
    # An exact tie modulates the first modality, as the authors' code does (their audio).
    tie, _ = ogm_coefficients({"audio": 2.0, "visual": 2.0}, alpha=0.8)
    assert tie == {"audio": pytest.approx(1 - math.tanh(0.8)), "visual": 1.0}
    tie3, _ = ogm_coefficients({"a": 1.0, "b": 1.0, "c": 1.0}, alpha=0.8, formula="relu_minus_one")
    assert tie3 == {"a": 1.0, "b": 1.0, "c": 1.0}


def test_ogm_conv_rule_leaves_encoders_without_convolutions_alone():
    model, x, y = model_and_batch()
    with pytest.warns(UserWarning, match=r"encoders of \['audio', 'visual'\] have no convolution weight"):
        method = create_method("ogm_ge", make_args(), model, INFO)
    out = model(x)
    F.cross_entropy(out.logits, y).backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    logs = method.before_step(model, ModelOutput(out.logits, {}, {"audio": F.one_hot(y, 3) * 6.0,
                                                                   "visual": torch.zeros(6, 3)}), y, 0)
    assert logs["ogm_coeff_audio"] < 1  # computed and logged, applied to no parameter
    assert all(torch.equal(p.grad, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("name", ["ogm", "ogm_ge"])
def test_ogm_all_params_scales_only_the_dominant_encoder(name):
    model, x, y = model_and_batch()
    method = create_method(name, make_args(ogm_params="all"), model, INFO)
    torch.manual_seed(1)
    grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = grads[n].clone()
    logits = F.one_hot(y, 3).float()
    out = ModelOutput(logits, {}, {"audio": logits * 6, "visual": torch.zeros(6, 3)})
    logs = method.before_step(model, out, y, epoch=0)
    k = logs["ogm_coeff_audio"]
    assert 0 < k < 1 and logs["ogm_coeff_visual"] == 1.0
    for n, p in model.named_parameters():
        g0 = grads[n]
        if n.startswith("fusion"):
            assert torch.equal(p.grad, g0), n  # the head is never modulated
        elif n.startswith("encoders.audio"):
            if name == "ogm":
                assert torch.allclose(p.grad, k * g0), n
        elif name == "ogm":
            assert torch.equal(p.grad, g0), n
    if name == "ogm_ge":  # noise with the std of each original gradient, on every encoder
        w = dict(model.named_parameters())["encoders.visual.net.0.weight"]
        g0 = grads["encoders.visual.net.0.weight"]
        noise = w.grad - g0
        assert noise.abs().sum() > 0
        assert noise.std().item() == pytest.approx(g0.std().item(), rel=0.15)
    assert method.before_step(model, out, y, epoch=51) == {}  # outside [0, 50]


def test_gradient_methods_refuse_mixing_fusions():
    torch.manual_seed(0)
    model = create_model(INFO, fusion="film")
    x = {s.name: torch.randn(4, *s.shape) for s in INFO.modalities}
    out = model(x)
    method = create_method("ogm_ge", make_args(ogm_params="all"), model, INFO)
    with pytest.raises(ValueError, match="use --fusion concat or sum"):
        method.before_step(model, out, torch.tensor([0, 1, 2, 0]), 0)
    with pytest.raises(ValueError, match="at least two modalities"):
        create_method("ogm_ge", make_args(), create_model(INFO.restrict(["audio"])), INFO.restrict(["audio"]))


# ---------------------------------------------------------------- MMPareto
def test_mmpareto_weights_positive_and_negative_cosine():
    assert pareto_weights(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]))[:2] == (0.5, 0.5)
    g_mm, g_uni = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    w_mm, w_uni, cos = pareto_weights(g_mm, g_uni)
    assert cos < 0 and w_mm == pytest.approx(0.6) and w_uni == pytest.approx(0.4)
    point = w_mm * g_mm + w_uni * g_uni  # the min-norm point of the segment: orthogonal to it
    assert float((g_mm - g_uni).dot(point)) == pytest.approx(0.0, abs=1e-6)
    assert pareto_weights(g_mm, torch.tensor([0.0, 1.0]))[:2] == (pytest.approx(1 / 2), pytest.approx(1 / 2))  # cos 0
    (g,), _ = integrate([g_mm], [g_uni], gamma=1.0)  # 2 * (0.2, 0.4): norm 0.894 < ||g_mm + g_uni|| = 1
    assert torch.allclose(g, torch.tensor([0.2, 0.4]) / math.sqrt(0.2))
    (g,), _ = integrate([torch.tensor([3.0, 0.0])], [torch.tensor([1.0, 0.0])])  # agreeing: 1.5 x the sum
    assert torch.allclose(g, torch.tensor([6.0, 0.0]))
    # Tensor by tensor, each part is scaled to its own plain sum's norm; over the vector, all at once.
    a_mm = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])]
    a_uni = [torch.tensor([-1.0, 1.0]), torch.tensor([0.0, 0.0])]
    per_tensor, info = integrate(a_mm, a_uni, gamma=1.0)
    assert info["cos"] < 0
    for new, s in zip(per_tensor, (torch.tensor([0.0, 1.0]), torch.tensor([0.0, 2.0]))):
        assert float(new.norm()) >= float(s.norm()) - 1e-6
    whole, _ = integrate(a_mm, a_uni, gamma=1.0, per_tensor=False)
    assert not torch.allclose(torch.cat(whole), torch.cat(per_tensor))


def test_mmpareto_builds_its_own_heads_and_works_with_every_fusion():
    for fusion in ("concat", "film"):
        torch.manual_seed(0)
        model = METHODS["mmpareto"].build_model(INFO3, fusion=fusion)
        assert {m: tuple(h.weight.shape) for m, h in model.unimodal_heads.items()} == {
            "audio": (3, 256), "visual": (3, 256), "text": (3, 256)}
        method = create_method("mmpareto", make_args(), model, INFO3)
        x = {s.name: torch.randn(6, *s.shape) for s in INFO3.modalities}
        y = torch.arange(6) % 3
        out = model(x)
        loss, logs = method.loss(out, y, 0)
        method.backward(loss, out, y, model)
        assert set(method.before_step(model, out, y, 0)) == {f"mmpareto_{k}_{m}" for k in ("w_mm", "w_uni", "cos")
                                                            for m in ("audio", "visual", "text")}
        assert all(p.grad is not None for p in model.parameters())


# ---------------------------------------------------------------- PMR
def test_pmr_prototypes_and_loss():
    feats = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [0.0, 6.0]])
    labels = torch.tensor([0, 0, 1, 1])
    protos = class_prototypes(feats, labels, 3)
    assert torch.equal(protos, torch.tensor([[1.0, 0.0], [0.0, 5.0], [0.0, 0.0]]))
    # A class absent from the samples keeps its previous prototype.
    kept = class_prototypes(feats, labels, 3, previous=torch.full((3, 2), 7.0))
    assert torch.equal(kept, torch.tensor([[1.0, 0.0], [0.0, 5.0], [7.0, 7.0]]))
    z = torch.tensor([[1.0, 1.0]])
    assert torch.allclose(prototype_logits(z, protos, squared=True), torch.tensor([[-1.0, -17.0, -2.0]]))
    assert torch.allclose(prototype_logits(z, protos), -torch.tensor([[1.0, 17.0, 2.0]]).sqrt())
    # A feature on its prototype: distance 0, and a finite gradient (the square root's is not at 0).
    on = protos[:1].clone().requires_grad_(True)
    prototype_logits(on, protos).sum().backward()
    assert torch.isfinite(on.grad).all()

    model, x, y = model_and_batch()
    method = create_method("pmr", make_args(pmr_alpha=0.7), model, INFO)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    proto = {"audio": torch.eye(3) * 10, "visual": torch.zeros(3, 3) + torch.randn(3, 3) * 0.01}
    method.prototypes = proto
    feats = {"audio": proto["audio"][y] + 0.1, "visual": torch.randn(6, 3)}  # audio sits on its prototypes
    out = ModelOutput(torch.randn(6, 3), feats, None)
    for distance in ("euclidean", "squared"):
        method.args.pmr_distance = distance
        loss, logs = method.loss(out, y, 0)
        weak = prototype_logits(feats["visual"], proto["visual"], squared=distance == "squared")
        expected = F.cross_entropy(out.logits, y) + 0.7 * F.cross_entropy(weak, y)
        assert logs["pmr_ratio_audio"] > 1 > logs["pmr_ratio_visual"]
        assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
        assert "pmr_pce_visual" in logs and "pmr_pce_audio" not in logs


# ---------------------------------------------------------------- AGM
def test_agm_shapley_responses_add_up_and_match_the_linear_head():
    model, x, y = model_and_batch(INFO3)
    model.eval()
    names = INFO3.modality_names
    with torch.no_grad():
        out = model(x)
        h = response_passes(model, x, names)
        mono = shapley_responses(names, out.logits, h)
        assert torch.allclose(sum(mono.values()), out.logits, atol=1e-5)  # efficiency
        # with a linear (concat) head the Shapley value of m is W_m (z_m - z_m^0) + h(empty) / M
        fc = model.fusion.fc
        zero = {m: model.encoders[m](torch.zeros(1, *INFO3.spec(m).shape)) for m in names}
        h0 = model.head({m: zero[m].expand(6, -1) for m in zero}).logits
        for m, (a, b) in model.fusion.slices.items():
            expected = (out.features[m] - zero[m]) @ fc.weight[:, a:b].t() + h0 / 3
            assert torch.allclose(mono[m], expected, atol=1e-5)
    # The scores floor each probability at 1e-8: a confidently wrong sample counts -log(1e-8).
    wrong = torch.tensor([[100.0, 0.0, 0.0]])
    assert mono_scores({"a": wrong}, torch.tensor([1]))["a"] == pytest.approx(-math.log(1e-8))


def test_agm_coefficients_and_three_modality_step():
    coeff = agm_coefficients({"audio": 0.5, "visual": 1.5}, {"audio": 1.0, "visual": 1.0}, alpha=1.0)
    assert coeff["audio"] == pytest.approx(math.exp(1 - math.e))  # ahead of its usual standing: slowed
    assert coeff["visual"] == pytest.approx(math.exp(1 - math.exp(-1)))  # behind: sped up
    capped = agm_coefficients({"a": 0.0, "b": 0.0}, {"a": 20.0, "b": 0.0}, 1.0, cap=7.0)  # optimal ratio e^20
    assert capped["b"] == pytest.approx(math.exp(7))
    model, x, y = model_and_batch(INFO3)
    method = create_method("agm", make_args(), model, INFO3)
    with torch.no_grad():
        fused_loss = F.cross_entropy(model(x).logits, y).item()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    result = method.train_step(model, Batch(x, y, torch.arange(6), 0, 0), Updater(model, opt, "cpu"))
    assert method.steps == 1 and set(method.running) == {"audio", "visual", "text"}
    # The first step's running means start from 0, so its "optimal" ratio is 1 for every modality.
    assert {m: result.logs[f"agm_score_{m}"] for m in method.running} == pytest.approx(method.running)
    assert result.loss.item() == pytest.approx(fused_loss, rel=1e-5)  # the responses add up to the fused logits


# ---------------------------------------------------------------- OPM
def test_opm_drop_probabilities():
    q = drop_probabilities({"audio": 30.0, "visual": 10.0}, q_base=0.5, lam=0.5)
    assert q["audio"] == pytest.approx(0.5 * (1 + 0.5 * math.tanh(2.0))) and q["visual"] == 0.0
    assert drop_probabilities({"audio": 10.0, "visual": 10.0}, 0.5, 0.5) == {"audio": 0.0, "visual": 0.0}
    assert drop_probabilities({"audio": 100.0, "visual": 1.0}, 0.9, 5.0)["audio"] == 1.0  # clipped


def test_opm_drops_the_dominant_features_and_rescales_the_rest():
    model, x, y = model_and_batch()
    method = create_method("opm", make_args(opm_q_base=1.0, opm_p_exe=1.0, opm_starts=0), model, INFO)
    with torch.no_grad():  # make audio dominant: its head slice fits the labels, visual's is zero
        feats = model.encode(x)
        model.fusion.fc.weight.zero_()
        model.fusion.fc.bias.zero_()
        target = F.one_hot(y, 3).float() * 20
        model.fusion.fc.weight[:, :256] = torch.linalg.lstsq(feats["audio"], target).solution.t()
    method.on_epoch_start(0, None)
    out = method.forward(model, x, y)
    assert method.q["audio"] == 1.0 and method.q["visual"] == 0.0
    with torch.no_grad():
        expected = model.head({"audio": torch.zeros_like(feats["audio"]), "visual": feats["visual"] * 2.0}).logits
    assert torch.allclose(out.logits, expected, atol=1e-4)  # theta = 256 * 1 / 512: kept x 2
    assert method.keep.all()
    loss, logs = method.loss(out, y, 0)
    assert logs["opm_kept"] == 1.0 and loss.item() == pytest.approx(F.cross_entropy(out.logits, y).item())


# ---------------------------------------------------------------- uni-modal
def test_unimodal_selects_one_modality_and_explains_mistakes():
    cls = METHODS["unimodal"]
    assert cls.select_modalities(make_args(unimodal_modality="visual"), INFO) == ["visual"]
    with pytest.raises(ValueError, match="needs --unimodal_modality"):
        cls.select_modalities(make_args(), INFO)
    with pytest.raises(ValueError, match="'smell' is not a modality"):
        cls.select_modalities(make_args(unimodal_modality="smell"), INFO)
