"""CMU-MOSI from feature files: both formats (tiny files written here), label mapping, padding and
normalisation, the restricted unpickler, the sequence encoders, and the trainer end to end with a
D&R diagnosis of all three modalities."""
import json
import pickle
import sys

import numpy as np
import pytest
import torch

from conftest import CODE
from dnr.data import ModalitySpec, DatasetInfo
from dnr.data.mosi import detect_format, load_features, map_labels, resolve_file
from dnr.data.safe_pickle import UnsafePickleError, safe_load
from dnr.diagnose import relearn_strength
from dnr.metrics import classification_metrics
from dnr.models import ENCODERS, create_encoder, create_model, default_encoder
from dnr.models.sequence import masked_mean, padding_mask, pool_time

sys.path.insert(0, str(CODE))
import main as trainer  # noqa: E402

SIZES = {"train": 24, "valid": 12, "test": 12}
# Scores with the cases that matter: 0, halves (numpy rounds them to even), beyond +-3.
SCORES = np.array([-3.4, -2.6, -1.2, -0.5, 0.0, 0.4, 0.5, 1.5, 2.5, 3.2, -0.2, 1.8])
DIMS = {"text": 12, "audio": 5, "vision": 6}


def _scores(n):
    return np.resize(SCORES, n).astype(np.float32)


def mmsa_dict(aligned=True, t=8, seed=0):
    """An MMSA-style dict: BERT-like text with token ids, right-padded audio/vision with lengths
    (junk beyond the lengths, which the loader must zero), one -inf in the audio."""
    rng = np.random.default_rng(seed)
    t_a, t_v = (t, t) if aligned else (t + 4, t + 2)
    data = {}
    for split, n in SIZES.items():
        text_len = rng.integers(2, t + 1, size=n)
        tokens = np.zeros((n, 3, t), dtype=np.int64)
        for i, length in enumerate(text_len):
            tokens[i, 0, :length] = rng.integers(100, 2000, size=length)
            tokens[i, 1, :length] = 1
        d = {
            "text": rng.normal(size=(n, t, DIMS["text"])).astype(np.float32),  # padding not zero, as BERT's
            "text_bert": tokens,
            "audio": rng.normal(2.0, 3.0, size=(n, t_a, DIMS["audio"])).astype(np.float32),
            "vision": rng.normal(-1.0, 0.5, size=(n, t_v, DIMS["vision"])).astype(np.float32),
            "audio_lengths": list(rng.integers(1, t_a + 1, size=n)),
            "vision_lengths": rng.integers(0, t_v + 1, size=n),
            "regression_labels": _scores(n),
            "classification_labels": np.sign(_scores(n)).astype(np.float32) + 1,
            "id": np.array([f"{split}_{i}" for i in range(n)]),
            "raw_text": [f"utterance {i}" for i in range(n)],
            "annotations": np.array(["Positive"] * n, dtype=object),
        }
        d["audio"][0, 0, 0] = -np.inf
        data[split] = d
    return data


def multibench_dict(t=8, seed=1):
    """A MultiBench-style dict: left-padded with zeros, labels (N, 1, 1), no lengths."""
    rng = np.random.default_rng(seed)
    data = {}
    for split, n in SIZES.items():
        d = {}
        for key, dim in (("text", 10), ("audio", 4), ("vision", 7)):
            x = rng.normal(size=(n, t, dim))
            for i, start in enumerate(rng.integers(0, t, size=n)):
                x[i, :start] = 0
            d[key] = x  # float64, as MultiBench's files
        d["labels"] = _scores(n).reshape(n, 1, 1)
        d["id"] = np.array([[f"{split}{i}".encode(), b"0"] for i in range(n)])
        data[split] = d
    return data


def write(path, obj, protocol=4):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


# ---------------------------------------------------------------------------------------------
# labels

def test_label_mapping_binary_zero_rules_and_seven_classes():
    s = np.array([-3.4, -2.6, -0.5, 0.0, 0.4, 0.5, 1.5, 2.5, 3.2])
    ids, kept, classes = map_labels(s, "binary", "positive")
    assert classes == ("negative", "positive")
    assert ids.tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 1] and kept.all()
    ids, kept, _ = map_labels(s, "binary", "negative")
    assert ids.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1] and kept.all()
    ids, kept, _ = map_labels(s, "binary", "exclude")
    assert kept.tolist() == [True, True, True, False, True, True, True, True, True]
    assert ids.tolist() == [0, 0, 0, -1, 1, 1, 1, 1, 1]
    ids, kept, classes = map_labels(s, "7class", "positive")
    assert classes == ("-3", "-2", "-1", "0", "1", "2", "3")
    # round half to even (-0.5 -> 0, 0.5 -> 0, 1.5 -> 2, 2.5 -> 2), then clip to [-3, 3]
    assert ids.tolist() == [0, 0, 3, 3, 3, 3, 5, 5, 6] and kept.all()
    with pytest.raises(ValueError, match="not finite"):
        map_labels(np.array([0.1, np.nan]), "binary", "positive")


# ---------------------------------------------------------------------------------------------
# loading both formats

def test_mmsa_aligned_file_shapes_labels_and_padding(tmp_path):
    raw = mmsa_dict(aligned=True)
    path = write(tmp_path / "aligned_50.pkl", raw)
    loaded = load_features(path, normalize=False)
    splits, notes = loaded.splits, loaded.notes
    assert loaded.format == "mmsa"
    info = splits["train"].info
    assert info.modality_names == ["text", "audio", "visual"]
    assert [(s.kind, s.shape) for s in info.modalities] == [("sequence", (8, 12)), ("sequence", (8, 5)),
                                                            ("sequence", (8, 6))]
    assert {s: len(ds) for s, ds in splits.items()} == {"train": 24, "val": 12, "test": 12}
    train = splits["train"]
    assert train.labels.tolist() == (_scores(24) >= 0).astype(int).tolist()
    item = train[1]
    assert set(item["inputs"]) == {"text", "audio", "visual"} and item["index"] == 1
    # text: steps outside the BERT attention mask are zeroed, the others kept
    mask = raw["train"]["text_bert"][:, 1].astype(bool)
    text = train.data["text"].numpy()
    assert (text[~mask] == 0).all()
    assert np.array_equal(text[mask], raw["train"]["text"][mask])
    # audio / vision: steps at or beyond the length are zeroed (vision has length-0 samples)
    for ours, key in (("audio", "audio"), ("visual", "vision")):
        lengths = np.asarray(raw["train"][f"{key}_lengths"])
        x = train.data[ours].numpy()
        beyond = np.arange(8)[None] >= lengths[:, None]
        assert beyond.any() and (~beyond).any()
        expected = np.where(np.isfinite(raw["train"][key]), raw["train"][key], 0)
        expected[beyond] = 0
        assert np.array_equal(x, expected)
    assert train.data["audio"][0, 0, 0] == 0  # the -inf
    assert any("non-finite" in n and "'audio'" in n for n in notes)


def test_mmsa_unaligned_and_multibench_formats_are_detected(tmp_path):
    loaded = load_features(write(tmp_path / "unaligned_50.pkl", mmsa_dict(aligned=False)), task="7class",
                           normalize=False)
    splits = loaded.splits
    assert loaded.format == "mmsa"
    assert [s.shape for s in splits["val"].info.modalities] == [(8, 12), (12, 5), (10, 6)]
    assert splits["val"].info.num_classes == 7
    assert splits["test"].labels.tolist() == [0, 0, 2, 3, 3, 3, 3, 5, 5, 6, 3, 5]

    raw = multibench_dict()
    loaded = load_features(write(tmp_path / "mosi_raw.pkl", raw, protocol=2), zero="exclude", normalize=False)
    splits = loaded.splits
    assert (loaded.format, loaded.format_how) == ("multibench", "its file name")
    assert [s.shape for s in splits["train"].info.modalities] == [(8, 10), (8, 4), (8, 7)]
    # zero-scored samples (one in every 12) are dropped from every split
    assert {s: len(ds) for s, ds in splits.items()} == {"train": 22, "val": 11, "test": 11}
    keep = _scores(24) != 0
    assert splits["train"].labels.tolist() == (_scores(24)[keep] > 0).astype(int).tolist()
    assert torch.equal(splits["train"].data["visual"], torch.from_numpy(raw["train"]["vision"][keep]).float())
    assert splits["train"].data["text"].dtype == torch.float32


def test_normalisation_uses_training_statistics_and_keeps_padding_zero(tmp_path):
    path = write(tmp_path / "aligned_50.pkl", mmsa_dict())
    plain = load_features(path, normalize=False).splits
    normed = load_features(path, normalize=True).splits
    for m in ("text", "audio", "visual"):
        x, raw_x = normed["train"].data[m], plain["train"].data[m]
        pad = (raw_x == 0).all(-1)
        assert (x[pad] == 0).all()
        real = x[~pad].double()
        assert torch.allclose(real.mean(0), torch.zeros(real.shape[1], dtype=torch.double), atol=1e-5)
        assert torch.allclose(real.std(0, unbiased=False), torch.ones(real.shape[1], dtype=torch.double), atol=1e-4)
        # val is scaled with the training split's statistics, not its own
        raw_real = raw_x[~pad].double()
        mean, std = raw_real.mean(0), raw_real.std(0, unbiased=False)
        v, raw_v = normed["val"].data[m], plain["val"].data[m]
        vpad = (raw_v == 0).all(-1)
        assert torch.allclose(v[~vpad].double(), (raw_v[~vpad].double() - mean) / std, atol=1e-4)


def test_unknown_files_and_keys_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="not a CMU-MOSI feature file.*MultiBench"):
        detect_format({"train": {"x": 1}, "valid": {"x": 1}, "test": {"x": 1}}, "f.pkl")
    with pytest.raises(ValueError, match=r"split\(s\) \['test'\] missing"):
        detect_format({"train": {}, "valid": {}}, "f.pkl")
    with pytest.raises(ValueError, match="holds a list"):
        detect_format([1, 2], "f.pkl")
    junk = tmp_path / "junk.pkl"
    junk.write_bytes(b"PK\x03\x04 this is a zip, not a pickle")
    with pytest.raises(ValueError, match="junk.pkl: not a readable pickle"):
        load_features(junk)
    path = write(tmp_path / "aligned_50.pkl", mmsa_dict())
    with pytest.raises(ValueError, match="token ids"):
        load_features(path, text_key="text_bert")
    with pytest.raises(KeyError, match="no key 'glove'"):
        load_features(path, text_key="glove")
    bad = mmsa_dict()
    bad["valid"]["vision"] = bad["valid"]["vision"][:5]
    with pytest.raises(ValueError, match="'vision' has 5 samples but there are 12 labels"):
        load_features(write(tmp_path / "bad" / "x.pkl", bad))
    # file resolution: a folder with two pickles needs --mosi_file
    two = tmp_path / "two"
    write(two / "aligned_50.pkl", {})
    write(two / "unaligned_50.pkl", {})
    with pytest.raises(FileNotFoundError, match=r"2 \.pkl files \(aligned_50.pkl, unaligned_50.pkl\).*--mosi_file"):
        resolve_file(str(two), None)
    assert resolve_file(str(two), "unaligned_50.pkl") == two / "unaligned_50.pkl"
    with pytest.raises(FileNotFoundError, match="--mosi_file: no file"):
        resolve_file(str(two), "mosi_raw.pkl")
    with pytest.raises(ValueError, match="needs --data_path"):
        resolve_file(None, None)


# ---------------------------------------------------------------------------------------------
# the restricted unpickler

class _Payload:
    """Unpickling this runs `exec`, which writes a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def test_pickle_carrying_a_callable_is_refused_and_never_runs(tmp_path, capsys):
    marker = tmp_path / "marker"
    evil = mmsa_dict()
    evil["train"]["raw_text"] = [_Payload(marker)]
    folder = tmp_path / "data"
    path = write(folder / "aligned_50.pkl", evil)
    with pytest.raises(UnsafePickleError, match="builtins.exec"):
        safe_load(path)
    assert not marker.exists()
    rc = trainer.cli(["--dataset", "mosi", "--data_path", str(folder), "--ckpt_path", str(tmp_path / "run"),
                      "--method", "baseline", "--epochs", "1", "--progress", "off"])
    assert rc == 1 and "refused to load" in capsys.readouterr().err
    assert not marker.exists()
    # Control: plain pickle does run it, so the refusal above is what protected us.
    pickle.loads(path.read_bytes())
    assert marker.read_text() == "ran"
    # A numpy function is a callable too, and refused by name.
    with pytest.raises(UnsafePickleError, match="numpy.load"):
        safe_load(write(tmp_path / "np.pkl", {"f": np.load}))


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_restricted_unpickler_loads_what_feature_files_hold(tmp_path, protocol):
    obj = {"f32": np.arange(6, dtype=np.float32).reshape(1, 2, 3), "f64": np.linspace(0, 1, 4),
           "i64": np.arange(3), "str": np.array(["ab", "c"]), "obj": np.array(["x", "yz"], dtype=object),
           "scalars": [np.float64(1.5), np.int64(3), 2, 2.5, True, None], "bytes": b"\x00\xff",
           "nested": {"t": (1, "a"), "fortran": np.asfortranarray(np.ones((2, 3)))}}
    back = safe_load(write(tmp_path / "ok.pkl", obj, protocol=protocol))
    for key in ("f32", "f64", "i64", "str", "obj"):
        assert back[key].dtype == obj[key].dtype and np.array_equal(back[key], obj[key])
    assert back["scalars"] == obj["scalars"] and back["bytes"] == obj["bytes"]
    assert back["nested"]["t"] == (1, "a") and np.array_equal(back["nested"]["fortran"], np.ones((2, 3)))


# ---------------------------------------------------------------------------------------------
# sequence encoders

SEQ = DatasetInfo("seq", ("neg", "pos"), (ModalitySpec("text", "sequence", (8, 12)),
                                         ModalitySpec("audio", "sequence", (8, 5)),
                                         ModalitySpec("visual", "sequence", (6, 6))))


def test_padding_mask_masked_mean_and_time_pooling():
    x = torch.zeros(2, 5, 3)
    x[0, 1] = 1.0
    x[0, 3, 2] = -2.0
    pad = padding_mask(x)
    # all-zero steps are padding; a sample with no real step keeps its first step
    assert pad.tolist() == [[True, False, True, False, True], [False, True, True, True, True]]
    assert torch.equal(masked_mean(x, pad)[0], (x[0, 1] + x[0, 3]) / 2)
    pooled, pooled_pad = pool_time(x, pad, 2)  # steps (0, 1) (2, 3) (4, added padding)
    assert pooled.shape == (2, 3, 3)
    assert pooled_pad.tolist() == [[False, False, True], [False, True, True]]
    assert torch.equal(pooled[0, 0], x[0, 1]) and torch.equal(pooled[0, 1], x[0, 3])  # padding not averaged in
    assert (pooled[0, 2] == 0).all()


@pytest.mark.parametrize("name", ["transformer", "mean_mlp"])
def test_sequence_encoders_shapes_gradients_and_padding(name):
    torch.manual_seed(0)
    spec = SEQ.modalities[0]
    opts = {"dim": 16, "layers": 2, "heads": 4, "dropout": 0.0} if name == "transformer" else {}
    enc = create_encoder(name, spec, **opts)
    x = torch.randn(4, 8, 12)
    x[0, 5:] = 0  # three padding steps
    x[3] = 0  # a sample with no real step at all
    out = enc(x)
    assert out.shape == (4, enc.out_dim) and torch.isfinite(out).all()
    out.pow(2).mean().backward()
    assert [n for n, p in enc.named_parameters() if p.grad is None] == []
    enc.eval()
    with torch.no_grad():
        full = enc(x)
        if name == "transformer":
            # Masked steps change nothing: the padded sample equals its first five steps alone.
            assert torch.allclose(full[0], enc(x[:1, :5])[0], atol=1e-5)
        changed = x.clone()
        changed[1, 2] += 1.0
        assert not torch.allclose(enc(changed)[1], full[1])


def test_transformer_flags_pooling_defaults_and_errors():
    assert default_encoder(SEQ.modalities[0]) == "transformer" and {"transformer", "mean_mlp"} <= set(ENCODERS)
    parser = trainer.get_args_parser()
    args = parser.parse_args(["--transformer_dim", "24", "--transformer_layers", "3", "--transformer_heads", "6",
                              "--transformer_dropout", "0.2", "--transformer_max_len", "3"])
    opts = ENCODERS["transformer"].options(args)
    assert opts == {"dim": 24, "layers": 3, "heads": 6, "dropout": 0.2, "max_len": 3}
    enc = create_encoder("transformer", SEQ.modalities[0], **opts)
    assert enc.out_dim == 24 and len(enc.encoder.layers) == 3 and enc.stride == 3 and enc.pos.shape == (1, 3, 24)
    assert enc(torch.randn(2, 8, 12)).shape == (2, 24)
    with pytest.raises(ValueError, match="--transformer_heads 5 must be >= 1 and divide --transformer_dim 24"):
        create_encoder("transformer", SEQ.modalities[0], dim=24, heads=5)
    with pytest.raises(ValueError, match="takes a sequence"):
        create_encoder("transformer", ModalitySpec("v", "vector", (8,)))
    model = create_model(SEQ, encoders={"audio": "mean_mlp"}, encoder_options={"transformer": {"dim": 16, "heads": 2}})
    assert model.encoder_names == {"text": "transformer", "audio": "mean_mlp", "visual": "transformer"}
    out = model({s.name: torch.randn(3, *s.shape) for s in SEQ.modalities})
    assert out.logits.shape == (3, 2) and out.features["text"].shape == (3, 16)


def test_weighted_f1_is_reported_next_to_macro_f1():
    labels = torch.tensor([0, 0, 0, 1])
    logits = torch.tensor([[1.0, 0], [1, 0], [0, 1], [0, 1]])  # predictions 0 0 1 1
    m = classification_metrics(logits, labels, 2)
    # class 0: P 1, R 2/3, F1 0.8 (support 3); class 1: P 1/2, R 1, F1 2/3 (support 1)
    assert m["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)
    assert m["f1_weighted"] == pytest.approx((3 * 0.8 + 2 / 3) / 4)
    assert {"acc", "macro_f1", "map"} <= set(m)


# ---------------------------------------------------------------------------------------------
# the trainer end to end

SMALL = ["--epochs", "3", "--reinit_epoch", "1", "--reinit_num", "1", "--progress", "off", "--batch_size", "8",
         "--transformer_dim", "16", "--transformer_heads", "2", "--transformer_layers", "1"]


@pytest.mark.parametrize("kind", ["mmsa-binary", "multibench-7class"])
def test_one_training_run_diagnoses_all_three_modalities(kind, tmp_path, capsys):
    folder = tmp_path / "mosi"
    if kind == "mmsa-binary":
        write(folder / "aligned_50.pkl", mmsa_dict())
        extra, classes = ["--encoders", "audio=mean_mlp"], 2
    else:
        write(folder / "mosi_raw.pkl", multibench_dict())
        extra, classes = ["--mosi_task", "7class", "--no-probe"], 7
    out = tmp_path / "run"
    rc = trainer.cli(["--dataset", "mosi", "--data_path", str(folder), "--ckpt_path", str(out)] + SMALL + extra)
    printed = capsys.readouterr().out
    assert rc == 0
    assert ("MMSA" if kind == "mmsa-binary" else "MultiBench") in printed
    assert "train / val / test 24 / 12 / 12 samples" in printed
    res = json.loads((out / "results.json").read_text())
    assert res["dataset"] == "mosi" and res["num_classes"] == classes
    assert res["modalities"] == ["text", "audio", "visual"]
    assert res["model_args"]["encoder_options"]["transformer"]["dim"] == 16
    assert [d["epoch"] for d in res["diagnoses"]] == [1]
    d = res["diagnoses"][0]
    assert set(d["purity"]) == set(d["alpha"]) == {"text", "audio", "visual"}
    for m in ("text", "audio", "visual"):
        p = d["purity"][m]
        # k-means with k = number of classes: purity is at least the majority class share
        assert 0.0 < p["val"] <= 1.0 and 0.0 < p["train"] <= 1.0
        assert d["alpha"][m] == pytest.approx(relearn_strength(p["train"], p["val"], 3.0))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert 0.0 <= log[0]["val"]["f1_weighted"] <= 1.0 and "diagnosis" in log[1]
    args = json.loads((out / "args.json").read_text())
    assert [m["shape"] for m in args["data"]["modalities"]] == ([[8, 12], [8, 5], [8, 6]] if kind == "mmsa-binary"
                                                                 else [[8, 10], [8, 4], [8, 7]])
