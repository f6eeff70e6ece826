"""Imbalance measures (dnr.imbalance): exact Shapley values, zeroed inputs, cost, and the whole
diagnosis of a model on tiny models with known answers."""
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from dnr.diagnose import relearn_strength
from dnr.imbalance import (
    diagnose_model,
    epoch_seconds,
    model_cost,
    modality_shapley,
    peak_memory,
    plot_model_diagnosis,
    shapley_values,
    subset_name,
    tsne_2d,
    zero_absent,
)
from dnr.models import ModelOutput


# ---------------------------------------------------------------- Shapley values
def test_shapley_values_of_games_with_known_answers():
    # two players, by hand: phi_a = (v(a) - v()) / 2 + (v(ab) - v(b)) / 2
    v = {frozenset(): 0.1, frozenset("a"): 0.5, frozenset("b"): 0.1, frozenset("ab"): 0.6}
    phi = shapley_values(v.__getitem__, ["a", "b"])
    assert phi == {"a": pytest.approx(0.45), "b": pytest.approx(0.05)}
    # additive game: each player's value is its own weight
    w = {"x": 0.2, "y": -0.1, "z": 0.5}
    assert shapley_values(lambda s: sum(w[p] for p in s), list(w)) == {p: pytest.approx(v) for p, v in w.items()}
    # majority of three: symmetric, 1/3 each; a dummy player (adds nothing anywhere) gets 0
    phi = shapley_values(lambda s: float(len(s & {"a", "b", "c"}) >= 2), ["a", "b", "c", "dummy"])
    assert phi == {"a": pytest.approx(1 / 3), "b": pytest.approx(1 / 3), "c": pytest.approx(1 / 3),
                   "dummy": pytest.approx(0.0)}
    calls = []
    shapley_values(lambda s: calls.append(s) or 0.0, ["a", "b", "c"])
    assert len(calls) == 8 and len(set(calls)) == 8  # each subset evaluated once
    with pytest.raises(ValueError, match="distinct players"):
        shapley_values(lambda s: 0.0, ["a", "a"])


def test_zero_absent_zeroes_only_absent_modalities_after_the_transform():
    inputs = {"a": torch.ones(2, 3), "b": torch.full((2, 4), 2.0)}
    out = zero_absent({"a"})(inputs, False)
    assert torch.equal(out["a"], inputs["a"]) and torch.equal(out["b"], torch.zeros(2, 4))
    doubled = zero_absent({"b"}, lambda x, train: {m: v * 2 for m, v in x.items()})(inputs, False)
    assert torch.equal(doubled["b"], torch.full((2, 4), 4.0)) and not doubled["a"].any()
    assert subset_name(frozenset({"b", "a"}), ["a", "b"]) == "a+b" and subset_name(frozenset(), ["a"]) == "none"


# ---------------------------------------------------------------- tiny models
class TinyNet(nn.Module):
    """One small MLP encoder per modality, a linear head on the concatenated features."""

    def __init__(self, dims, num_classes, hidden=16):
        super().__init__()
        self.encoders = nn.ModuleDict({m: nn.Sequential(nn.Linear(d, hidden), nn.ReLU()) for m, d in dims.items()})
        self.head = nn.Linear(hidden * len(dims), num_classes)

    def forward(self, inputs):
        feats = {m: enc(inputs[m]) for m, enc in self.encoders.items()}
        return ModelOutput(self.head(torch.cat(list(feats.values()), 1)), feats)


def make_split(n, k, g, centers, noise_dim=8):
    y = torch.randint(0, k, (n,), generator=g)
    return {"signal": centers[y] + 0.3 * torch.randn(n, centers.shape[1], generator=g),
            "noise": torch.randn(n, noise_dim, generator=g)}, y


def loader_of(inputs, labels, batch_size=64):
    rows = [{"inputs": {m: x[i] for m, x in inputs.items()}, "label": labels[i]} for i in range(len(labels))]
    return DataLoader(rows, batch_size=batch_size)  # no "index": a loader of one's own


def fit(model, inputs, labels, steps=200, lr=0.05):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(inputs).logits, labels).backward()
        opt.step()
    return model


@pytest.fixture(scope="module")
def signal_and_noise():
    """4 classes; 'signal' holds the class (separated centres), 'noise' no label information."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    k = 4
    centers = torch.randn(k, 6, generator=g) * 3
    splits = {s: make_split(n, k, g, centers) for s, n in (("train", 240), ("val", 160), ("test", 160))}
    model = fit(TinyNet({"signal": 6, "noise": 8}, k), *splits["train"])
    return model, splits, k


def test_diagnose_model_known_answers_informative_vs_uninformative(signal_and_noise):
    model, splits, k = signal_and_noise
    model.train()
    loaders = {s: loader_of(*xy) for s, xy in splits.items()}
    rep = diagnose_model(model, loaders, k, repeats=3, n_init=1)
    assert model.training  # left in the mode it came in
    assert rep.acc > 0.9 and rep.eval_split == "test"
    # no label information: purity near chance (largest class share ~0.3) on every split, no gap,
    # and the prediction does not rest on it
    for split in ("train", "val", "test"):
        assert rep.purity["noise"][split] < 0.45, split
        assert rep.purity["signal"][split] > 0.9, split
    assert rep.diagnosis.gap["noise"] < 0.1
    assert abs(rep.shapley["noise"]) < 0.05
    assert rep.shapley["signal"] > 0.5
    # Shapley's efficiency: the contributions add up to acc(all) - acc(none)
    assert sum(rep.shapley.values()) == pytest.approx(rep.subset_acc["signal+noise"] - rep.subset_acc["none"])
    assert rep.subset_acc["signal+noise"] == pytest.approx(rep.acc)
    assert rep.probe_acc["signal"] > 0.9 and rep.probe_acc["noise"] < 0.45
    assert rep.unimodal_acc == {}  # this model has no per-modality logits
    for m in ("signal", "noise"):
        p = rep.purity[m]
        assert rep.diagnosis.alpha[m] == pytest.approx(relearn_strength(p["train"], p["val"], 3.0))
    d = rep.to_dict()
    assert d["samples"] == {"train": 240, "val": 160, "test": 160} and d["kmeans"]["repeats"] == 3
    assert set(d["purity_std"]["noise"]) == {"train", "val", "test"} and d["strength_std"]["noise"] >= 0.0
    assert rep.modalities == ["signal", "noise"]  # the model's order
    assert rep.summary().index("signal:") < rep.summary().index("noise:")


def test_diagnose_model_memorised_modality_has_a_large_gap():
    """An encoder that memorised the training split (labels fitted on pure noise inputs) separates
    train by class and val not at all: a large purity gap and a strong re-learning strength."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    k, dim = 3, 64
    splits = {s: ({"memo": torch.randn(n, dim, generator=g)}, torch.randint(0, k, (n,), generator=g))
              for s, n in (("train", 90), ("val", 90))}
    model = fit(TinyNet({"memo": dim}, k, hidden=32), *splits["train"], steps=300, lr=0.01)
    assert (model(splits["train"][0]).logits.argmax(1) == splits["train"][1]).float().mean() == 1.0
    rep = diagnose_model(model, {s: loader_of(*xy) for s, xy in splits.items()}, k, repeats=3, probe=False)
    assert rep.eval_split == "val" and rep.probe_acc == {}
    assert rep.purity["memo"]["train"] > 0.8 and rep.purity["memo"]["val"] < 0.5
    assert rep.diagnosis.gap["memo"] > 0.4 and rep.diagnosis.alpha["memo"] > 0.8


def test_diagnose_model_needs_train_and_val(signal_and_noise):
    model, splits, k = signal_and_noise
    with pytest.raises(ValueError, match="needs a 'val' loader"):
        diagnose_model(model, {"train": loader_of(*splits["train"])}, k)


def test_modality_shapley_with_three_modalities_matches_the_formula():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    n, k = 60, 3
    y = torch.randint(0, k, (n,), generator=g)
    inputs = {m: torch.randn(n, 5, generator=g) + (y[:, None] if m != "c" else 0) for m in "abc"}
    model = TinyNet({m: 5 for m in "abc"}, k)
    phi, subsets = modality_shapley(model, loader_of(inputs, y, batch_size=16), "cpu", list("abc"))
    assert len(subsets) == 8 and list(subsets)[0] == "none" and list(subsets)[-1] == "a+b+c"

    def acc(present):  # by hand: the model on inputs with the absent ones zeroed
        x = {m: v if m in present else torch.zeros_like(v) for m, v in inputs.items()}
        with torch.no_grad():
            return float((model(x).logits.argmax(1) == y).float().mean())

    w = {0: 1 / 3, 1: 1 / 6, 2: 1 / 3}  # |S|! (M - |S| - 1)! / M! for M = 3
    for m in "abc":
        others = [o for o in "abc" if o != m]
        expected = sum(w[len(s)] * (acc(set(s) | {m}) - acc(set(s)))
                       for r in range(3) for s in __import__("itertools").combinations(others, r))
        assert phi[m] == pytest.approx(expected, abs=1e-6)
    assert subsets["a+c"] == pytest.approx(acc({"a", "c"}))


# ---------------------------------------------------------------- cost
def test_model_cost_counts_parameters_and_matmul_flops():
    class Lin(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(10, 5)

        def forward(self, inputs):
            return self.fc(inputs["x"])

    net = Lin().train()
    cost = model_cost(net, {"x": torch.randn(4, 10)})
    assert cost["parameters"] == 10 * 5 + 5
    assert cost["flops_per_sample"] == 2 * 10 * 5  # one (1, 10) @ (10, 5) product per sample, multiply-add = 2
    assert net.training  # mode restored
    mem = peak_memory("cpu")
    assert mem["kind"] == "cpu_peak_rss" and mem["mb"] > 10  # at least the interpreter and torch
    recs = [{"seconds": 3.0, "train": {"seconds": 2.0}}, {"seconds": 5.0, "train": {"seconds": 2.5}}]
    assert epoch_seconds(recs) == {"seconds_per_epoch": 4.0, "train_seconds_per_epoch": 2.25}
    assert epoch_seconds([])["seconds_per_epoch"] is None


# ---------------------------------------------------------------- figure
def test_tsne_and_the_figure(signal_and_noise, tmp_path):
    model, splits, k = signal_and_noise
    coords, y = tsne_2d(splits["train"][0]["signal"], splits["train"][1], max_samples=50, seed=0)
    assert coords.shape == (50, 2) and y.shape == (50,) and np.isfinite(coords).all()
    # the informative modality's classes stay apart in the picture: each point's nearest neighbour
    # is mostly of its own class
    dist = ((coords[:, None] - coords[None]) ** 2).sum(-1) + np.eye(50) * 1e9
    assert (y[dist.argmin(1)] == y).mean() > 0.9
    rep = diagnose_model(model, {s: loader_of(*xy) for s, xy in splits.items()}, k, repeats=2, n_init=1, probe=False)
    plot_model_diagnosis(rep, tmp_path / "d.png", tsne_samples=30, class_names=list("wxyz"), title="tiny")
    assert (tmp_path / "d.png").stat().st_size > 20_000
    assert math.isfinite(rep.diagnosis.alpha_std["signal"])


# ---------------------------------------------------------------- the README's example
def test_readme_diagnose_your_own_model_runs_as_it_stands(root, tmp_path, monkeypatch, capsys):
    import json
    import re

    section = (root / "README.md").read_text().split("### Diagnose your own model", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "README.md (Diagnose your own model)", "exec"), {"__name__": "readme"})
    d = json.loads((tmp_path / "diagnosis.json").read_text())
    assert (tmp_path / "diagnosis.png").stat().st_size > 20_000
    assert d["kmeans"]["repeats"] == 10 and d["modalities"] == ["audio", "video"]
    assert sum(d["shapley"].values()) == pytest.approx(d["subset_acc"]["audio+video"] - d["subset_acc"]["none"])
    # the example's data: only the audio carries the class (4 classes, chance 0.25)
    assert d["probe_acc"]["audio"] > 0.55 and d["probe_acc"]["video"] < 0.45
    assert d["purity"]["audio"]["train"] > d["purity"]["video"]["train"] + 0.1
    assert "audio: purity train" in capsys.readouterr().out
