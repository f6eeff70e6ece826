"""The D&R core against hand-computed values and scikit-learn."""
import math

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score
from sklearn.preprocessing import MinMaxScaler
from torch import nn

from dnr.diagnose import (
    Diagnosis,
    PurityEstimate,
    Relearner,
    TanhGap,
    gap_strengths,
    diagnose_features,
    diagnose_purity,
    kmeans,
    minmax_scale,
    purity_score,
    relearn_strength,
    snapshot,
    soft_reinit_,
)


# ---------------------------------------------------------------- purity
def test_purity_perfect_clustering_is_one():
    labels = [0, 0, 1, 1, 2, 2]
    assert purity_score(labels, [5, 5, 9, 9, 7, 7]) == 1.0


def test_purity_worked_example():
    # cluster A holds labels {0, 0, 1}: majority 2 of 3; cluster B holds {1, 2, 2}: 2 of 3.
    assert purity_score([0, 0, 1, 1, 2, 2], [0, 0, 0, 1, 1, 1]) == pytest.approx(4 / 6)
    # one cluster for everything: purity is the largest class share
    assert purity_score([3, 3, 3, 8], [1, 1, 1, 1]) == pytest.approx(0.75)


def test_purity_invariant_to_relabelling_clusters_and_arbitrary_ids():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=200)
    clusters = rng.integers(0, 5, size=200)
    base = purity_score(labels, clusters)
    mapping = {0: 17, 1: -3, 2: 1000, 3: 4, 4: 0}
    assert purity_score(labels, [mapping[c] for c in clusters]) == base
    assert purity_score(labels * 10 + 7, clusters) == base  # label ids need not be contiguous
    assert purity_score(torch.as_tensor(labels), torch.as_tensor(clusters)) == base


def test_purity_rejects_bad_input():
    with pytest.raises(ValueError, match="differ in length"):
        purity_score([0, 1], [0])
    with pytest.raises(ValueError, match="integer"):
        purity_score([0.5, 1.0], [0, 1])
    with pytest.raises(ValueError, match="at least one"):
        purity_score([], [])


# ---------------------------------------------------------------- scaling
def test_minmax_scale_hand_example_and_constant_column():
    x = torch.tensor([[0.0, 5.0], [10.0, 5.0], [5.0, 5.0]])
    expected = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [0.0, -1.0]])
    assert torch.equal(minmax_scale(x), expected)


def test_minmax_scale_matches_sklearn():
    x = torch.randn(50, 7, generator=torch.Generator().manual_seed(1)) * 3 + 1
    x[:, 3] = 2.5  # a constant column
    ours = minmax_scale(x).double().numpy()
    ref = MinMaxScaler(feature_range=(-1, 1)).fit_transform(x.double().numpy())
    np.testing.assert_allclose(ours, ref, atol=1e-6)


# ---------------------------------------------------------------- k-means
def blobs(n_per=40, k=4, d=5, spread=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=g) * 5
    x = torch.cat([centers[i] + spread * torch.randn(n_per, d, generator=g) for i in range(k)])
    y = torch.arange(k).repeat_interleave(n_per)
    return x, y


def test_kmeans_agrees_with_sklearn_on_separated_blobs():
    x, y = blobs()
    ours = kmeans(x, 4, seed=0)
    ref = KMeans(n_clusters=4, n_init=10, random_state=0).fit_predict(x.numpy())
    assert adjusted_rand_score(ref, ours.numpy()) == 1.0
    assert adjusted_rand_score(y.numpy(), ours.numpy()) == 1.0
    assert ours.dtype == torch.long and ours.shape == (160,)


def inertia(x, labels):
    return sum(((x[labels == c] - x[labels == c].mean(0)) ** 2).sum().item() for c in labels.unique())


def test_kmeans_inertia_close_to_sklearn_on_unstructured_data():
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(3))
    ours = inertia(x, kmeans(x, 6, n_init=10, seed=0))
    ref = KMeans(n_clusters=6, n_init=10, random_state=0).fit(x.numpy()).inertia_
    assert ours <= ref * 1.02


def test_kmeans_deterministic_for_a_seed_and_best_of_restarts():
    x = torch.randn(200, 4, generator=torch.Generator().manual_seed(5))
    assert torch.equal(kmeans(x, 5, seed=11), kmeans(x, 5, seed=11))
    one = inertia(x, kmeans(x, 5, n_init=1, seed=2))
    many = inertia(x, kmeans(x, 5, n_init=20, seed=2))
    assert many <= one + 1e-6


def test_kmeans_handles_duplicates_and_rejects_bad_k():
    x = torch.zeros(10, 3)
    x[5:] = 1.0  # two distinct points, k = 3: one cluster cannot be non-empty and distinct
    labels = kmeans(x, 3, seed=0)
    assert labels.shape == (10,)
    assert purity_score([0] * 5 + [1] * 5, labels) == 1.0
    with pytest.raises(ValueError, match="k <= number of samples"):
        kmeans(torch.randn(3, 2), 4)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        kmeans(torch.randn(3), 2)


def test_kmeans_stays_on_the_input_device():
    x, _ = blobs(n_per=10)
    assert kmeans(x, 4).device == x.device


# ---------------------------------------------------------------- diagnosis
def test_diagnose_purity_separable_vs_uninformative():
    x, y = blobs(n_per=30, k=3, d=16, spread=0.2)
    assert diagnose_purity(x, y, 3) == 1.0
    assert diagnose_purity(x, y, 3, backend="sklearn") == 1.0
    noise = torch.randn(90, 16, generator=torch.Generator().manual_seed(0))
    assert diagnose_purity(noise, y, 3) < 0.6  # no label information: near chance (1/3)
    with pytest.raises(ValueError, match="unknown k-means backend"):
        diagnose_purity(x, y, 3, backend="faiss")


def test_diagnose_purity_scales_each_dimension_first():
    # Column 0 separates the classes on a tiny scale, column 1 is uniform noise on a large scale.
    # Raw k-means splits on the noise; after per-dimension [-1, 1] scaling it splits on column 0.
    g = torch.Generator().manual_seed(0)
    y = torch.arange(2).repeat_interleave(50)
    x = torch.stack([y.float() * 1e-3, torch.rand(100, generator=g) * 400.0], 1)
    assert purity_score(y, kmeans(x, 2)) < 0.7
    assert diagnose_purity(x, y, 2) == 1.0


def test_diagnose_purity_repeats_are_seeds_seed_to_seed_plus_r():
    """R repeats = the single-seed purities of seeds s .. s+R-1 on the same features; their mean
    (returned as a float) and sample std (spread=True). R = 1 is the published single k-means."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(120, 6, generator=g)  # unstructured: the k-means optimum depends on the seed
    y = torch.randint(0, 4, (120,), generator=g)
    singles = [diagnose_purity(x, y, 4, seed=7 + r, n_init=1) for r in range(5)]
    assert len(set(singles)) > 1  # the seed matters here, so the test below can fail
    est = diagnose_purity(x, y, 4, seed=7, n_init=1, repeats=5, spread=True)
    assert isinstance(est, PurityEstimate) and est.values == tuple(singles)
    assert est.mean == pytest.approx(np.mean(singles)) and est.std == pytest.approx(np.std(singles, ddof=1))
    assert diagnose_purity(x, y, 4, seed=7, n_init=1, repeats=5) == pytest.approx(est.mean)
    assert diagnose_purity(x, y, 4, seed=7, n_init=1) == singles[0]  # R = 1: as before
    assert diagnose_purity(x, y, 4, seed=7, n_init=1, spread=True).std == 0.0
    assert diagnose_purity(x, y, 4, seed=7, n_init=1, backend="sklearn", repeats=2, spread=True).values == tuple(
        diagnose_purity(x, y, 4, seed=7 + r, n_init=1, backend="sklearn") for r in range(2))
    with pytest.raises(ValueError, match="--diagnosis_repeats"):
        diagnose_purity(x, y, 4, repeats=0)


def test_diagnose_features_repeats_use_the_mean_purity_and_record_stds():
    g = torch.Generator().manual_seed(0)
    y_tr, y_va = torch.arange(3).repeat_interleave(30), torch.arange(3).repeat_interleave(15)
    train = ({"memo": y_tr[:, None] * 4.0 + 0.3 * torch.randn(90, 5, generator=g),  # separates train only
              "none": torch.randn(90, 5, generator=g)}, y_tr)  # no label information anywhere
    val = ({"memo": torch.randn(45, 5, generator=g), "none": torch.randn(45, 5, generator=g)}, y_va)
    d = diagnose_features(train, val, 3, n_init=1, repeats=4, lam=3.0, epoch=2)
    est = {m: {s: diagnose_purity(f[0][m], f[1], 3, n_init=1, repeats=4, spread=True)
               for s, f in (("train", train), ("val", val))} for m in ("memo", "none")}
    for m in ("memo", "none"):
        assert d.purity[m] == {s: pytest.approx(e.mean) for s, e in est[m].items()}
        assert d.purity_std[m] == {s: pytest.approx(e.std) for s, e in est[m].items()}
        assert d.alpha[m] == pytest.approx(relearn_strength(d.purity[m]["train"], d.purity[m]["val"], 3.0))
        per_seed = [relearn_strength(a, b, 3.0) for a, b in zip(est[m]["train"].values, est[m]["val"].values)]
        assert d.alpha_std[m] == pytest.approx(np.std(per_seed, ddof=1))
    # known answers: memorised train split -> purity 1 vs near chance (1/3) on val; no information -> chance on both
    assert d.purity["memo"]["train"] == 1.0 and d.purity["memo"]["val"] < 0.6 and d.alpha["memo"] > 0.8
    assert max(d.purity["none"].values()) < 0.6 and d.gap["none"] < 0.2
    rec = d.to_dict()
    assert rec["repeats"] == 4 and set(rec["purity_std"]) == {"memo", "none"} and Diagnosis(**rec) == d
    assert "±" in d.summary() and "mean of 4 k-means seeds" in d.summary()
    one = diagnose_features(train, val, 3, n_init=1)
    assert one.purity_std is None and one.alpha_std is None
    assert set(one.to_dict()) == {"epoch", "purity", "gap", "alpha", "applied", "seconds"}  # as published
    assert "±" not in one.summary()


def test_relearner_repeats_is_keyword_only_and_checked():
    enc = {"a": nn.Linear(2, 2), "b": nn.Linear(2, 2)}
    positional = Relearner(enc, 2, 3.0, 1, 1)  # (encoders, n_clusters, lam, reinit_epoch, reinit_num) as before
    assert positional.repeats == 1 and positional.reinit_epoch == 1
    r = Relearner(enc, n_clusters=2, reinit_epoch=1, n_init=1, repeats=3, apply=False)
    g = torch.Generator().manual_seed(0)
    y = torch.arange(2).repeat_interleave(10)
    feats = {m: torch.randn(20, 3, generator=g) for m in enc}
    d = r.step(1, lambda split: (feats, y))
    assert d.repeats == 3 and set(d.purity_std) == {"a", "b"}
    assert d.purity == diagnose_features((feats, y), (feats, y), 2, n_init=1, repeats=3).purity
    with pytest.raises(ValueError, match="--diagnosis_repeats"):
        Relearner(enc, n_clusters=2, repeats=0)


# ---------------------------------------------------------------- strength
def test_relearn_strength_formula():
    assert relearn_strength(0.9, 0.7, 3.0) == pytest.approx(math.tanh(0.6))
    assert relearn_strength(0.7, 0.9, 3.0) == relearn_strength(0.9, 0.7, 3.0)
    assert relearn_strength(0.5, 0.5, 3.0) == 0.0
    assert relearn_strength(1.0, 0.0, 0.0) == 0.0
    with pytest.raises(ValueError, match="purity_train"):
        relearn_strength(1.2, 0.5, 3.0)
    with pytest.raises(ValueError, match="lam"):
        relearn_strength(0.5, 0.4, -1.0)


# ---------------------------------------------------------------- soft re-init
class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten())
        self.head = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        return self.head(self.encoder(x))


def trained_tiny():
    torch.manual_seed(0)
    model = Tiny()
    init = snapshot(model.encoder)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 1, 6, 6)).sum().backward()
        opt.step()
    return model, init


@pytest.mark.parametrize("alpha", [0.0, 1.0, 0.5])
def test_soft_reinit_exact(alpha):
    model, init = trained_tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    soft_reinit_(model.encoder, init, alpha)
    for name, p in model.encoder.named_parameters():
        expected = alpha * init[name] + (1 - alpha) * before[f"encoder.{name}"]
        assert torch.equal(p, expected), name
        if alpha == 0.0:
            assert torch.equal(p, before[f"encoder.{name}"])
        if alpha == 1.0:
            assert torch.equal(p, init[name])
    # BatchNorm running statistics and the head are untouched
    for name in ("encoder.1.running_mean", "encoder.1.running_var", "encoder.1.num_batches_tracked",
                 "head.weight", "head.bias"):
        assert torch.equal(model.state_dict()[name], before[name]), name


def test_soft_reinit_buffers_on_request_and_errors():
    torch.manual_seed(0)
    model = Tiny()
    init = snapshot(model.encoder, buffers=True)
    model.train()
    model(torch.randn(8, 1, 6, 6) * 3 + 2)  # moves the running statistics
    mean_now = model.encoder[1].running_mean.clone()
    count = model.encoder[1].num_batches_tracked.clone()
    soft_reinit_(model.encoder, init, 0.5, buffers=True)
    assert torch.equal(model.encoder[1].running_mean, 0.5 * init["1.running_mean"] + 0.5 * mean_now)
    assert torch.equal(model.encoder[1].num_batches_tracked, count)
    with pytest.raises(ValueError, match="alpha"):
        soft_reinit_(model.encoder, init, 1.5)
    with pytest.raises(KeyError, match="no entry"):
        soft_reinit_(model.head, init, 0.5)


# ---------------------------------------------------------------- the Relearner class
def test_relearner_schedule_matches_authors():
    r = Relearner({"a": nn.Linear(2, 2)}, n_clusters=2)  # defaults: every 20, at most 3
    assert [e for e in range(90) if r.due(e)] == [20, 40, 60, 80]  # due() alone ignores the count
    r.num_reinits = 3
    assert not r.due(80)
    assert not Relearner({"a": nn.Linear(2, 2)}, n_clusters=2, reinit_epoch=0).due(20)


def test_relearner_step_applies_each_modality_its_own_strength():
    torch.manual_seed(0)
    enc = {"strong": nn.Linear(4, 4), "weak": nn.Linear(4, 4)}
    r = Relearner(enc, n_clusters=2, lam=3.0, reinit_epoch=1, reinit_num=1)
    with torch.no_grad():  # "training" moves both encoders away from their init
        for e in enc.values():
            for p in e.parameters():
                p.add_(1.0)
    current = {m: {k: v.clone() for k, v in e.state_dict().items()} for m, e in enc.items()}
    y_train = torch.arange(2).repeat_interleave(20)
    y_val = torch.arange(2).repeat_interleave(10)
    g = torch.Generator().manual_seed(0)
    sep_train = torch.randn(40, 3, generator=g) * 0.1 + y_train[:, None] * 5.0  # separable on train
    noise_val = torch.randn(20, 3, generator=g)  # not separable on val
    noise_train = torch.randn(40, 3, generator=g)

    def extract(split):
        if split == "train":
            return {"strong": sep_train, "weak": noise_train}, y_train
        return {"strong": noise_val, "weak": noise_val}, y_val

    assert r.step(0, extract) is None
    d = r.step(1, extract)
    assert d is not None and d.applied and r.num_reinits == 1 and r.history == [d]
    assert d.purity["strong"]["train"] == 1.0
    for m in enc:
        gap = abs(d.purity[m]["train"] - d.purity[m]["val"])
        assert d.gap[m] == pytest.approx(gap)
        assert d.alpha[m] == pytest.approx(relearn_strength(d.purity[m]["train"], d.purity[m]["val"], 3.0))
        for k, p in enc[m].named_parameters():
            a = d.alpha[m]
            assert torch.allclose(p, a * r.init_states[m][k] + (1 - a) * current[m][k], atol=1e-6)
    assert d.alpha["strong"] > d.alpha["weak"]
    assert r.step(2, extract) is None  # reinit_num = 1 reached

    fresh = Relearner({m: nn.Linear(4, 4) for m in enc}, n_clusters=2, reinit_epoch=1, reinit_num=1)
    fresh.load_state_dict(r.state_dict())
    assert fresh.num_reinits == 1 and fresh.history[0].alpha == d.alpha
    assert torch.equal(fresh.init_states["weak"]["weight"], r.init_states["weak"]["weight"])


def test_relearner_reports_missing_modality_features():
    r = Relearner({"a": nn.Linear(2, 2), "b": nn.Linear(2, 2)}, n_clusters=2, reinit_epoch=1)
    y = torch.tensor([0, 1, 0, 1])
    with pytest.raises(KeyError, match="no features for modality 'b'"):
        r.step(1, lambda split: ({"a": torch.randn(4, 2)}, y))


def test_strength_rule_sees_every_modality_and_reinit_rule_is_swappable():
    """The rules are arguments: a strength that compares modalities, a re-init of some layers."""
    torch.manual_seed(0)
    enc = {"a": nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), "b": nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))}
    seen = []

    def relative(purity):  # strength from the gap relative to the largest gap (compares modalities)
        seen.append({m: dict(p) for m, p in purity.items()})
        gaps = {m: abs(p["train"] - p["val"]) for m, p in purity.items()}
        top = max(gaps.values()) or 1.0
        return {m: 0.5 * g / top for m, g in gaps.items()}

    def last_layer_only(module, init_state, alpha, *, buffers=False):
        soft_reinit_(module[1], {k[2:]: v for k, v in init_state.items() if k.startswith("1.")}, alpha)

    r = Relearner(enc, n_clusters=2, reinit_epoch=1, strength=relative, reinit=last_layer_only)
    with torch.no_grad():
        for e in enc.values():
            for p in e.parameters():
                p.add_(1.0)
    moved = {m: {k: v.clone() for k, v in e.state_dict().items()} for m, e in enc.items()}
    y = torch.arange(2).repeat_interleave(10)
    g = torch.Generator().manual_seed(0)
    feats = {"a": y[:, None] * 5.0 + 0.1 * torch.randn(20, 3, generator=g), "b": torch.randn(20, 3, generator=g)}
    d = r.step(1, lambda split: (feats if split == "train" else {"a": torch.randn(20, 3, generator=g),
                                                                  "b": torch.randn(20, 3, generator=g)}, y))
    assert len(seen) == 1 and set(seen[0]) == {"a", "b"}  # one call with every modality's purities
    assert max(d.alpha.values()) == pytest.approx(0.5)
    for m, e in enc.items():
        a = d.alpha[m]
        state = e.state_dict()
        assert torch.equal(state["0.weight"], moved[m]["0.weight"])  # the first layer is left alone
        assert torch.allclose(state["1.weight"], a * r.init_states[m]["1.weight"] + (1 - a) * moved[m]["1.weight"])
    # The default rule is the paper's, for every modality at once.
    purity = {"a": {"train": 0.9, "val": 0.6}, "b": {"train": 0.5, "val": 0.45}}
    assert TanhGap(3.0)(purity) == gap_strengths(purity, 3.0)
    assert gap_strengths(purity, 3.0) == {m: relearn_strength(p["train"], p["val"], 3.0) for m, p in purity.items()}
    with pytest.raises(ValueError, match="--move_lambda"):
        TanhGap(-1.0)
    with pytest.raises(KeyError, match="strength rule returned"):
        Relearner(enc, n_clusters=2, reinit_epoch=1, strength=lambda p: {"a": 0.1}).diagnose(
            (feats, y), (feats, y))
