"""VGGSound on a handful of clips made here with real codecs: vggsound.csv in its published form
(no header, quoted labels with commas, CRLF), file names in every form in circulation, a clip no
longer available, a corrupt file; prepare, load, two epochs."""
import json
import shutil

import numpy as np
import pytest

from dnr.data import build_datasets
from dnr.data.prepare import UsageError, main as prepare
from dnr.data.vggsound import read_csv

from test_data_real import load_args, snapshot, write_video

# Three real VGGSound labels: two with commas (quoted in the CSV), one with parentheses.
CLASSES = ("bee, wasp, etc. buzzing", "female speech, woman speaking", "police car (siren)")
# (YouTube id, start, label index, split, file name form); ids may start with '-' and hold '_'.
ROWS = [
    ("-0PQM4-hqgA", 30, 0, "train", "{id}_{s:06d}.mp4"),
    ("--9O4XZOge4", 1, 0, "train", "{id}_{s}.mp4"),
    ("a_bcdefghij", 185, 0, "train", "{id}_{s:06d}_{e:06d}.mkv"),
    ("b1cdefghijk", 0, 0, "test", "{id}_{s:06d}.mp4"),
    ("c1cdefghijk", 20, 1, "train", "{id}_{s:06d}.mp4"),
    ("d1cdefghijk", 40, 1, "train", "{id}_{s}.mov"),
    ("e1cdefghijk", 7, 1, "train", None),             # no longer on YouTube: no file
    ("f1cdefghijk", 12, 1, "test", "{id}_{s:06d}.mp4"),
    ("g1cdefghijk", 3, 2, "train", "{id}_{s:06d}.mp4"),
    ("h1cdefghijk", 9, 2, "train", "{id}_{s}_{e}.mp4"),
    ("i1cdefghijk", 60, 2, "train", "corrupt"),       # a broken download
    ("j1cdefghijk", 15, 2, "test", "{id}_{s:06d}.mp4"),
]


def csv_text(rows=ROWS, newline="\r\n"):
    out = []
    for yid, start, c, split, _ in rows:
        label = CLASSES[c]
        out.append(f"{yid},{start},{chr(34) + label + chr(34) if ',' in label else label},{split}")
    return newline.join(out) + newline


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("vggsound_raw")
    for k, (yid, start, c, split, form) in enumerate(ROWS):
        if form is None:
            continue
        name = form.format(id=yid, s=start, e=start + 10) if form != "corrupt" else f"{yid}_{start:06d}.mp4"
        fmt, codec, acodec = {".mp4": ("mp4", "mpeg4", "aac"), ".mkv": ("matroska", "mpeg4", "aac"),
                              ".mov": ("mov", "mpeg4", "aac")}[name[name.rindex("."):]]
        write_video(root / CLASSES[c].split(",")[0] / name, 1.2, fmt, codec, acodec, tone=300 + 150 * c,
                    corrupt=form == "corrupt")
    (root / "unrelated.mp4").write_bytes(b"")  # a file matching no row: ignored, counted
    csv_path = root.parent / "vggsound.csv"
    csv_path.write_bytes(csv_text().encode())
    return root, csv_path


@pytest.fixture(scope="module")
def prepared(raw, tmp_path_factory):
    import contextlib
    import io

    root, csv_path = raw
    out = tmp_path_factory.mktemp("vggsound_out") / "vggsound"
    argv = ["vggsound", "--root", str(root), "--csv", str(csv_path), "--out", str(out), "--val_fraction", "0.25",
            "--fbank_frames", "120", "--short_side", "16", "--workers", "1", "--progress", "off"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = prepare(argv)
    return out, argv, rc, buf.getvalue()


def test_the_published_csv_form_and_its_variants_are_read(tmp_path):
    rows, notes = read_csv(_write(tmp_path / "a.csv", csv_text()))
    assert [(r.youtube_id, r.start, r.label, r.split) for r in rows[:2]] == [
        ("-0PQM4-hqgA", 30, "bee, wasp, etc. buzzing", "train"), ("--9O4XZOge4", 1, "bee, wasp, etc. buzzing", "train")]
    assert rows[8].clip == "g1cdefghijk_000003" and rows[2].line == 3 and notes == []
    # LF, a byte-order mark, a header and a repeated row read the same
    text = "\ufeffyoutube_id,start_seconds,label,split\n" + csv_text(newline="\n") + "b1cdefghijk,0,bee,test\n"
    with pytest.raises(UsageError, match=r"b.csv:14: clip b1cdefghijk at 0 s is listed again with label 'bee' / "
                                         r"test \(line 5: 'bee, wasp, etc. buzzing' / test\)"):
        read_csv(_write(tmp_path / "b.csv", text))
    text = "\ufeffyoutube_id,start_seconds,label,split\n" + csv_text(newline="\n") + csv_text(ROWS[:1], "\n")
    again, notes = read_csv(_write(tmp_path / "c.csv", text))
    assert again == [r.__class__(*(list(vars(r).values())[:4] + [r.line + 1])) for r in rows]
    assert notes == ["1 row(s) of --csv repeat an earlier row and were read once"]
    with pytest.raises(UsageError, match=r"d.csv:1: expected 4 fields .* got 5.*a label with a comma must be quoted"):
        read_csv(_write(tmp_path / "d.csv", "x1,3,female speech, woman speaking,train\n"))
    with pytest.raises(UsageError, match=r"e.csv:2: start second 'ten' is not a whole number"):
        read_csv(_write(tmp_path / "e.csv", "x1,3,dog,train\nx2,ten,dog,test\n"))
    with pytest.raises(UsageError, match=r"f.csv:1: expected a YouTube id, a label and 'train' or 'test'"):
        read_csv(_write(tmp_path / "f.csv", "x1,3,dog,validation\n"))


def _write(path, text):
    path.write_bytes(text.encode())
    return path


def test_prepare_names_the_missing_and_the_corrupt_clip(prepared, capsys):
    out, argv, rc, text = prepared
    assert rc == 1
    assert "11 clips found; 10 written, 0 skipped (already done), 1 failed, 1 listed but missing" in text
    assert "  e1cdefghijk_000007: no video named e1cdefghijk_000007, e1cdefghijk_7 or " \
           "e1cdefghijk_000007_000017" in text
    assert "i1cdefghijk_000060: police car (siren)/i1cdefghijk_000060.mp4: InvalidDataError" in text
    assert "note: 1 video file(s) under --root match no row of --csv" in text
    assert "note: --csv names 3 classes; the published vggsound.csv has 309" in text
    m = json.loads((out / "manifest.json").read_text())
    assert m["dataset"] == "vggsound" and m["classes"] == sorted(CLASSES)
    assert sorted(m["clips"]) == sorted(f"{y}_{s:06d}" for y, s, _, _, f in ROWS if f not in (None, "corrupt"))
    assert m["clips"]["a_bcdefghij_000185"]["source"] == {"video": "bee/a_bcdefghij_000185_000195.mkv"}
    assert m["clips"]["--9O4XZOge4_000001"]["youtube_id"] == "--9O4XZOge4"
    assert list(m["missing"]) == ["e1cdefghijk_000007"] and list(m["failed"]) == ["i1cdefghijk_000060"]
    # val: one clip of each class drawn from the *listed* training clips (3 per class at 0.25: 1),
    # the missing one included; 9 listed training clips less the missing one remain in train + val
    from dnr.data.splits import stratified_fraction

    listed = {f"{y}_{s:06d}": CLASSES[c] for y, s, c, split, _ in ROWS if split == "train"}
    val, _ = stratified_fraction(sorted(listed), listed, 0.25, (0, 1))
    counts = m["splits"]["default"]
    assert counts["val"] + counts["val_failed_left_out"] == len(val) - ("e1cdefghijk_000007" in val) == 3 - (
        "e1cdefghijk_000007" in val)
    assert sorted(r.split(",")[0] for r in (out / "splits/default/val.csv").read_text().splitlines()[1:]) == \
        sorted(c for c in val if c in m["clips"])
    assert counts["test"] == 3
    assert counts["train"] + counts["val"] + counts["train_failed_left_out"] + counts["val_failed_left_out"] == 8
    feats = np.load(out / "audio_fbank" / "c1cdefghijk_000020.npy")
    assert feats.shape == (1, 128, 120) and m["clips"]["c1cdefghijk_000020"]["frames"] == 1
    before = snapshot(out)
    assert prepare(argv) == 1  # the corrupt clip is retried, nothing else touched
    assert "0 written, 10 skipped (already done), 1 failed, 1 listed but missing" in capsys.readouterr().out
    assert snapshot(out) == before


def test_a_row_matching_two_files_is_refused(raw, tmp_path, capsys):
    root, csv_path = raw
    twin = tmp_path / "raw"
    shutil.copytree(root, twin)
    shutil.copy(twin / "bee" / "-0PQM4-hqgA_000030.mp4", twin / "-0PQM4-hqgA_30.mp4")
    assert prepare(["vggsound", "--root", str(twin), "--csv", str(csv_path), "--out", str(tmp_path / "o"),
                    "--progress", "off"]) == 2
    assert ("1 row(s) of --csv match several files, e.g. ['-0PQM4-hqgA_000030: -0PQM4-hqgA_30.mp4, "
            "bee/-0PQM4-hqgA_000030.mp4']") in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_loader_checks_the_folder_and_two_epochs_run(prepared, tmp_path):
    from test_data_real import trainer

    out = prepared[0]
    splits = build_datasets("vggsound", load_args("vggsound", out, vggsound_image_size=32))
    assert splits.info.classes == tuple(sorted(CLASSES)) and splits.info.modality_names == ["audio", "visual"]
    assert [m.shape for m in splits.info.modalities] == [(1, 128, 120), (3, 3, 32, 32)]
    assert len(splits.test) == 3
    run = tmp_path / "run"
    rc = trainer.cli(["--dataset", "vggsound", "--data_path", str(out), "--vggsound_image_size", "32", "--epochs",
                      "2", "--batch_size", "4", "--method", "baseline", "--no-probe", "--progress", "off",
                      "--ckpt_path", str(run)])
    assert rc == 0
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1]
    assert json.loads((run / "results.json").read_text())["dataset"] == "vggsound"
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "audio_fbank" / "c1cdefghijk_000020.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 file\(s\) that the manifest promises are missing, e.g. "
                                                r"audio_fbank/c1cdefghijk_000020.npy"):
        build_datasets("vggsound", load_args("vggsound", broken))
