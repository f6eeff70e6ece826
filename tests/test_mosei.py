"""CMU-MOSEI through the CMU-MOSI loader, and both read as the field's readers read them: the
three file families told apart, MultiBench's drop of all-zero texts, each family's binary rule,
NaN labels named, the SDK's seven label columns; a 2-epoch run on --dataset mosei."""
import json
import pickle
import sys

import numpy as np
import pytest

from conftest import CODE
from dnr.data.mosei import MOSEI
from dnr.data.mosi import MOSI, detect_format, load_features, map_labels

sys.path.insert(0, str(CODE))
import main as trainer  # noqa: E402

SIZES = {"train": 20, "valid": 10, "test": 10}
SCORES = np.array([-2.2, 0.0, 1.4, -0.6, 0.0, 2.0, 0.8, -1.0, 0.3, -3.0])  # two zeros in every ten


def cmu_dict(audio=74, vision=35, t=6, blank=(3,), seed=0, ids="mult", label_columns=1):
    """A file of the MulT / MultiBench key layout: left-padded GloVe-like text, labels (N, 1, 1),
    the samples in `blank` with an all-zero text (the reason for MultiBench's drop_entry)."""
    rng = np.random.default_rng(seed)
    data = {}
    for split, n in SIZES.items():
        d = {}
        for key, dim in (("text", 12), ("audio", audio), ("vision", vision)):
            x = rng.normal(size=(n, t, dim))
            for i, start in enumerate(rng.integers(0, t - 1, size=n)):
                x[i, :start] = 0  # left padding
            d[key] = x
        for i in blank:
            d["text"][i] = 0
        d["audio"][0, -1, 0] = -np.inf
        scores = np.resize(SCORES, n)
        if label_columns == 1:
            d["labels"] = scores.reshape(n, 1, 1)
        else:
            emotions = rng.uniform(0, 3, size=(n, 1, label_columns - 1))
            d["labels"] = np.concatenate([scores.reshape(n, 1, 1), emotions], axis=2)
        if ids == "mult":
            d["id"] = np.array([[f"v{i}".encode(), b"0", b"1"] for i in range(n)])
        else:
            d["id"] = [f"video{i}[{i % 3}]" for i in range(n)]
        data[split] = d
    return data


def write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=4))
    return path


def test_families_are_told_by_name_sizes_and_ids(tmp_path):
    mult = cmu_dict()
    assert detect_format(mult, str(tmp_path / "mosei_senti_data_noalign.pkl"), MOSEI) == ("mult", "its file name")
    assert detect_format(mult, "x.pkl", MOSEI) == ("mult", "its audio / vision feature sizes 74 / 35")
    # The same sizes are MultiBench's raw MOSI file: only the dataset tells them apart.
    assert detect_format(cmu_dict(ids="multibench"), "x.pkl", MOSI)[0] == "multibench"
    assert detect_format(cmu_dict(vision=713), "x.pkl", MOSEI)[0] == "multibench"
    assert detect_format(cmu_dict(audio=5, vision=20), "x.pkl", MOSI)[0] == "mult"
    family, how = detect_format(cmu_dict(audio=4, vision=7), "x.pkl", MOSEI)
    assert family == "mult" and "ids" in how
    family, how = detect_format(cmu_dict(audio=4, vision=7, ids="multibench"), "x.pkl", MOSEI)
    assert family == "multibench" and "ids" in how
    plain = cmu_dict(audio=4, vision=7)
    for split in plain.values():
        del split["id"]
    family, how = detect_format(plain, "x.pkl", MOSEI)
    assert family == "multibench" and "--mosei_format mult" in how
    assert detect_format(plain, "x.pkl", MOSEI, "mult") == ("mult", "--mosei_format")
    with pytest.raises(ValueError, match="--mosei_format mmsa: split 'train' has keys"):
        detect_format(plain, "x.pkl", MOSEI, "mmsa")
    with pytest.raises(ValueError, match="not a CMU-MOSEI feature file.*MulT"):
        detect_format({"train": {"x": 1}, "valid": {"x": 1}, "test": {"x": 1}}, "f.pkl", MOSEI)


def test_multibench_rules_drop_empty_text_and_exclude_zeros_from_evaluation(tmp_path):
    path = write(tmp_path / "mosei_raw.pkl", cmu_dict(vision=713, blank=(3, 7)))
    loaded = load_features(path, MOSEI, normalize=False)
    assert (loaded.format, loaded.zero, loaded.empty_text) == ("multibench", "exclude_eval", "drop")
    assert loaded.empty == {"train": 2, "valid": 2, "test": 2}
    s = loaded.splits
    # train: 20 - 2 empty texts, zeros kept as negatives; val / test: 10 - 2 empty - 2 zeros
    assert (len(s["train"]), len(s["val"]), len(s["test"])) == (18, 6, 6)
    train_scores = np.delete(np.resize(SCORES, 20), [3, 7])
    assert s["train"].labels.tolist() == (train_scores > 0).astype(int).tolist()
    assert (s["val"].scores != 0).all() and (s["test"].scores != 0).all()
    assert s["train"].info.name == "mosei" and s["train"].info.spec("visual").shape == (6, 713)
    kept = load_features(path, MOSEI, empty_text="keep", zero="positive", normalize=False)
    assert kept.empty_text == "keep" and len(kept.splits["train"]) == 20 and len(kept.splits["val"]) == 10
    assert kept.splits["train"].labels.tolist() == (np.resize(SCORES, 20) >= 0).astype(int).tolist()


def test_mult_files_keep_empty_text_and_are_named_as_what_they_are(tmp_path, capsys):
    folder = tmp_path / "mosi"
    write(folder / "mosi_data.pkl", cmu_dict(audio=5, vision=20))
    out = tmp_path / "run"
    rc = trainer.cli(["--dataset", "mosi", "--data_path", str(folder), "--ckpt_path", str(out), "--epochs", "1",
                      "--method", "baseline", "--batch_size", "8", "--progress", "off", "--no-probe",
                      "--encoders", "text=mean_mlp,audio=mean_mlp,visual=mean_mlp"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "is a CMU / MulT seq_length_50 (mosi_data.pkl / mosi_data_noalign.pkl) file (told by its file name" \
        in printed and "MultiBench (" not in printed
    assert ("binary rule: score > 0 positive, score <= 0 negative in training; score 0 left out of val and test "
            "(the default for this file, as MulT's eval_mosei_senti") in printed
    assert "samples with an all-zero text: 3 (train 1, valid 1, test 1), kept" in printed
    assert "train / val / test 20 / 8 / 8 samples (1,284 / 229 / 686 published" in printed


def test_nan_labels_name_the_file_and_split_and_emotion_columns_are_read(tmp_path):
    bad = cmu_dict()
    bad["valid"]["labels"][4, 0, 0] = np.nan
    path = write(tmp_path / "mosei_senti_data.pkl", bad)
    with pytest.raises(ValueError, match=r"mosei_senti_data.pkl, split 'valid': 1 sentiment labels are not finite "
                                         r"\(NaN or inf\), e.g. sample 4"):
        load_features(path, MOSEI)
    with pytest.raises(ValueError, match="labels: 1 sentiment labels are not finite"):
        map_labels(np.array([0.5, np.nan]), "binary", "positive")
    seven = load_features(write(tmp_path / "sdk.pkl", cmu_dict(label_columns=7)), MOSEI, task="7class",
                          normalize=False)
    assert any("the first, sentiment, is used" in n for n in seven.notes)
    assert seven.splits["test"].labels.tolist() == (np.clip(np.round(SCORES), -3, 3) + 3).astype(int).tolist()
    wrong = cmu_dict()
    wrong["train"]["labels"] = np.zeros((20, 2))
    with pytest.raises(ValueError, match=r"'labels' has shape \(20, 2\); expected one sentiment score per sample"):
        load_features(write(tmp_path / "w.pkl", wrong), MOSEI)


def test_mosei_two_epochs_end_to_end(tmp_path, capsys):
    folder = tmp_path / "mosei"
    write(folder / "mosei_senti_data.pkl", cmu_dict())
    out = tmp_path / "run"
    rc = trainer.cli(["--dataset", "mosei", "--data_path", str(folder), "--ckpt_path", str(out), "--epochs", "2",
                      "--method", "baseline", "--batch_size", "8", "--progress", "off", "--mosei_task", "7class",
                      "--transformer_dim", "16", "--transformer_heads", "2", "--transformer_layers", "1"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "CMU-MOSEI: " in printed and "7class: scores rounded" in printed
    res = json.loads((out / "results.json").read_text())
    assert res["dataset"] == "mosei" and res["num_classes"] == 7 and res["modalities"] == ["text", "audio", "visual"]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(0.0 <= r["test"]["acc"] <= 1.0 for r in log)
    args = json.loads((out / "args.json").read_text())
    assert args["mosei_task"] == "7class" and [m["shape"] for m in args["data"]["modalities"]] == [
        [6, 12], [6, 74], [6, 35]]


def test_missing_and_broken_mosei_files_are_named(tmp_path, capsys):
    from dnr.data.mosi import resolve_file

    folder = tmp_path / "mosei"
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match=r"holds no \.pkl file; name the feature file with --mosei_file "
                                                r"\(e.g. aligned_50.pkl or .*mosei_senti_data.pkl"):
        resolve_file(str(folder), None, MOSEI)
    with pytest.raises(FileNotFoundError, match="--mosei_file: no file"):
        resolve_file(str(folder), "mosei_raw.pkl", MOSEI)
    data = pickle.dumps(cmu_dict(), protocol=4)
    (folder / "mosei_senti_data.pkl").write_bytes(data[: len(data) // 2])  # an interrupted download
    rc = trainer.cli(["--dataset", "mosei", "--data_path", str(folder), "--ckpt_path", str(tmp_path / "run"),
                      "--epochs", "1", "--method", "baseline", "--progress", "off"])
    assert rc == 1 and "mosei_senti_data.pkl: not a readable pickle" in capsys.readouterr().err
