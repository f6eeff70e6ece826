"""UPMC Food-101 on a handful of rows in the distributed layout (images/{train,test}/<class>/*.jpg,
texts/{train,test}_titles.csv with and without a header, quoted titles, an empty title), with a
missing, a corrupt and a truncated image: prepare, vocabulary, load, two epochs."""
import contextlib
import io
import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from dnr.data import build_datasets
from dnr.data.food101 import read_titles
from dnr.data.prepare import UsageError, main as prepare
from dnr.data.text import build_vocabulary, encode, tokenize

from test_data_real import load_args, snapshot, trainer

CLASSES = ("apple_pie", "ramen", "sushi")
COLOURS = {"apple_pie": (200, 150, 60), "ramen": (230, 220, 180), "sushi": (40, 40, 40)}


def title(c, k, split):
    # every title has words of its class, one word of its own (to see which split's words the
    # vocabulary holds), and some punctuation
    return "" if (c, k, split) == ("ramen", 2, "train") else \
        f"{c.replace('_', ' ').title()} Recipe, easy #{k} {split}{c[:3]}{k}only"


def write_image(path, colour, size=(40, 30), corrupt=False, truncate=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    if corrupt:
        path.write_bytes(b"\xff\xd8 not a jpeg at all" * 20)
        return
    rng = np.random.default_rng(sum(colour))
    pixels = np.clip(np.array(colour) + rng.normal(0, 10, size=(size[1], size[0], 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG", quality=90)
    if truncate:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("food") / "UPMC_Food101"
    rows = {"train": [], "test": []}
    for split, n in (("train", 6), ("test", 2)):
        for c in CLASSES:
            for k in range(n):
                name = f"{c}_{k}.jpg"
                rows[split].append((name, title(c, k, split), c))
                if (split, c, k) == ("train", "sushi", 5):
                    continue  # listed, but the image was never downloaded
                write_image(root / "images" / split / c / name, COLOURS[c],
                            corrupt=(split, c, k) == ("train", "ramen", 4),
                            truncate=(split, c, k) == ("test", "apple_pie", 1))

    def line(r):
        return ",".join(f'"{f}"' if "," in f else f for f in r)

    (root / "texts").mkdir()
    (root / "texts" / "train_titles.csv").write_text("".join(line(r) + "\n" for r in rows["train"]))
    # BalanceBenchmark's copy: a header row; CRLF
    (root / "texts" / "test_titles.csv").write_bytes(
        ("Image_path,text,label\r\n" + "".join(line(r) + "\r\n" for r in rows["test"])).encode())
    return root, rows


@pytest.fixture(scope="module")
def prepared(raw, tmp_path_factory):
    root, _ = raw
    out = tmp_path_factory.mktemp("food_out") / "food101"
    argv = ["food101", "--root", str(root), "--out", str(out), "--val_count", "3", "--min_count", "1",
            "--short_side", "16", "--workers", "1", "--progress", "off"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = prepare(argv)
    return out, argv, rc, buf.getvalue()


def test_titles_with_and_without_header(tmp_path):
    notes = []
    path = tmp_path / "t.csv"
    path.write_text('label,Image_path,text\nsushi,sushi_1.jpg,"Sushi, rolled"\n')
    assert read_titles(path, notes) == [("sushi_1.jpg", "Sushi, rolled", "sushi", 2)]
    path.write_text("sushi_1.jpg,Sushi, rolled,sushi\nsushi_2.jpg,,sushi\n")
    assert read_titles(path, notes) == [("sushi_1.jpg", "Sushi, rolled", "sushi", 1), ("sushi_2.jpg", "", "sushi", 2)]
    assert notes == ["t.csv: 1 row(s) had more than 3 fields (a title with an unquoted comma): the middle fields "
                     "were read as the title"]
    path.write_bytes("sushi_1.jpg,Sush\xe9,sushi\n".encode("latin-1"))
    assert read_titles(path, notes)[0][1] == "Sush\xe9" and "not UTF-8 (first at line 1)" in notes[-1]
    path.write_text("sushi_1.jpg,sushi\n")
    with pytest.raises(UsageError, match=r"t.csv:1: expected 3 fields \(image file, title, class\), got 2"):
        read_titles(path, notes)
    assert tokenize("Apple Pie's BEST-recipe: http://x.org/a?b 2x_y") == ["apple", "pie", "s", "best", "recipe",
                                                                         "2x", "y"]
    vocab = build_vocabulary(["a b b", "b c"], min_count=2)
    assert vocab == ["<pad>", "<unk>", "b"]
    assert encode("b a b", {w: i for i, w in enumerate(vocab)}, 4) == [2, 1, 2, 0]


def test_prepare_images_titles_vocabulary_and_faults(raw, prepared, capsys):
    root, rows = raw
    out, argv, rc, text = prepared
    assert rc == 1
    assert "23 clips found; 21 written, 0 skipped (already done), 2 failed, 1 listed but missing" in text
    assert "  train_sushi_5: no images/train/sushi/sushi_5.jpg (listed at texts/train_titles.csv:18)" in text
    assert "train_ramen_4: images/train/ramen/ramen_4.jpg: UnidentifiedImageError" in text
    assert re.search(r"test_apple_pie_1: images/test/apple_pie/apple_pie_1.jpg: OSError: .*[Tt]runcated", text)
    m = json.loads((out / "manifest.json").read_text())
    assert m["dataset"] == "food101" and m["classes"] == list(CLASSES) and m["audio"] == {}
    assert m["frames"]["decoder"] == "Pillow" and "fps" not in m["frames"]
    entry = m["clips"]["train_apple_pie_0"]
    assert entry["text"] == "Apple Pie Recipe, easy #0 trainapp0only" and entry["frames"] == 1
    assert entry["probe"] == {"height": 30, "width": 40}
    assert entry["source"] == {"image": "images/train/apple_pie/apple_pie_0.jpg", "text": "texts/train_titles.csv:1"}
    assert m["clips"]["train_ramen_2"]["text"] == "" and m["clips"]["test_sushi_0"]["label"] == "sushi"
    assert Image.open(out / "frames" / "train_apple_pie_0" / "frame_0000.jpg").size == (21, 16)
    # val: 3 listed training rows, one per class; the vocabulary: the titles of the rest of train only
    from dnr.data.splits import stratified_count

    listed = {f"train_{name[:-4]}": c for name, _, c in rows["train"]}
    drawn, _ = stratified_count(sorted(listed), listed, 3, (0, 1))
    assert sorted(listed[c] for c in drawn) == list(CLASSES)
    val = [r.split(",")[0] for r in (out / "splits/default/val.csv").read_text().splitlines()[1:]]
    assert val == [c for c in drawn if c in m["clips"]]
    vocab = (out / "text" / "vocab.txt").read_text().splitlines()
    assert vocab[:2] == ["<pad>", "<unk>"] and m["text"]["size"] == len(vocab) and m["text"]["vocabulary"] == \
        "text/vocab.txt"
    train = [r.split(",")[0] for r in (out / "splits/default/train.csv").read_text().splitlines()[1:]]
    for clip in train:
        assert set(tokenize(m["clips"][clip]["text"])) <= set(vocab)
    for clip in val:
        assert tokenize(m["clips"][clip]["text"])[-1] not in vocab  # its own word: seen in val only
    assert "recipe" in vocab and vocab.index("recipe") < vocab.index("apple")  # most frequent first
    before = snapshot(out)
    assert prepare(argv) == 1
    assert "0 written, 21 skipped (already done), 2 failed, 1 listed but missing" in capsys.readouterr().out
    assert snapshot(out) == before


def test_loader_tokens_images_errors_and_two_epochs(prepared, tmp_path):
    out = prepared[0]
    splits = build_datasets("food101", load_args("food101", out, food101_image_size=32, food101_text_len=8))
    info = splits.info
    m = json.loads((out / "manifest.json").read_text())
    assert info.modality_names == ["image", "text"] and info.classes == CLASSES
    assert info.spec("image").shape == (1, 3, 32, 32)
    assert (info.spec("text").kind, info.spec("text").shape, info.spec("text").vocab_size) == ("tokens", (8,),
                                                                                               m["text"]["size"])
    vocab = (out / "text" / "vocab.txt").read_text().splitlines()
    k = splits.test.clips.index("test_sushi_1")
    sample = splits.test[k]
    # "Sushi Recipe, easy #1 testsus1only": the last word was never seen in training -> unknown (1)
    assert sample["inputs"]["text"].tolist() == [vocab.index("sushi"), vocab.index("recipe"), vocab.index("easy"),
                                                 vocab.index("1"), 1, 0, 0, 0]
    assert sample["label"] == CLASSES.index("sushi")
    run = tmp_path / "run"
    assert trainer.cli(["--dataset", "food101", "--data_path", str(out), "--food101_image_size", "32", "--epochs", "2",
                        "--batch_size", "4", "--method", "baseline", "--no-probe", "--progress", "off",
                        "--transformer_dim", "16", "--transformer_heads", "2", "--transformer_layers", "1",
                        "--ckpt_path", str(run)]) == 0
    args = json.loads((run / "args.json").read_text())
    assert args["data"]["modalities"][1] == {"name": "text", "kind": "tokens", "shape": [40],
                                             "vocab_size": m["text"]["size"]}
    assert len((run / "log.jsonl").read_text().splitlines()) == 2
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    with open(broken / "text" / "vocab.txt", "a") as f:
        f.write("extra\n")
    with pytest.raises(ValueError, match=r"text/vocab.txt: not the vocabulary the manifest describes"):
        build_datasets("food101", load_args("food101", broken))
    (broken / "text" / "vocab.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"text/vocab.txt: the vocabulary that .*manifest.json names is "
                                                r"missing"):
        build_datasets("food101", load_args("food101", broken))
