"""CML's training step equals its authors' update (SPEC section 4; the helpers and the tiny encoders
are those of test_equivalence.py), with two and three modalities."""
import copy

import pytest
import torch
import torch.nn.functional as F

from dnr.data import DatasetInfo, ModalitySpec
from dnr.methods import METHODS, cml, create_method
from test_equivalence import B, differences, make_args, project_step, reference_step, state, tiny_encoder  # noqa: F401

SPEC = ModalitySpec("x", "spectrogram", (1, 6, 6))
INFOS = {n: DatasetInfo("tiny", ("a", "b", "c", "d"),
                        tuple(ModalitySpec(m, "spectrogram", (1, 6, 6)) for m in ("audio", "visual", "sensor")[:n]))
         for n in (2, 3)}


def build(n, seed):
    """A concat model with tiny encoders whose first modality's head slice fits the labels, so the
    full and reduced inputs are right and wrong in every combination; a fixed batch and orders."""
    info = INFOS[n]
    torch.manual_seed(seed)
    model = METHODS["cml"].build_model(info, encoders={m: "tiny_conv" for m in info.modality_names})
    with torch.no_grad():
        for _ in range(3):
            model({m: torch.randn(B, 1, 6, 6) * 2 + 0.5 for m in info.modality_names})
    x = {m: torch.randn(B, 1, 6, 6) for m in info.modality_names}
    y = torch.arange(B) % info.num_classes
    with torch.no_grad():
        feats = copy.deepcopy(model).train()(x).features["audio"]
        target = F.one_hot(y, info.num_classes).float() * 2
        model.fusion.fc.weight[:, :4] = torch.linalg.lstsq(feats, target).solution.t()
        model.fusion.fc.weight[:2, :4] *= 0.3  # classes 0 and 1 stay uncertain: some wrong predictions
    orders = torch.stack([torch.randperm(n) for _ in range(B)])
    return info, model, x, y, orders


# QingyangZhang/CML at 9d2496e, miwae/train.py: L67-86 (get_multi_mask: input 0 complete; input
# num + 1 also lacks view miss_order[i][num], a per-sample shuffled list), L229-234 (missing views
# replaced by a constant mean, no gradient), L280-292 (each input through the classifier; softmax;
# confidence = max probability, prediction = argmax; CE averaged over the inputs), L294-302 (for
# consecutive inputs: relu((conf[num+1] - conf[num]) * [pred[num] == y] - eps) summed over the
# batch, plus relu((conf[num+1] - detached conf[num]) * [both wrong] - eps) summed), L304 (loss =
# CE * alpha (1) + rank * beta / 100). cpm/CPM_Nets.py L120-124: the CPM-Nets rule, one term with
# s = not (reduced right and fuller wrong), no detach, weight beta as is.
def cml_reference(info, model, x, y, orders, lam=0.1, rule="miwae", eps=0.0, impute="mean", variant=None):
    ref = copy.deepcopy(model).train()
    names = info.modality_names
    n = len(names)
    feats = {m: ref.encoders[m](x[m]) for m in names}  # training mode, as the ordinary forward pass
    if impute == "mean":
        const = {m: feats[m].mean(0) if variant == "impute_with_grad" else feats[m].detach().mean(0) for m in names}
    else:
        const = {m: torch.zeros_like(feats[m][0]) for m in names}
    conf, pred, ce = [], [], []
    for num in range(n):
        rows = []
        for i in range(B):
            if variant == "independent_removal":  # broken: only the num-th modality of the order missing
                missing = {names[int(orders[i, num - 1])]} if num > 0 else set()
            else:
                missing = {names[int(j)] for j in orders[i, :num]}
            rows.append(torch.cat([const[m] if m in missing else feats[m][i] for m in names]))
        logits = torch.stack(rows) @ ref.fusion.fc.weight.t() + ref.fusion.fc.bias
        prob = torch.softmax(logits, 1)
        c, p = prob.max(1)
        conf.append(c)
        pred.append(p)
        ce.append(F.cross_entropy(logits, y))
    cls = ce[0] if variant == "ce_full_only" else sum(ce) / n
    rank = 0.0
    reduce = (lambda t: t.mean()) if variant == "batch_mean" else (lambda t: t.sum())
    for num in range(n - 1):
        rise = conf[num] - conf[num + 1] if variant == "reversed" else conf[num + 1] - conf[num]
        if rule == "cpm":
            s = (~((pred[num + 1] == y) & (pred[num] != y))).float()
            rank = rank + reduce(F.relu(rise * s - eps))
            continue
        s = (pred[num] == y).float()
        rank = rank + reduce(F.relu(rise * s - eps))
        if variant != "no_both_wrong":
            both = ((pred[num + 1] != y) & (pred[num] != y)).float()
            fuller = conf[num] if variant == "no_detach" else conf[num].detach()
            rank = rank + reduce(F.relu((conf[num + 1] - fuller) * both - eps))
    loss = cls + lam * rank
    params = [p for p in ref.parameters() if p.requires_grad]
    got = torch.autograd.grad(loss, params, allow_unused=True)
    cases = {"fuller_right_rise": sum(int(((conf[k + 1] > conf[k]) & (pred[k] == y)).sum()) for k in range(n - 1)),
             "both_wrong_rise": sum(int(((conf[k + 1] > conf[k]) & (pred[k] != y) & (pred[k + 1] != y)).sum())
                                    for k in range(n - 1)),
             "reduced_right_only": sum(int(((pred[k] != y) & (pred[k + 1] == y)).sum()) for k in range(n - 1))}
    return ref, {p: g for p, g in zip(params, got) if g is not None}, cases


CASES = {2: 1, 3: 0}  # seeds whose batch covers every branch of the rule


def cml_compare(n, variant=None, monkeypatch=None, **flags):
    info, model, x, y, orders = build(n, CASES[n])
    args = make_args(**flags)
    method = create_method("cml", args, model, info)
    monkeypatch.setattr(cml, "removal_orders", lambda batch, m, device: orders.clone())
    before = state(model)
    ref, grads, cases = cml_reference(info, model, x, y, orders, args.cml_lambda, args.cml_rule, args.cml_margin,
                                      args.cml_impute, variant)
    if variant is None:
        assert min(cases.values()) > 0, cases  # the batch exercises every branch
    want = reference_step(ref, grads)
    got = project_step(method, model, x, y)
    return differences(before, got, want)


@pytest.mark.parametrize("n", [2, 3])
def test_cml_step_equals_the_authors_update(n, monkeypatch):
    assert cml_compare(n, monkeypatch=monkeypatch) == []


@pytest.mark.parametrize("flags", [dict(cml_rule="cpm", cml_lambda=1.0), dict(cml_impute="zero"),
                                   dict(cml_margin=0.05, cml_lambda=0.5)])
def test_cml_flag_variants_equal_their_rederivation(flags, monkeypatch):
    assert cml_compare(3, monkeypatch=monkeypatch, **flags) == []


@pytest.mark.parametrize("n, variant", [(2, "no_detach"), (2, "reversed"), (2, "batch_mean"), (2, "ce_full_only"),
                                        (2, "no_both_wrong"), (2, "impute_with_grad"), (3, "independent_removal")])
def test_cml_comparison_fails_on_a_broken_update(n, variant, monkeypatch):
    assert cml_compare(n, variant, monkeypatch=monkeypatch) != []


def test_cml_zero_imputation_differs_from_the_default(monkeypatch):
    info, model, x, y, orders = build(2, CASES[2])
    monkeypatch.setattr(cml, "removal_orders", lambda batch, m, device: orders.clone())
    method = create_method("cml", make_args(cml_impute="zero"), model, info)
    before = state(model)
    ref, grads, _ = cml_reference(info, model, x, y, orders, impute="mean")
    assert differences(before, project_step(method, model, x, y), reference_step(ref, grads)) != []


def test_cml_full_ce_flag_keeps_only_the_full_cross_entropy(monkeypatch):
    info, model, x, y, orders = build(2, CASES[2])
    monkeypatch.setattr(cml, "removal_orders", lambda batch, m, device: orders.clone())
    method = create_method("cml", make_args(cml_ce="full", cml_lambda=0.0), model, info)
    loss, _ = method.loss(model.train()(x), y, 0)
    assert torch.allclose(loss, F.cross_entropy(model(x).logits, y), atol=1e-6)


def test_cml_orders_are_per_sample_permutations():
    torch.manual_seed(0)
    orders = cml.removal_orders(64, 3, "cpu")
    assert orders.shape == (64, 3)
    assert torch.equal(orders.sort(1).values, torch.arange(3).expand(64, 3))
    assert len({tuple(r.tolist()) for r in orders}) > 3  # samples draw their own orders


def test_cml_chain_removes_one_more_modality_each_input():
    feats = {m: torch.randn(4, 2) + 5 for m in ("a", "b", "c")}
    orders = torch.tensor([[0, 1, 2], [2, 0, 1], [1, 2, 0], [0, 2, 1]])
    chain = cml.reduced_features(feats, orders, "zero")
    assert len(chain) == 3
    for k, inp in enumerate(chain):
        for i in range(4):
            removed = {("a", "b", "c")[j] for j in orders[i, :k].tolist()}
            for m in feats:
                assert bool((inp[m][i] == 0).all()) == (m in removed)


def test_cml_refuses_bad_flags():
    with pytest.raises(ValueError, match="--cml_lambda"):
        METHODS["cml"].check_args(make_args(cml_lambda=-1.0))
    with pytest.raises(ValueError, match="--cml_margin"):
        METHODS["cml"].check_args(make_args(cml_margin=-0.1))
