"""Each comparison method's training step equals its authors' update (SPEC section 4).

For every method, one full training step of the project's method, through its hooks (train_step
with an Updater and a real SGD optimiser with momentum and weight decay), on a tiny two-encoder
model whose encoders hold a convolution, a BatchNorm and a linear layer, is compared with an
independent re-derivation of the authors' update, written here in our own words from their
released code (the comment above each cites repository, commit, file and lines). Parameters and
BatchNorm buffers must agree to 1e-5 of each tensor's update. Every re-derivation also has
deliberately broken variants (a mechanism that drifted: scaling the wrong gradients, a wrong
distance, a missing factor); a second test runs the same comparison against each and asserts that
it reports a difference, so the comparison is known to be able to fail.
"""
import argparse
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from sklearn.preprocessing import MinMaxScaler
from torch import nn
from torch.utils.data import DataLoader

from dnr.data import DatasetInfo, ModalitySpec
from dnr.distributed import EpochBatchSampler
from dnr.methods import METHODS, TrainContext, add_diagnosis_args, create_method
from dnr.models import ENCODERS
from dnr.models.encoders import EncoderEntry
from dnr.stepping import Batch, Updater

INFO = DatasetInfo("tiny", ("a", "b", "c", "d"),
                   (ModalitySpec("audio", "spectrogram", (1, 6, 6)), ModalitySpec("visual", "spectrogram", (1, 6, 6))))
B, LR, MOMENTUM, WD = 8, 0.1, 0.9, 1e-4
TOL = 1e-5


class TinyConvEncoder(nn.Module):
    """Conv2d + BatchNorm + ReLU + pooling + Linear: 4-D, 1-D and 2-D parameters, and BatchNorm
    statistics, so train/eval mode and the conv-only rules matter."""

    out_dim = 4

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, 3, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3, self.out_dim)

    def forward(self, x):
        h = F.relu(self.bn(self.conv(x)))  # (B, C, H, W) -> (B, 3, H, W)
        return self.fc(h.mean((2, 3)))  # (B, 3, H, W) -> (B, 3) -> (B, 4)


@pytest.fixture(autouse=True)
def tiny_encoder(monkeypatch):
    monkeypatch.setitem(ENCODERS, "tiny_conv", EncoderEntry(lambda spec: TinyConvEncoder(spec.shape[0])))


def make_args(**flags):
    p = argparse.ArgumentParser()
    add_diagnosis_args(p)
    for cls in METHODS.values():
        cls.add_args(p)
    args = p.parse_args([])
    for k, v in flags.items():
        setattr(args, k, v)
    return args


def build(method: str, seed: int = 0):
    """The method's model with tiny encoders, BatchNorm running statistics moved off their defaults,
    and a fixed batch."""
    torch.manual_seed(seed)
    model = METHODS[method].build_model(INFO, encoders={m: "tiny_conv" for m in INFO.modality_names})
    with torch.no_grad():
        for _ in range(3):
            model({m: torch.randn(B, 1, 6, 6) * 2 + 0.5 for m in INFO.modality_names})
    x = {m: torch.randn(B, 1, 6, 6) for m in INFO.modality_names}
    y = torch.arange(B) % INFO.num_classes
    return model, x, y


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)


def project_step(method, model, x, y, epoch=0):
    """One step of the project's method through its hooks, as the trainer takes it."""
    model.train()
    method.train_step(model, Batch(x, y, torch.arange(B), epoch, 0), Updater(model, sgd(model), "cpu"))
    return state(model)


def reference_step(model, grads):
    """SGD with momentum and weight decay on gradients computed by a re-derivation."""
    for p in model.parameters():
        p.grad = grads.get(p)
    sgd(model).step()
    return state(model)


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def differences(before, got, want, tol=TOL):
    """Tensors (parameters and buffers) that differ by more than `tol` of the wanted update, beyond
    the float32 rounding of the values themselves (a few units in the last place)."""
    out = []
    for k in want:
        step = float((want[k] - before[k]).double().abs().max())
        gap = float((got[k] - want[k]).double().abs().max())
        rounding = 4 * torch.finfo(torch.float32).eps * float(want[k].double().abs().max())
        if gap > tol * step + rounding + 1e-12:
            out.append(f"{k}: {gap:.2e} apart, update {step:.2e}")
    return out


def fused(model, feats):
    return model.fusion(feats).logits


def fit_head_half(model, x, y, modality):
    """Make `modality` dominant: its half of the concat head fits the labels (least squares)."""
    with torch.no_grad():
        feats = copy.deepcopy(model).train()(x).features[modality]
        half = slice(0, 4) if modality == "audio" else slice(4, 8)
        target = F.one_hot(y, INFO.num_classes).float() * 4
        model.fusion.fc.weight[:, half] = torch.linalg.lstsq(feats, target - model.fusion.fc.bias / 2).solution.t()


def encode(model, x, mode_train=True):
    model.train(mode_train)
    return {m: model.encoders[m](x[m]) for m in INFO.modality_names}


# ====================================================================== AGM
# lihong2303/AGM_ICCV2023 at 5a65542: model/CREMAD_net.py L45-72 (GradMod: a training-mode pass,
# then the net in eval mode for the padded passes, which keep their gradient; hooks multiply the
# gradient flowing into each response), run/CREMAD_main.py L63-69 (responses, CE of their sum),
# L130-157 (scores floored at 1e-8, ratios, coefficients with the cap 10, running means updated with
# the 1-based global iteration), L159-166 (the hooks get this step's coefficients), L233-244
# (clipping to norm 1 when a fc_out.weight gradient element leaves [-1, 1]), L612-613 (running
# means start at 0).
def agm_reference(model, x, y, alpha, running, t, variant=None):
    ref = copy.deepcopy(model)
    a_v = encode(ref, x)  # training mode: batch statistics, running statistics updated once
    total = fused(ref, a_v)
    if variant != "train_mode_responses":
        ref.eval()
    zero = {m: torch.zeros_like(x[m]) for m in x}
    enc = ref.encoders
    pad_visual = fused(ref, {"audio": enc["audio"](x["audio"]), "visual": enc["visual"](zero["visual"])})
    pad_audio = fused(ref, {"audio": enc["audio"](zero["audio"]), "visual": enc["visual"](x["visual"])})
    ref.train()
    m_a = 0.5 * (total - pad_audio + pad_visual)
    m_v = 0.5 * (total - pad_visual + pad_audio)

    def score(o):
        p = torch.softmax(o.detach(), 1)[torch.arange(B), y]
        return float(torch.where(p < 1e-8, torch.full_like(p, 1e-8), p).log().neg().mean())

    s_a, s_v = score(m_a), score(m_v)
    r_a, r_v = running
    if variant == "running_from_first_scores" and t == 1:
        r_a, r_v = s_a, s_v
    k_a = math.exp(alpha * min(math.exp(r_v - r_a) - math.exp(s_v - s_a), 10))
    k_v = math.exp(alpha * min(math.exp(r_a - r_v) - math.exp(s_a - s_v), 10))
    params = list(ref.parameters())
    out = (m_a + m_v).detach()
    g_out = (torch.softmax(out, 1) - F.one_hot(y, INFO.num_classes)) / B  # d CE / d out
    if variant == "encoder_only":  # this project's former AGM: plain gradients, encoders scaled afterwards
        grads = torch.autograd.grad(F.cross_entropy(total, y), params)
        scale = {p: k for m, k in (("audio", k_a), ("visual", k_v)) for p in ref.encoders[m].parameters()}
        grads = [g * scale.get(p, 1.0) for g, p in zip(grads, params)]
    else:
        # The hooks send k_a g_out into m_a and k_v g_out into m_v; through m_a = (T - PA + PV) / 2 and
        # m_v = (T - PV + PA) / 2 that is the gradient of this surrogate.
        surrogate = (g_out * (0.5 * (k_a + k_v) * total + 0.5 * (k_a - k_v) * pad_visual
                              + 0.5 * (k_v - k_a) * pad_audio)).sum()
        grads = torch.autograd.grad(surrogate, params)
    grads = dict(zip(params, grads))
    clipped = bool(grads[ref.fusion.fc.weight].abs().max() > 1)
    if clipped and variant != "no_clip":
        total_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))
        factor = min(1.0, 1.0 / (float(total_norm) + 1e-6))
        grads = {p: g * factor for p, g in grads.items()}
    return ref, grads, (k_a, k_v), clipped


AGM_CASES = {"first step": dict(), "later step": dict(running=(1.1, 1.6), t=5),
             "clipped": dict(feature_scale=5.0)}  # large features: head gradients above 1


def agm_compare(case, variant=None):
    model, x, y = build("agm")
    opts = AGM_CASES[case]
    with torch.no_grad():  # the audio half louder, so the two modalities' scores (and k) differ
        model.fusion.fc.weight[:, :4] *= 3
        for m in INFO.modality_names:
            model.encoders[m].fc.weight.mul_(opts.get("feature_scale", 1.0))
    running, t = opts.get("running", (0.0, 0.0)), opts.get("t", 1)
    method = create_method("agm", make_args(agm_alpha=1.3), model, INFO)
    method.running, method.steps = {"audio": running[0], "visual": running[1]}, t - 1
    before = state(model)
    ref, grads, k, clipped = agm_reference(model, x, y, 1.3, running, t, variant)
    want = reference_step(ref, grads)
    got = project_step(method, model, x, y)
    assert clipped == (case == "clipped") and method.steps == t
    gaps = [f"k_{m}: {method.scale[m]} vs {k[i]}" for i, m in enumerate(("audio", "visual"))
            if not math.isclose(method.scale[m], k[i], rel_tol=TOL)]
    return gaps + differences(before, got, want)


@pytest.mark.parametrize("case", AGM_CASES)
def test_agm_step_equals_the_authors_update(case):
    assert agm_compare(case) == []


@pytest.mark.parametrize("case, variant", [("first step", "encoder_only"), ("later step", "encoder_only"),
                                           ("first step", "train_mode_responses"),
                                           ("first step", "running_from_first_scores"), ("clipped", "no_clip")])
def test_agm_comparison_fails_on_a_broken_update(case, variant):
    assert agm_compare(case, variant) != []


def test_agm_running_means_and_stale_scales_after_the_window():
    model, x, y = build("agm")
    method = create_method("agm", make_args(agm_ends=0), model, INFO)
    project_step(method, model, x, y, epoch=0)
    scale = dict(method.scale)
    scores = dict(method.running)  # t = 1: the running means are the first step's scores
    project_step(method, model, x, y, epoch=1)  # after the window: the hooks keep the last scales
    assert method.scale == scale and method.steps == 2
    assert all(method.running[m] != scores[m] for m in scores)  # updated outside the window too


# ====================================================================== MMPareto
# GeWu-Lab/MMPareto_ICML2024 at a339db3: code/models/models.py L133-184 (separate head_audio and
# head_video beside the fused head), code/MMPareto.py L97-147 (three losses, per-loss encoder
# gradients), L149-174 (whole-encoder cosine; cos > 0: 1/2 each, else the two-task min-norm
# weights of code/min_norm_solvers.py L32-58), L178-207 (the summed backward, then each encoder
# tensor: 2 (w_mm g_mm + w_m g_m), scaled up to the norm of that tensor's summed gradient, times 1.5).
def mmpareto_reference(model, x, y, variant=None):
    ref = copy.deepcopy(model)
    feats = encode(ref, x)
    out = fused(ref, feats)
    if variant == "slice_heads":  # this project's former uni-modal logits: the fused head's slices
        w, b = ref.fusion.fc.weight, ref.fusion.fc.bias
        uni = {"audio": feats["audio"] @ w[:, :4].t() + b / 2, "visual": feats["visual"] @ w[:, 4:].t() + b / 2}
    else:
        uni = {m: ref.unimodal_heads[m](feats[m]) for m in feats}
    losses = {"mm": F.cross_entropy(out, y), **{m: F.cross_entropy(uni[m], y) for m in uni}}
    params = list(ref.parameters())
    summed = dict(zip(params, torch.autograd.grad(sum(losses.values()), params, retain_graph=True, allow_unused=True)))
    grads = {p: g for p, g in summed.items() if g is not None}
    cosines, ratios = {}, {}
    for m in ("audio", "visual"):
        enc = list(ref.encoders[m].parameters())
        g_mm = torch.autograd.grad(losses["mm"], enc, retain_graph=True)
        g_m = torch.autograd.grad(losses[m], enc, retain_graph=True)
        v_mm, v_m = torch.cat([g.flatten() for g in g_mm]), torch.cat([g.flatten() for g in g_m])
        cos = float(F.cosine_similarity(v_mm, v_m, dim=0))
        if cos > 0:
            w_mm = w_m = 0.5
        else:  # min over w of ||w v_mm + (1 - w) v_m||^2
            w_mm = float((v_m.dot(v_m) - v_mm.dot(v_m)) / (v_mm - v_m).dot(v_mm - v_m))
            w_m = 1 - w_mm
        cosines[m] = cos
        gamma = 1.0 if variant == "factor_one" else 1.5
        new = [2 * w_mm * a + 2 * w_m * b for a, b in zip(g_mm, g_m)]
        if variant == "vector_rescale":
            whole = torch.cat([n.flatten() for n in new]).norm()
            target = torch.cat([summed[p].flatten() for p in enc]).norm()
            new = [n * (target / whole if target > whole else 1.0) for n in new]
        else:
            ratios[m] = [float(summed[p].norm() / n.norm()) for p, n in zip(enc, new)]
            new = [n * (summed[p].norm() / n.norm() if summed[p].norm() > n.norm() else 1.0) for p, n in zip(enc, new)]
        grads.update({p: n * gamma for p, n in zip(enc, new)})
    return ref, grads, cosines, ratios


def mmpareto_compare(variant=None):
    model, x, y = build("mmpareto", seed=1)
    with torch.no_grad():  # the audio head opposes the fused head's audio half (conflicting gradients),
        model.unimodal_heads["audio"].weight.copy_(-2 * model.fusion.fc.weight[:, :4])  # the visual one follows it
        model.unimodal_heads["visual"].weight.copy_(model.fusion.fc.weight[:, 4:])
    method = create_method("mmpareto", make_args(), model, INFO)
    before = state(model)
    ref, grads, cosines, ratios = mmpareto_reference(model, x, y, variant)
    want = reference_step(ref, grads)
    got = project_step(method, model, x, y)
    if variant is None:  # the case exercises both branches and both sides of the rescaling
        assert cosines["audio"] <= 0 < cosines["visual"]
        assert min(ratios["audio"]) < 1 < max(ratios["audio"])
    return differences(before, got, want)


def test_mmpareto_step_equals_the_authors_update():
    assert mmpareto_compare() == []


@pytest.mark.parametrize("variant", ["slice_heads", "vector_rescale", "factor_one"])
def test_mmpareto_comparison_fails_on_a_broken_update(variant):
    assert mmpareto_compare(variant) != []


def test_mmpareto_heads_get_only_their_own_loss_gradient():
    model, x, y = build("mmpareto")
    method = create_method("mmpareto", make_args(), model, INFO)
    out = model(x)
    loss, _ = method.loss(out, y, 0)
    method.backward(loss, out, y, model)
    fused_only = torch.autograd.grad(F.cross_entropy(model(x).logits, y), model.fusion.fc.weight)[0]
    assert torch.allclose(model.fusion.fc.weight.grad, fused_only, atol=1e-7)
    feats = model.encode(x)
    for m, head in model.unimodal_heads.items():
        own = torch.autograd.grad(F.cross_entropy(head(feats[m]), y), head.weight)[0]
        assert torch.allclose(head.weight.grad, own, atol=1e-7)


# ====================================================================== PMR
# fanyunfeng-bit/Modal-Imbalance-PMR at 3615e48: main_Prototype_grad.py L69-75 (EU_dist: the
# square root of the squared difference, not squared), L130-186 (prototype logits = minus the
# distances; S from their softmax; ratio S_a / S_v; > 1: alpha CE of the visual prototype logits,
# < 1: of the audio ones, tie: nothing; alpha as is), L219 and L271 (backward, step).
def pmr_reference(model, x, y, prototypes, alpha, variant=None):
    ref = copy.deepcopy(model)
    feats = encode(ref, x)
    out = fused(ref, feats)
    sims = {}
    for m, z in feats.items():
        d2 = ((z[:, None, :] - prototypes[m][None]) ** 2).sum(-1)
        sims[m] = -d2 if variant == "squared" else -d2.sqrt()
    scores = {m: float(torch.softmax(s.detach(), 1)[torch.arange(B), y].sum()) for m, s in sims.items()}
    ratio = scores["audio"] / scores["visual"]
    weak, strong = ("visual", "audio") if ratio > 1 else ("audio", "visual")
    target = strong if variant == "stronger_modality" else weak
    loss = F.cross_entropy(out, y) + (alpha * F.cross_entropy(sims[target], y) if ratio != 1 else 0)
    params = list(ref.parameters())
    return ref, dict(zip(params, torch.autograd.grad(loss, params))), ratio


def pmr_compare(dominant, variant=None):
    model, x, y = build("pmr", seed=2)
    with torch.no_grad():
        feats = copy.deepcopy(model).train()(x).features
    good = {m: torch.stack([feats[m][y == k].mean(0) for k in range(INFO.num_classes)]) for m in feats}
    other = "visual" if dominant == "audio" else "audio"
    prototypes = {dominant: good[dominant], other: torch.randn(INFO.num_classes, 4) * 3}
    method = create_method("pmr", make_args(pmr_alpha=1.7), model, INFO)
    method.prototypes = {m: p.clone() for m, p in prototypes.items()}
    before = state(model)
    ref, grads, ratio = pmr_reference(model, x, y, prototypes, 1.7, variant)
    want = reference_step(ref, grads)
    got = project_step(method, model, x, y)
    assert (ratio > 1) == (dominant == "audio")
    return differences(before, got, want)


@pytest.mark.parametrize("dominant", ["audio", "visual"])
def test_pmr_step_equals_the_authors_update(dominant):
    assert pmr_compare(dominant) == []


@pytest.mark.parametrize("variant", ["squared", "stronger_modality"])
def test_pmr_comparison_fails_on_a_broken_update(variant):
    assert pmr_compare("audio", variant) != []


# main_Prototype_grad.py L383-441 (calculate_prototype: model in eval mode, no gradient, the
# training loader with its training transform, stop after len(loader) // 10 batches, per-class
# sums / counts, momentum (1 - m) new + m old only when the call's epoch argument is above 0) and
# L532-557 (called before training with epoch 0 and after every epoch e with epoch e: the
# prototypes used in 0-based epoch e + 1).
def pmr_prototype_reference(model, loader, transform, momentum, previous, epoch, variant=None):
    ref = copy.deepcopy(model)
    ref.train(variant == "train_mode_bn")
    sums = {m: torch.zeros(INFO.num_classes, 4) for m in INFO.modality_names}
    counts = torch.zeros(INFO.num_classes)
    n_batches = len(loader) if variant == "all_batches" else max(len(loader) // 10, 1)
    with torch.no_grad():
        for i, raw in enumerate(loader):
            if i >= n_batches:
                break
            inputs = transform(raw["inputs"], variant != "eval_transform")
            for m in sums:
                z = ref.encoders[m](inputs[m])
                for row, label in zip(z, raw["label"]):
                    sums[m][label] += row
            counts += torch.bincount(raw["label"], minlength=INFO.num_classes)
    new = {m: s / counts[:, None] for m, s in sums.items()}
    authors_epoch = epoch - 1  # the call that made epoch `epoch`'s prototypes ran after epoch - 1
    with_momentum = authors_epoch > 0 or (variant == "momentum_at_first_recomputation" and epoch > 0)
    if with_momentum:
        new = {m: (1 - momentum) * p + momentum * previous[m] for m, p in new.items()}
    return new


def pmr_prototype_compare(variant=None):
    model, _, _ = build("pmr", seed=3)
    n, batch = 80, 4
    sampler = EpochBatchSampler(n, batch)
    sampler.set_epoch(11)
    order = [i for b in sampler for i in b]
    labels = torch.zeros(n, dtype=torch.long)
    labels[torch.tensor(order)] = torch.arange(n) % INFO.num_classes  # every class in the first batches
    g = torch.Generator().manual_seed(0)
    data = [{"inputs": {m: torch.randn(1, 6, 6, generator=g) for m in INFO.modality_names},
             "label": int(labels[i]), "index": i} for i in range(n)]
    loader = DataLoader(data, batch_sampler=sampler)

    def transform(inputs, train):  # a deterministic "augmentation" that training sees and evaluation does not
        return {m: v * 1.5 + 1 if train else v for m, v in inputs.items()}

    method = create_method("pmr", make_args(pmr_momentum=0.3), model, INFO)
    ctx = TrainContext(model=model, device="cpu", info=INFO, args=method.args, extract_features=None,
                       train_loader=loader, train_transform=transform)
    gaps = []
    previous = None
    for epoch in range(3):
        want = pmr_prototype_reference(model, loader, transform, 0.3, previous, epoch, variant)
        buffers = {k: v.clone() for k, v in model.state_dict().items()}
        model.train()
        method.on_epoch_start(epoch, ctx)
        assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in buffers.items())
        gaps += [f"epoch {epoch} {m}: {float((method.prototypes[m] - want[m]).abs().max()):.2e}"
                 for m in want if not torch.allclose(method.prototypes[m], want[m], rtol=TOL, atol=1e-7)]
        previous = {m: p.clone() for m, p in method.prototypes.items()}
        with torch.no_grad():  # the weights move between epochs
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return gaps


def test_pmr_prototypes_equal_the_authors():
    assert pmr_prototype_compare() == []


@pytest.mark.parametrize("variant", ["eval_transform", "all_batches", "train_mode_bn",
                                     "momentum_at_first_recomputation"])
def test_pmr_prototype_comparison_fails_on_a_broken_recipe(variant):
    assert pmr_prototype_compare(variant) != []


# ====================================================================== OGM / OGM-GE
# GeWu-Lab/OGM-GE_CVPR2022 at 343dc1d, main.py L80-98 (forward; uni-modal logits from the head's
# weight halves plus bias / 2; backward of the fused CE only), L105-124 (S_v / S_a; ratio_v > 1:
# the visual is modulated with 1 - tanh(alpha ratio_v), otherwise, a tie included, the audio with
# 1 - tanh(alpha ratio_a)), L132-148 (inside the window, only 4-D gradients of the encoders: OGM
# scales them; OGM-GE scales them and adds N(0, std(original gradient) + 1e-8) noise, to both
# encoders), L153 (step). Their noise comes from `normal_` on the global generator; ours from the
# method's own generator, which the re-derivation shares: the tie to the authors is distributional
# (see the statistics test below).
def ogm_reference(model, x, y, alpha, noise_gen=None, variant=None):
    ref = copy.deepcopy(model)
    feats = encode(ref, x)
    out = fused(ref, feats)
    params = list(ref.parameters())
    grads = dict(zip(params, torch.autograd.grad(F.cross_entropy(out, y), params)))
    w, b = ref.fusion.fc.weight.detach(), ref.fusion.fc.bias.detach()
    half = w.shape[1] // 2
    out_a = feats["audio"].detach() @ w[:, :half].t() + b / 2
    out_v = feats["visual"].detach() @ w[:, half:].t() + b / 2
    score_a = torch.softmax(out_a, 1)[torch.arange(B), y].sum()
    score_v = torch.softmax(out_v, 1)[torch.arange(B), y].sum()
    ratio_v = float(score_v / score_a)
    ratio_a = 1 / ratio_v

    def coefficient(r):
        return 1 - math.tanh(alpha * (max(r - 1, 0) if variant == "relu_formula" else r))

    if ratio_v > 1:
        k = {"audio": 1.0, "visual": coefficient(ratio_v)}
    elif ratio_v == 1 and variant == "tie_modulates_nothing":
        k = {"audio": 1.0, "visual": 1.0}
    else:
        k = {"audio": coefficient(ratio_a), "visual": 1.0}
    for m in ("audio", "visual"):
        for p in ref.encoders[m].parameters():
            if p.dim() != 4 and variant != "all_params":
                continue
            g = grads[p]
            if noise_gen is None:
                grads[p] = g * k[m]
            else:
                std = (g * k[m] if variant == "noise_std_from_scaled" else g).std()
                grads[p] = g * k[m] + torch.randn(g.shape, generator=noise_gen) * (std + 1e-8)
    return ref, grads, k


def ogm_compare(name, case, variant=None):
    model, x, y = build(name, seed=4)
    with torch.no_grad():
        if case == "tie":  # the same encoder, input and head half for both: exactly equal scores
            model.encoders["visual"].load_state_dict(model.encoders["audio"].state_dict())
            x = {"audio": x["audio"], "visual": x["audio"].clone()}
            model.fusion.fc.weight[:, 4:] = model.fusion.fc.weight[:, :4]
        else:
            fit_head_half(model, x, y, case)
    method = create_method(name, make_args(ogm_alpha=0.8), model, INFO)
    gen = method.noise_generator(0, "cpu") if name == "ogm_ge" else None
    before = state(model)
    ref, grads, k = ogm_reference(model, x, y, 0.8, gen, variant)
    want = reference_step(ref, grads)
    got = project_step(method, model, x, y)
    if variant is None:  # the case is what it says: the expected modality is the one modulated
        modulated = "audio" if case == "tie" else case
        assert k[modulated] < 1 and k["visual" if modulated == "audio" else "audio"] == 1.0
    return differences(before, got, want)


@pytest.mark.parametrize("name", ["ogm", "ogm_ge"])
@pytest.mark.parametrize("case", ["audio", "visual", "tie"])
def test_ogm_step_equals_the_authors_update(name, case):
    assert ogm_compare(name, case) == []


@pytest.mark.parametrize("name, case, variant", [
    ("ogm", "audio", "all_params"), ("ogm_ge", "visual", "all_params"), ("ogm", "audio", "relu_formula"),
    ("ogm", "tie", "tie_modulates_nothing"), ("ogm_ge", "audio", "noise_std_from_scaled")])
def test_ogm_comparison_fails_on_a_broken_update(name, case, variant):
    assert ogm_compare(name, case, variant) != []


def test_ogm_ge_noise_statistics_and_untouched_gradients():
    """Over 200 steps the noise, standardised by the original gradient's std, is N(0, 1) (the
    authors' normal_(0, std + 1e-8)); BatchNorm, linear and head gradients are never touched."""
    model, x, y = build("ogm_ge")
    method = create_method("ogm_ge", make_args(), model, INFO)
    out = model(x)
    F.cross_entropy(out.logits, y).backward()
    original = {n: p.grad.clone() for n, p in model.named_parameters()}
    standardised = []
    for _ in range(200):
        for n, p in model.named_parameters():
            p.grad = original[n].clone()
        logs = method.before_step(model, out, y, 0)
        for n, p in model.named_parameters():
            if p.dim() == 4:
                m = n.split(".")[1]
                g = original[n]
                standardised.append(((p.grad - logs[f"ogm_coeff_{m}"] * g) / (g.std() + 1e-8)).flatten())
            else:
                assert torch.equal(p.grad, original[n]), n
    z = torch.cat(standardised)  # 200 steps x 2 convolutions x 27 weights
    assert z.numel() == 200 * 2 * 27
    assert abs(float(z.mean())) < 0.05 and abs(float(z.std()) - 1) < 0.05


# ====================================================================== OPM
# GeWu-Lab/BML_TPAMI2024 at 4b3aa4f: code/models/Classifier.py (calcu_q: q = q_base (1 + lambda
# tanh(relu(rho - 1))) when positive, clipped to [0, 1]; Classifier.forward: scores from the head's
# detached weight halves plus bias / 2 on the undropped features; Modality_drop.execute_drop: a step
# drops with probability p_exe, each sample keeps modality m with probability 1 - q_m, features
# times mask / (1 - theta), theta = sum D_m q_m / sum D_m, samples with no modality left removed),
# code/main.py L86-116 (the loss on the kept samples only; drop from epoch 6). Their draws come
# from numpy and a Bernoulli sample; the re-derivation shares the method's draws (torch's global
# generator, the step's draw first, then one mask per modality): the tie to the authors is in
# distribution, checked by the statistics test below.
def opm_reference(model, x, y, q_base, lam, p_exe, seed, variant=None):
    ref = copy.deepcopy(model)
    feats = encode(ref, x)
    w, b = ref.fusion.fc.weight.detach(), ref.fusion.fc.bias.detach()
    scores = {m: float(torch.softmax(feats[m].detach() @ w[:, half].t() + b / 2, 1)[torch.arange(B), y].sum())
              for m, half in (("audio", slice(0, 4)), ("visual", slice(4, 8)))}
    q = {}
    for m, other in (("audio", "visual"), ("visual", "audio")):
        ahead = math.tanh(max(scores[m] / scores[other] - 1, 0))
        if variant == "ratio_without_tanh":
            ahead = max(scores[m] / scores[other] - 1, 0)
        q[m] = min(max(q_base * (1 + lam * ahead), 0.0), 1.0) if ahead > 0 else 0.0
    if variant == "drop_weaker":
        q = {"audio": q["visual"], "visual": q["audio"]}
    torch.manual_seed(seed)
    assert float(torch.rand(())) < p_exe  # this step drops
    masks = {m: (torch.rand(B, 1) >= q[m]).float() for m in feats}
    theta = sum(4 * q[m] for m in feats) / (4 * len(feats))
    divisor = 1.0 if variant == "no_rescale" else 1 - theta
    kept = torch.stack([masks[m][:, 0] for m in feats]).amax(0) > 0
    cleaned = {m: (feats[m] * masks[m] / divisor)[kept] for m in feats}
    loss = F.cross_entropy(fused(ref, cleaned), y[kept])
    params = list(ref.parameters())
    return ref, dict(zip(params, torch.autograd.grad(loss, params))), q


def opm_compare(variant=None):
    model, x, y = build("opm", seed=5)
    fit_head_half(model, x, y, "audio")
    method = create_method("opm", make_args(), model, INFO)  # q_base 0.5, lambda 0.5, p_exe 0.7, from epoch 6
    before = state(model)
    ref, grads, q = opm_reference(model, x, y, 0.5, 0.5, 0.7, seed=3, variant=variant)
    want = reference_step(ref, grads)
    method.on_epoch_start(6, None)
    torch.manual_seed(3)
    got = project_step(method, model, x, y, epoch=6)
    if variant is None:
        assert 0.5 < q["audio"] < 1 and q["visual"] == 0 and method.q == pytest.approx(q, rel=1e-6)
    return differences(before, got, want)


def test_opm_step_equals_the_authors_update():
    assert opm_compare() == []


@pytest.mark.parametrize("variant", ["drop_weaker", "no_rescale", "ratio_without_tanh"])
def test_opm_comparison_fails_on_a_broken_update(variant):
    assert opm_compare(variant) != []


def test_opm_drop_statistics():
    """Over 400 steps a step drops with probability p_exe and the dominant modality's features of a
    sample are dropped with probability q (the authors' Bernoulli(1 - q) masks)."""
    model, x, y = build("opm", seed=5)
    fit_head_half(model, x, y, "audio")
    method = create_method("opm", make_args(), model, INFO)
    method.on_epoch_start(6, None)
    torch.manual_seed(0)
    executed, dropped = 0, []
    with torch.no_grad():
        for _ in range(400):
            out = method.forward(model.eval(), x, y)
            if method.keep is not None:
                executed += 1
                dropped.append((out.features["audio"].abs().sum(1) == 0).float())
                assert (out.features["visual"].abs().sum(1) > 0).all()
    assert abs(executed / 400 - 0.7) < 0.07
    assert abs(float(torch.cat(dropped).mean()) - method.q["audio"]) < 0.04


# ====================================================================== D&R
# GeWu-Lab/Diagnosing_Relearning_ECCV2024 at 025085e: code/ours.py L99-135 (reinit_score: per
# split and modality MinMaxScaler(-1, 1), KMeans(n_clusters=C, random_state=0), purity = the
# accuracy of each cluster's majority label; a = tanh(move_lambda |P_train - P_val|)), L139-169
# (reinit: every parameter whose name holds audio_net / visual_net becomes a init + (1 - a) now;
# the lists of names holding "conv" are built and never used), L345-349 (the initial state saved
# right after the model is built), L415-427 (after epochs with epoch % reinit_epoch == 0, epoch > 0).
def relearn_reference(model, init, features, lam, variant=None):
    ref = copy.deepcopy(model)
    alpha = {}
    for m in INFO.modality_names:
        purity = {}
        for split, (feats, labels) in features.items():
            scaled = MinMaxScaler(feature_range=(-1, 1)).fit_transform(feats[m].double().numpy())
            clusters = KMeans(n_clusters=INFO.num_classes, random_state=0, n_init=10).fit_predict(scaled)
            labels = labels.numpy()
            majority = {c: np.bincount(labels[clusters == c]).argmax() for c in np.unique(clusters)}
            purity[split] = float(np.mean([majority[c] == t for c, t in zip(clusters, labels)]))
        gap = abs(purity["train"] - purity["val"])
        alpha[m] = min(lam * gap, 1.0) if variant == "no_tanh" else math.tanh(lam * gap)
    with torch.no_grad():
        for m in INFO.modality_names:
            named = dict(ref.encoders[m].named_parameters())
            if variant == "buffers_too":
                named.update(ref.encoders[m].named_buffers())
            for name, p in named.items():
                if variant == "conv_only" and "conv" not in name:
                    continue
                if p.dtype.is_floating_point:
                    p.copy_(alpha[m] * init[f"encoders.{m}.{name}"] + (1 - alpha[m]) * p)
    return state(ref), alpha


def relearn_compare(variant=None):
    model, _, _ = build("relearn", seed=6)
    init = state(model)
    method = create_method("relearn", make_args(kmeans_backend="sklearn", reinit_epoch=1), model, INFO)
    with torch.no_grad():  # training moved everything, BatchNorm statistics included
        for t in model.state_dict().values():
            if t.dtype.is_floating_point:
                t.add_(torch.randn_like(t) * 0.1)
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(40) % INFO.num_classes
    centres = {m: torch.randn(INFO.num_classes, 4, generator=g) * 3 for m in INFO.modality_names}
    noise = {"train": {"audio": 0.3, "visual": 2.0}, "val": {"audio": 3.0, "visual": 2.5}}  # audio memorised
    features = {split: ({m: centres[m][labels] + torch.randn(40, 4, generator=g) * noise[split][m]
                         for m in INFO.modality_names}, labels) for split in ("train", "val")}
    ctx = TrainContext(model=model, device="cpu", info=INFO, args=method.args, extract_features=features.get)
    before = state(model)
    want, alpha = relearn_reference(model, init, features, 3.0, variant)
    record = method.on_epoch_end(1, ctx)["diagnosis"]
    if variant is None:
        assert record.alpha == pytest.approx(alpha, rel=1e-6) and alpha["audio"] > alpha["visual"] > 0
    return differences(before, state(model), want)


def test_relearn_reinit_equals_the_authors():
    assert relearn_compare() == []


@pytest.mark.parametrize("variant", ["buffers_too", "conv_only", "no_tanh"])
def test_relearn_comparison_fails_on_a_broken_reinit(variant):
    assert relearn_compare(variant) != []
