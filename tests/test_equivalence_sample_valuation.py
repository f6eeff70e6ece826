"""sample_valuation equals the authors' valuation, re-sampled set and training step (SPEC section 4).

Re-derived here in our own words from GeWu-Lab/Valuate-and-Enhance-Multimodal-Cooperation at
7ed12b0: code/sample_level.py L83-122 (the model in eval mode; out, out_v = the head with the audio
features zeroed, out_a = with the visual features zeroed; value_all = 2 when out's argmax is the
label, value_a / value_v = 1 when theirs is; contrib_a = (value_a + value_all - value_v) / 2,
contrib_v likewise), L141-151 and L321-336 (warm-up epochs train on the plain set; from the end of
epoch warmup - 1 the next epoch's set is rebuilt from that valuation), L164-176 (one CE step on the
fused logits with the sample's drop code); code/datasets/dataloader.py L152-186 (every sample once
with drop 0, then per sample: 1 / 2 / 3 copies with drop 2 for 0.4 < contrib_a < 1 / -0.1 <
contrib_a < 0.4 / contrib_a < -0.1, then the same for contrib_v with drop 1), L259-318 (modality
level); code/models/models.py L62-67 (drop 1 zeroes the audio feature row, drop 2 the visual one)
and L74-86 (exec_drop); code/modality_level.py L143-162 (the modality level's part Z, gaps).
"""
import argparse
import itertools
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from dnr.distributed import EpochBatchSampler
from dnr.methods import METHODS, TrainContext, create_method
from dnr.methods.sample_valuation import ALL, modality_level_pool, sample_contributions, subset_values
from dnr.stepping import Batch, Updater
from test_equivalence import (INFO, build, differences, fused, make_args, reference_step, sgd,
                              state, tiny_encoder)  # noqa: F401  (tiny_encoder: the autouse fixture)

N, BATCH = 16, 12


def train_split(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = {m: torch.randn(N, 1, 6, 6, generator=g) for m in INFO.modality_names}
    return x, torch.arange(N) % INFO.num_classes


def eval_features(model, x):
    was = model.training
    model.eval()
    with torch.no_grad():
        feats = {m: model.encoders[m](x[m]) for m in INFO.modality_names}
    model.train(was)
    return feats


def make_ctx(model, args, x, y, sampler=None):
    return TrainContext(model=model, device="cpu", info=INFO, args=args,
                        extract_features=lambda split: (eval_features(model, x), y),
                        train_loader=SimpleNamespace(batch_sampler=sampler, dataset=None))


# ---------------------------------------------------------------- the authors' recipe, our words
def authors_contributions(model, x, y, variant=None):
    """(contrib_a, contrib_v) per sample, as their execute_modulation computes them."""
    model.eval()
    with torch.no_grad():
        if variant == "zero_inputs":  # a plausible misreading: zero the other modality's input
            a = model.encoders["audio"](x["audio"])
            v = model.encoders["visual"](x["visual"])
            a0 = model.encoders["audio"](torch.zeros_like(x["audio"]))
            v0 = model.encoders["visual"](torch.zeros_like(x["visual"]))
        else:
            a, v = model.encoders["audio"](x["audio"]), model.encoders["visual"](x["visual"])
            a0, v0 = torch.zeros_like(a), torch.zeros_like(v)
        out = fused(model, {"audio": a, "visual": v}).argmax(1)
        out_v = fused(model, {"audio": a0, "visual": v}).argmax(1)
        out_a = fused(model, {"audio": a, "visual": v0}).argmax(1)
    model.train()
    full = 1.0 if variant == "value_all_1" else 2.0
    res = []
    for i in range(len(y)):
        va, vv = float(out_a[i] == y[i]), float(out_v[i] == y[i])
        vall = full if out[i] == y[i] else 0.0
        res.append(((va + vall - vv) / 2, (vv + vall - va) / 2))
    return res


def authors_dataset(contrib, variant=None):
    """(data index, drop code) per position of their re-sampled dataset."""
    def count(c):
        if 0.4 < c < 1:
            return 1
        if -0.1 < c < 0.4:
            return 2
        if c < -0.1:
            return 3
        return 0

    items = [(i, 0) for i in range(len(contrib))]
    for i, (ca, cv) in enumerate(contrib):
        # drop 2 zeroes visual: the copy trains audio, the modality whose contribution asked for it
        items += [(i, 1 if variant == "drop_own" else 2)] * count(ca)
        items += [(i, 2 if variant == "drop_own" else 1)] * count(cv)
    return items


def authors_step(model, xb, yb, drops, variant=None):
    ref = __import__("copy").deepcopy(model)
    ref.train()
    if variant == "zero_inputs_in_training":
        xb = {"audio": torch.where(torch.tensor(drops)[:, None, None, None] == 1, 0.0, xb["audio"]),
              "visual": torch.where(torch.tensor(drops)[:, None, None, None] == 2, 0.0, xb["visual"])}
    a, v = ref.encoders["audio"](xb["audio"]), ref.encoders["visual"](xb["visual"])
    if variant not in ("no_mask", "zero_inputs_in_training"):
        d = torch.tensor(drops)[:, None]
        a = torch.where(d == 1, torch.zeros_like(a), a)  # their in-place row assignment, out of place
        v = torch.where(d == 2, torch.zeros_like(v), v)
    loss = F.cross_entropy(fused(ref, {"audio": a, "visual": v}), yb)
    params = list(ref.parameters())
    return ref, dict(zip(params, torch.autograd.grad(loss, params)))


# ---------------------------------------------------------------- the comparison
def varied_labels(model, x):
    """Labels that give every kind of contribution: sample i's label is the prediction with audio
    only (i % 4 == 0), visual only (1), both (2), or a class none of the three predicts (3)."""
    with torch.no_grad():
        model.fusion.fc.weight.mul_(20)  # predictions that differ from sample to sample
        f = eval_features(model, x)
        zero = {m: torch.zeros_like(t) for m, t in f.items()}
        preds = [fused(model, {"audio": f["audio"], "visual": zero["visual"]}).argmax(1),
                 fused(model, {"audio": zero["audio"], "visual": f["visual"]}).argmax(1), fused(model, f).argmax(1)]
    y = []
    for i in range(N):
        if i % 4 < 3:
            y.append(int(preds[i % 4][i]))
        else:
            y.append(next(c for c in range(INFO.num_classes) if all(int(p[i]) != c for p in preds)))
    return torch.tensor(y)


def sv_compare(variant=None):
    model, _, _ = build("sample_valuation", seed=3)
    x, _ = train_split()
    y = varied_labels(model, x)
    args = make_args(sample_valuation_pass="eval", random_seed=0)
    method = create_method("sample_valuation", args, model, INFO)
    sampler = EpochBatchSampler(N, BATCH)
    ctx = make_ctx(model, args, x, y, sampler)
    before = state(model)
    contrib = authors_contributions(model, x, y, variant)
    theirs = authors_dataset(contrib, variant)
    pool = method.epoch_indices(5, ctx)  # after the default warm-up of 5 epochs
    problems = []
    if pool != [i for i, _ in theirs] or method.roles != [{0: ALL, 1: 1, 2: 0}[d] for _, d in theirs]:
        problems.append("re-sampled set differs")
    sampler.set_epoch(12345, pool)
    method.on_epoch_start(5, ctx)
    positions = sampler.batch_positions()[0]
    index = [pool[p] for p in positions]
    xb, yb = {m: t[index] for m, t in x.items()}, y[index]
    drops = [theirs[p][1] if p < len(theirs) else 0 for p in positions]
    if variant is None:
        assert set(drops) == {0, 1, 2}, "the batch should hold originals and copies of both kinds"
        assert len({c for pair in contrib for c in pair}) >= 4, "every kind of contribution should occur"
    ref, grads = authors_step(model, xb, yb, drops, variant)
    want = reference_step(ref, grads)
    method.train_step(model, Batch(xb, yb, torch.tensor(index), 5, 0), Updater(model, sgd(model), "cpu"))
    return problems + differences(before, state(model), want)


def test_sample_valuation_equals_the_authors():
    assert sv_compare() == []


@pytest.mark.parametrize("variant", ["value_all_1", "zero_inputs", "drop_own", "no_mask", "zero_inputs_in_training"])
def test_sample_valuation_comparison_fails_on_a_broken_recipe(variant):
    assert sv_compare(variant) != []


def test_contributions_match_the_authors_formula_and_shapley_for_three_modalities():
    """Two modalities: (v(m) + v(all) - v(other)) / 2 with v(all) = 2; three: the permutation
    definition of the Shapley value with v(S) = |S| * correct, and they add up to v(all)."""
    g = torch.Generator().manual_seed(0)
    for names in (["audio", "visual"], ["audio", "visual", "sensor"]):
        values = {}
        for k in range(1, len(names) + 1):
            for s in itertools.combinations(names, k):
                values[frozenset(s)] = k * (torch.rand(50, generator=g) < 0.5).float()
        phi = sample_contributions(values, names)
        v = lambda s: values.get(frozenset(s), torch.zeros(50))  # noqa: E731
        for j, m in enumerate(names):
            want = torch.zeros(50, dtype=torch.float64)
            orders = list(itertools.permutations(names))
            for order in orders:
                before = order[:order.index(m)]
                want += (v(before + (m,)) - v(before)).double() / len(orders)
            assert torch.allclose(phi[:, j], want)
        assert torch.allclose(phi.sum(1), v(names).double())


def test_subset_values_zero_the_absent_features():
    model, x, y = build("sample_valuation")
    feats = eval_features(model, x)
    values = subset_values(model.head, feats, y, INFO.modality_names)
    only_audio = fused(model, {"audio": feats["audio"], "visual": torch.zeros_like(feats["visual"])}).argmax(1)
    assert torch.equal(values[frozenset({"audio"})], (only_audio == y).float())
    assert torch.equal(values[frozenset(INFO.modality_names)], 2 * (fused(model, feats).argmax(1) == y).float())


def test_warmup_schedule_and_resume():
    """No re-sampling before epoch `warmup`; after it, the set depends only on the current weights
    (a resumed run, a fresh method object on the same weights, rebuilds the same set)."""
    model, _, _ = build("sample_valuation", seed=3)
    x, y = train_split()
    args = make_args(sample_valuation_pass="eval", sample_valuation_warmup=2)
    method = create_method("sample_valuation", args, model, INFO)
    ctx = make_ctx(model, args, x, y, EpochBatchSampler(N, BATCH))
    assert method.epoch_indices(0, ctx) is None and method.epoch_indices(1, ctx) is None
    pool = method.epoch_indices(2, ctx)
    assert pool is not None and sorted(set(pool)) == list(range(N)) and len(pool) > N
    again = create_method("sample_valuation", args, model, INFO).epoch_indices(7, ctx)
    assert again == pool


# ---------------------------------------------------------------- modality level
def authors_modality_level(contrib, part, extra, alpha, variant=None):
    """Their modality_level.py L143-162 and dataloader.py L297-316 with the draws given: the mean
    contributions over the part Z, gap = 1 - mean, d = |gap_a - gap_v| / 3 * 2 * alpha, int(d N)
    copies with drop 2 (train audio) when gap_a > gap_v, else drop 1."""
    n = len(contrib)
    ca = sum(contrib[i][0] for i in part) / len(part)
    cv = sum(contrib[i][1] for i in part) / len(part)
    gap_a, gap_v = 1.0 - ca, 1.0 - cv
    d = abs(gap_a - gap_v) / 3 * 2 * alpha if variant != "no_two_thirds" else abs(gap_a - gap_v) * alpha
    chosen = extra[:int(d * n)]
    weak_audio = gap_a > gap_v if variant != "stronger" else gap_a < gap_v
    return list(range(n)) + chosen, [ALL] * n + [0 if weak_audio else 1] * len(chosen)


@pytest.mark.parametrize("variant", [None, "no_two_thirds", "stronger"])
def test_modality_level_equals_the_authors(variant):
    g = torch.Generator().manual_seed(4)
    n = 200
    contrib = [(float(a), float(v)) for a, v in zip(torch.randint(-1, 4, (n,), generator=g) / 2,
                                                    torch.randint(-1, 3, (n,), generator=g) / 2)]
    phi = torch.tensor(contrib, dtype=torch.float64)
    pool, roles, d = modality_level_pool(phi, 0.2, 1.0, "linear", torch.Generator().manual_seed(9))
    # The same draws, in the method's order: the part Z first, then the copies.
    gen = torch.Generator().manual_seed(9)
    part = torch.randint(n, (int(n * 0.2),), generator=gen).tolist()
    extra = torch.randint(n, (n,), generator=gen).tolist()
    want_pool, want_roles = authors_modality_level(contrib, part, extra, 1.0, variant)
    same = pool == want_pool and roles == want_roles
    assert same == (variant is None)
    if variant is None:
        assert 0 < d < 1 and len(pool) > n


def test_modality_level_runs_from_the_method():
    model, _, _ = build("sample_valuation", seed=3)
    x, y = train_split()
    args = make_args(sample_valuation_pass="eval", sample_valuation_level="modality", sample_valuation_warmup=0,
                     random_seed=0)
    method = create_method("sample_valuation", args, model, INFO)
    pool = method.epoch_indices(0, make_ctx(model, args, x, y))
    assert pool[:N] == list(range(N)) and set(method.roles[N:]) <= {0, 1}
    assert method.summary["samples"] == len(pool)


# ---------------------------------------------------------------- plumbing
@pytest.mark.parametrize("world", [1, 2, 3])
def test_batch_positions_agree_with_the_batches(world):
    pool = [i % 10 for i in range(37)]  # repeats
    for rank in range(world):
        sampler = EpochBatchSampler(10, 4, rank, world)
        sampler.set_epoch(7, pool)
        assert [[pool[p] for p in b] for b in sampler.batch_positions()] == list(sampler)
    plain = EpochBatchSampler(10, 4)
    plain.set_epoch(7)
    assert plain.batch_positions() == list(plain)


def test_training_pass_valuation_uses_the_training_loader():
    """--sample_valuation_pass train values every training sample (dataset order) through the
    training loader's dataset: with no augmentation it equals the evaluation pass."""
    model, _, _ = build("sample_valuation", seed=3)
    x, y = train_split()

    class Split(torch.utils.data.Dataset):
        def __len__(self):
            return N

        def __getitem__(self, i):
            return {"inputs": {m: x[m][i] for m in x}, "label": y[i], "index": i}

    args = make_args(sample_valuation_pass="train", batch_size=5, eval_batch_size=0, num_workers=0)
    method = create_method("sample_valuation", args, model, INFO)
    ctx = make_ctx(model, args, x, y)
    ctx.train_loader = SimpleNamespace(dataset=Split(), batch_sampler=None)
    feats, labels = method.valuation_features(ctx)
    want = eval_features(model, x)
    assert torch.equal(labels, y)
    assert all(torch.allclose(feats[m], want[m], atol=1e-6) for m in want)


def test_bad_flags_are_refused():
    p = argparse.ArgumentParser()
    METHODS["sample_valuation"].add_args(p)
    for flags, name in ((["--sample_valuation_warmup", "-1"], "--sample_valuation_warmup"),
                        (["--sample_valuation_part_ratio", "0"], "--sample_valuation_part_ratio"),
                        (["--sample_valuation_alpha", "-1"], "--sample_valuation_alpha")):
        args = make_args(**{k: v for k, v in vars(p.parse_args(flags)).items()})
        with pytest.raises(ValueError, match=name):
            METHODS["sample_valuation"].check_args(args)
    assert math.isclose(make_args().sample_valuation_part_ratio, 0.2)


# ---------------------------------------------------------------- end to end
def run_main(args, out):
    import sys

    from conftest import CODE, TINY

    sys.path.insert(0, str(CODE))
    import main as trainer

    return trainer.cli(TINY + ["--ckpt_path", str(out), "--device", "cpu", "--no-probe"] + args)


def log_of(out):
    import json

    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("level", ["sample", "modality"])
def test_sample_valuation_three_modalities_end_to_end(level, tmp_path):
    """Three modalities: the valuation over all subsets, copies that keep one of three modalities."""
    rc = run_main(["--method", "sample_valuation", "--builtin_modalities", "audio,visual,sensor", "--epochs", "2",
                   "--sample_valuation_warmup", "1", "--sample_valuation_level", level], tmp_path / level)
    assert rc == 0
    record = log_of(tmp_path / level)[1]["sample_valuation"]
    assert set(record["contribution"]) == set(record["copies"]) == {"audio", "visual", "sensor"}
    assert record["samples"] == 40 + sum(record["copies"].values())


def test_sample_valuation_resume_matches_an_uninterrupted_run(tmp_path):
    """The re-sampled set is rebuilt from the checkpoint's weights: a run cut after epoch 1 and
    resumed trains epoch 2 on the same set, to the same numbers."""
    flags = ["--method", "sample_valuation", "--sample_valuation_warmup", "1", "--deterministic"]
    assert run_main(flags + ["--epochs", "3"], tmp_path / "full") == 0
    assert run_main(flags + ["--epochs", "2"], tmp_path / "cut") == 0
    assert run_main(flags + ["--epochs", "3", "--resume"], tmp_path / "cut") == 0
    full, cut = log_of(tmp_path / "full")[2], log_of(tmp_path / "cut")[2]
    assert full["sample_valuation"] == cut["sample_valuation"]
    assert full["train"]["loss"] == pytest.approx(cut["train"]["loss"], rel=1e-5)
    assert full["val"]["acc"] == cut["val"]["acc"]
