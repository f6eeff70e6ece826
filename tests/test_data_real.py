"""CREMA-D, Kinetics-Sounds and UCF-101 end to end on tiny raw datasets made here with real codecs
(PyAV/FFmpeg video with a moving square and a tone, soundfile WAVs) in each dataset's own folder
layout and naming: prepare, check what was written, load, train one step."""
import json
import os
import sys
import wave
from argparse import Namespace

import av
import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from conftest import CODE
from dnr.data import build_datasets
from dnr.data import audio as audio_lib
from dnr.data.prepare import main as prepare

sys.path.insert(0, str(CODE))
import main as trainer  # noqa: E402

from test_data_features import direct_kaldi_fbank, direct_log_stft  # noqa: E402

W, H, FPS = 32, 24, 10


def level(i):
    """Background grey level of picture i: the sampled frames show which picture they are (wraps
    after picture 30)."""
    return (10 + 8 * i) % 256


def write_video(path, seconds, fmt, codec, audio_codec=None, tone=440.0, corrupt=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    if corrupt:
        path.write_bytes(os.urandom(2048))
        return
    n = int(round(seconds * FPS))
    with av.open(str(path), "w", format=fmt) as c:
        vs = c.add_stream(codec, rate=FPS)
        vs.width, vs.height, vs.pix_fmt = W, H, "yuv420p"
        if audio_codec:
            rate = 44100
            aus = c.add_stream(audio_codec, rate=rate)
        for i in range(n):
            img = np.full((H, W, 3), level(i), np.uint8)
            x = 2 + 2 * i % (W - 10)
            img[10:18, x:x + 6] = 255  # a square moving right by 2 pixels per picture
            for p in vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in vs.encode():
            c.mux(p)
        if audio_codec:
            t = np.arange(int(rate * seconds)) / rate
            x = (0.4 * np.sin(2 * np.pi * tone * t)).astype(np.float32)
            frame = av.AudioFrame.from_ndarray(np.stack([x, x]), format="fltp", layout="stereo")
            frame.sample_rate = rate
            for p in aus.encode(frame):
                c.mux(p)
            for p in aus.encode():
                c.mux(p)


def write_wav(path, seconds, tone, truncate=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    sr = 16000
    t = np.arange(int(sr * seconds)) / sr
    soundfile.write(str(path), 0.3 * np.sin(2 * np.pi * tone * t) * (1 + 0.5 * np.sin(3 * t)), sr, subtype="PCM_16")
    if truncate:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])


def read_wav_direct(path):
    with wave.open(str(path)) as w:
        x = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float64) / 32768.0
        return x, w.getframerate()


def snapshot(folder):
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*"))
            if p.is_file()}


def load_args(dataset, data_path, **extra):
    from main import get_args_parser

    argv = ["--dataset", dataset, "--data_path", str(data_path)]
    for k, v in extra.items():
        argv += [f"--{k}", str(v)]
    return get_args_parser().parse_args(argv)


def train_one_epoch(dataset, data_path, tmp_path, extra):
    out = tmp_path / f"run_{dataset}"
    rc = trainer.cli(["--dataset", dataset, "--data_path", str(data_path), "--epochs", "1", "--batch_size", "4",
                      "--no-probe", "--method", "baseline", "--progress", "off", "--ckpt_path", str(out)] + extra)
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["dataset"] == dataset and 0.0 <= res["test"]["acc"] <= 1.0
    return json.loads((out / "args.json").read_text())["data"]


def train_one_step(splits, num_workers=0):
    """One SGD step of the default model on a training batch: finite loss, every encoder moves."""
    from torch.utils.data import DataLoader

    from dnr.models import create_model
    from dnr.runtime import worker_init

    torch.manual_seed(0)
    model = create_model(splits.info)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loader = DataLoader(splits.train, batch_size=4, shuffle=True, num_workers=num_workers, worker_init_fn=worker_init)
    batch = next(iter(loader))
    for spec in splits.info.modalities:
        assert tuple(batch["inputs"][spec.name].shape) == (4,) + tuple(spec.shape)
    before = {m: next(model.encoders[m].parameters()).detach().clone() for m in splits.info.modality_names}
    loss = torch.nn.functional.cross_entropy(model(batch["inputs"]).logits, batch["label"])
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    for m, p in before.items():
        assert not torch.equal(p, next(model.encoders[m].parameters())), m


# ---------------------------------------------------------------------------------------------
# CREMA-D
# ---------------------------------------------------------------------------------------------

EMOTIONS = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")


@pytest.fixture(scope="module")
def cremad_raw(tmp_path_factory):
    """5 actors x 6 emotions (one sentence), 2.5 s each, and one WAV whose video is missing."""
    root = tmp_path_factory.mktemp("cremad_raw")
    for a, actor in enumerate(("1001", "1002", "1003", "1004", "1005")):
        for e, emo in enumerate(EMOTIONS):
            name = f"{actor}_DFA_{emo}_XX"
            write_video(root / "VideoFlash" / f"{name}.flv", 2.5, "flv", "flv")
            write_wav(root / "AudioWAV" / f"{name}.wav", 2.5, 200 + 60 * e + 7 * a)
    write_wav(root / "AudioWAV" / "1006_IEO_HAP_HI.wav", 2.5, 300)
    return root


@pytest.fixture(scope="module")
def cremad_prepared(cremad_raw, tmp_path_factory):
    """Prepared once with both audio recipes, in 2 worker processes: (folder, argv, rc, printout)."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("prepared") / "cremad"
    argv = ["cremad", "--root", str(cremad_raw), "--out", str(out), "--audio", "fbank,stft",
            "--fbank_frames", "300", "--test_fraction", "0.2", "--workers", "2", "--progress", "off"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = prepare(argv)
    return out, argv, rc, buf.getvalue()


def test_cremad_prepare_in_parallel_and_a_second_run_changes_nothing(cremad_prepared, capsys):
    out, argv, rc, text = cremad_prepared
    assert rc == 1  # a listed clip (its WAV is there) has no video: named, and the exit status says so
    assert "30 clips found; 30 written, 0 skipped (already done), 0 failed, 1 listed but missing" in text
    assert ("listed but missing (their files are not under --root; left out):\n"
            "  1006_IEO_HAP_HI: no VideoFlash/<clip>.flv") in text
    assert "exit status 1: 0 failed, 1 listed but missing" in text
    m = json.loads((out / "manifest.json").read_text())
    counts = {s: len((out / f"splits/clip/{s}.csv").read_text().splitlines()) - 1 for s in ("train", "val", "test")}
    assert "splits 'clip'" in text and "train {train}, val {val}, test {test}".format(**counts) in text
    assert sum(counts.values()) == 30 and min(counts.values()) >= 1
    assert m["failed"] == {} and m["missing"] == {"1006_IEO_HAP_HI": "no VideoFlash/<clip>.flv"}
    assert m["warnings"] == {} and m["clips"]["1001_DFA_ANG_XX"]["probe"] == {
        "audio_peak": pytest.approx(0.45, abs=1e-3), "audio_s": 2.5, "declared_s": 2.5, "video_s": 2.5}
    assert m["classes"] == list(EMOTIONS) and len(m["clips"]) == 30
    assert m["audio"]["fbank"]["shape"] == [1, 128, 300] and m["audio"]["stft"]["shape"] == [1, 257, 188]
    assert m["audio"]["fbank"]["preemphasis"] == 0.97 and m["audio"]["stft"]["hop_length"] == 353
    assert m["frames"]["fps"] == 1.0 and m["versions"][0]["av"] == av.__version__
    assert not (out / ".tmp").exists()
    before = snapshot(out)
    assert prepare(argv[:-4] + ["--workers", "1", "--progress", "off"]) == 1
    text = capsys.readouterr().out
    assert "0 written, 30 skipped (already done), 0 failed" in text and "manifest unchanged" in text
    assert snapshot(out) == before


def test_a_crashing_decoder_process_is_isolated_and_reported():
    from types import SimpleNamespace

    from data_crash_worker import crash_on_boom
    from dnr.data.prepare import run_tasks

    tasks = [SimpleNamespace(clip=c, video_rel=f"{c}.avi") for c in ("a", "b", "boom", "c", "d", "e")]
    results = run_tasks(tasks, 2, False, "test", work=crash_on_boom)
    assert {c: o.error for c, o in results.items()} == {
        "a": None, "b": None, "c": None, "d": None, "e": None,
        "boom": "boom.avi: the process preparing it died (a crash in a decoder?)"}


def test_cremad_corrupt_video_and_truncated_wav_are_reported_not_fatal(cremad_raw, tmp_path, capsys):
    import shutil

    root = tmp_path / "raw"
    for e in EMOTIONS:
        for sub, ext in (("VideoFlash", "flv"), ("AudioWAV", "wav")):
            (root / sub).mkdir(parents=True, exist_ok=True)
            shutil.copy(cremad_raw / sub / f"1001_DFA_{e}_XX.{ext}", root / sub)
    write_video(root / "VideoFlash" / "1001_IEO_ANG_HI.flv", 2.5, "flv", "flv", corrupt=True)
    write_wav(root / "AudioWAV" / "1001_IEO_ANG_HI.wav", 2.5, 300)
    write_video(root / "VideoFlash" / "1001_IEO_SAD_HI.flv", 2.5, "flv", "flv")
    write_wav(root / "AudioWAV" / "1001_IEO_SAD_HI.wav", 2.5, 300, truncate=True)
    out = tmp_path / "out"
    argv = ["cremad", "--root", str(root), "--out", str(out), "--fbank_frames", "64", "--workers", "1",
            "--progress", "off"]
    assert prepare(argv) == 1
    text = capsys.readouterr().out
    assert "8 clips found; 6 written, 0 skipped (already done), 2 failed, 0 listed but missing" in text
    assert "1001_IEO_ANG_HI: VideoFlash/1001_IEO_ANG_HI.flv: InvalidDataError" in text
    assert ("1001_IEO_SAD_HI: AudioWAV/1001_IEO_SAD_HI.wav: ValueError: truncated WAV: its header declares "
            "80000 bytes of audio, the file holds 39978") in text
    m = json.loads((out / "manifest.json").read_text())
    assert sorted(m["failed"]) == ["1001_IEO_ANG_HI", "1001_IEO_SAD_HI"] and len(m["clips"]) == 6
    for clip in m["failed"]:  # nothing half-written
        assert not (out / "frames" / clip).exists() and not (out / "audio_fbank" / f"{clip}.npy").exists()
        assert clip not in (out / "splits/clip/train.csv").read_text() + (out / "splits/clip/val.csv").read_text()
    assert not (out / ".tmp").exists()
    before = snapshot(out)
    assert prepare(argv) == 1  # retried, reported again, nothing else touched
    assert "0 written, 6 skipped (already done), 2 failed" in capsys.readouterr().out
    assert snapshot(out) == before


def test_cremad_frames_audio_and_splits(cremad_raw, cremad_prepared):
    out = cremad_prepared[0]
    m = json.loads((out / "manifest.json").read_text())
    clip = "1003_DFA_FEA_XX"
    # 2.5 s at 1 fps -> 3 frames, the pictures at 0.5 s, 1.5 s and the last one (2.4 s).
    assert m["clips"][clip]["frames"] == 3 and m["clips"][clip]["actor"] == "1003"
    for k, picture in enumerate((5, 15, 24)):
        img = np.asarray(Image.open(out / "frames" / clip / f"frame_{k:04d}.jpg").convert("L"), np.float64)
        assert img.shape == (H, W)
        assert abs(img[:6, :].mean() - level(picture)) < 4
    x, sr = read_wav_direct(cremad_raw / "AudioWAV" / f"{clip}.wav")
    fbank = np.load(out / "audio_fbank" / f"{clip}.npy")
    raw = direct_kaldi_fbank(x, sr)  # 248 frames, zero-padded to 300
    raw = np.concatenate([raw, np.zeros((300 - len(raw), 128))])
    np.testing.assert_allclose(fbank[0].T, (raw + 4.503877) / (2 * 5.141276), atol=1e-5)
    stft = np.load(out / "audio_stft" / f"{clip}.npy")
    np.testing.assert_allclose(stft[0], direct_log_stft(audio_lib.resample_soxr(x, 16000, 22050)), atol=2e-4)

    def rows(scheme, split):
        lines = (out / "splits" / scheme / f"{split}.csv").read_text().splitlines()
        assert lines[0] == "clip,label"
        return [tuple(r.split(",")) for r in lines[1:]]

    # No lists: each clip's split is the band of its seeded hash (test below 0.2, val below 0.4).
    from dnr.data.splits import unit_hash

    members = {}
    for split in ("train", "val", "test"):
        r = rows("clip", split)
        assert all(c.split("_")[2] == lab for c, lab in r)
        members.update({c: split for c, _ in r})
    assert sorted(members) == sorted(m["clips"])
    for c, split in members.items():
        u = unit_hash(0, "cremad clip", c)
        assert split == ("test" if u < 0.2 else "val" if u < 0.4 else "train"), c
    # Actors 1001-1005 are one block of round(1 / 0.2) = 5 ids: one for test, one for val.
    actors = {s: {c.split("_")[0] for c, _ in rows("actor", s)} for s in ("train", "val", "test")}
    assert [len(actors[s]) for s in ("train", "val", "test")] == [3, 1, 1]
    assert not (actors["train"] & actors["val"] or actors["train"] & actors["test"] or actors["val"] & actors["test"])
    assert m["splits"]["clip"]["test"] == len(rows("clip", "test")) and m["splits"]["actor"]["train"] == 18


def test_cremad_lists_and_adding_a_recipe(cremad_raw, tmp_path, capsys):
    """OGM-GE lists give train/test; val takes the test set's per-class counts from train."""
    train = [f"100{a}_DFA_{e}_XX,{e}" for a in (1, 2, 3, 4) for e in EMOTIONS]
    test = [f"1005_DFA_{e}_XX,{e}" for e in EMOTIONS] + ["1007_DFA_NEU_XX,NEU"]
    (tmp_path / "train.csv").write_text("\n".join(train) + "\n")
    (tmp_path / "test.csv").write_text("\n".join(test) + "\n")
    out = tmp_path / "out"
    base = ["cremad", "--root", str(cremad_raw), "--out", str(out), "--train_list", str(tmp_path / "train.csv"),
            "--test_list", str(tmp_path / "test.csv"), "--workers", "1", "--progress", "off", "--fbank_frames", "64"]
    assert prepare(base + ["--audio", "fbank"]) == 1  # 1007_DFA_NEU_XX is listed, its files are not there
    assert "  1007_DFA_NEU_XX: neither its .flv nor its .wav exists" in capsys.readouterr().out
    m = json.loads((out / "manifest.json").read_text())
    assert m["missing"]["1007_DFA_NEU_XX"] == "neither its .flv nor its .wav exists"
    test_rows = (out / "splits/clip/test.csv").read_text().splitlines()[1:]
    val_rows = (out / "splits/clip/val.csv").read_text().splitlines()[1:]
    assert sorted(test_rows) == sorted(test[:6])
    # The listed test set's per-class counts, the missing clip included: drawn from the lists alone.
    assert sorted(r.split(",")[1] for r in val_rows) == sorted(EMOTIONS + ("NEU",))
    assert all(r.split("_")[0] != "1005" for r in val_rows)
    # A second recipe is added to the existing folder; a different frame setting is refused.
    assert prepare(base + ["--audio", "stft"]) == 1
    text = capsys.readouterr().out
    assert "30 written, 0 skipped" in text
    assert sorted(json.loads((out / "manifest.json").read_text())["audio"]) == ["fbank", "stft"]
    assert prepare(base + ["--audio", "stft", "--fps", "2"]) == 2
    assert "was prepared with frames settings" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("1001_DFA_ANG_XX,SAD\n")
    assert prepare(base[:-6] + ["--train_list", str(bad), "--test_list", str(tmp_path / "test.csv"),
                                "--workers", "1", "--progress", "off"]) == 2
    assert "clip 1001_DFA_ANG_XX has label 'SAD', its name says 'ANG'" in capsys.readouterr().err


def test_cremad_loader_and_one_training_epoch(cremad_prepared, tmp_path):
    out = cremad_prepared[0]
    args = load_args("cremad", out, cremad_image_size=32, cremad_audio="fbank")
    splits = build_datasets("cremad", args)
    info = splits.info
    assert info.classes == EMOTIONS and info.modality_names == ["audio", "visual"]
    assert info.spec("audio").shape == (1, 128, 300) and info.spec("visual").shape == (2, 3, 32, 32)
    counts = tuple(len((out / f"splits/clip/{s}.csv").read_text().splitlines()) - 1 for s in ("train", "val", "test"))
    assert (len(splits.train), len(splits.val), len(splits.test)) == counts
    # Evaluation: the middle stored frame of each of 2 segments of 3 frames -> frames 0 and 1 (stored
    # pictures 5 and 15), deterministic.
    s = splits.test[0]
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    corner = (s["inputs"]["visual"][:, :, :4, :] * std[None, :, None, None] + mean[None, :, None, None]).mean((1, 2, 3))
    assert torch.allclose(corner * 255, torch.tensor([level(5), level(15)], dtype=torch.float32), atol=5)
    assert torch.equal(splits.test[0]["inputs"]["visual"], s["inputs"]["visual"])
    clip = splits.test.clips[0]
    assert torch.equal(s["inputs"]["audio"], torch.from_numpy(np.load(out / "audio_fbank" / f"{clip}.npy")))
    assert s["label"] == EMOTIONS.index(clip.split("_")[2])
    # Training: a random frame per segment: segment 0 holds stored frame 0 (picture 5), segment 1
    # frames 1 and 2 (pictures 15 and 24): both must come up. The background is the darkest part.
    torch.manual_seed(0)
    seen = {0: set(), 1: set()}
    for _ in range(16):
        v = splits.train[0]["inputs"]["visual"]
        assert v.shape == (2, 3, 32, 32)
        pixels = (v * std[None, :, None, None] + mean[None, :, None, None]) * 255
        for seg in (0, 1):
            dark = float(pixels[seg].quantile(0.1))
            seen[seg].add(min((level(p) for p in (5, 15, 24)), key=lambda lv: abs(lv - dark)))
    assert seen == {0: {level(5)}, 1: {level(15), level(24)}}
    data = train_one_epoch("cremad", out, tmp_path, ["--cremad_image_size", "32", "--cremad_audio", "stft",
                                                     "--cremad_split", "actor"])
    assert data["modalities"][0] == {"name": "audio", "kind": "spectrogram", "shape": [1, 257, 188]}


def test_cremad_loader_errors_name_the_file(cremad_prepared, tmp_path):
    import shutil

    out = cremad_prepared[0]
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    clip = (broken / "splits/clip/val.csv").read_text().splitlines()[1].split(",")[0]
    (broken / "frames" / clip / "frame_0001.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=rf"1 file\(s\) that the manifest promises are missing, e.g. "
                                                rf"frames/{clip}/frame_0001.jpg"):
        build_datasets("cremad", load_args("cremad", broken, cremad_image_size=32))
    shutil.rmtree(broken / "frames" / clip)
    shutil.copytree(out / "frames" / clip, broken / "frames" / clip)
    np.save(broken / "audio_fbank" / f"{clip}.npy", np.zeros((1, 128, 299), np.float32))
    with pytest.raises(ValueError, match=rf"audio_fbank/{clip}.npy: shape \(1, 128, 299\) float32, the manifest "
                                         rf"says \(1, 128, 300\) float32"):
        build_datasets("cremad", load_args("cremad", broken, cremad_image_size=32, cremad_audio="fbank"))
    shutil.copy(out / "audio_fbank" / f"{clip}.npy", broken / "audio_fbank")
    splits = build_datasets("cremad", load_args("cremad", broken, cremad_image_size=32, cremad_audio="fbank"))
    other = splits.val.clips[1]  # checked when read
    np.save(broken / "audio_fbank" / f"{other}.npy", np.zeros((1, 128, 300), np.float64))
    with pytest.raises(ValueError, match=rf"audio_fbank/{other}.npy: shape \(1, 128, 300\) float64, expected "
                                         rf"\(1, 128, 300\) float32"):
        splits.val[1]
    shutil.copy(out / "audio_fbank" / f"{other}.npy", broken / "audio_fbank")
    m = json.loads((out / "manifest.json").read_text())
    m["clips"][clip]["label"] = "HAP" if m["clips"][clip]["label"] != "HAP" else "SAD"
    (broken / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=rf"val.csv:\d+: clip '{clip}' has label '\w+', the manifest says"):
        build_datasets("cremad", load_args("cremad", broken, cremad_image_size=32))
    with pytest.raises(ValueError, match="describes dataset 'cremad', not 'ucf101'"):
        build_datasets("ucf101", load_args("ucf101", broken))
    with pytest.raises(ValueError, match="--dataset cremad needs --data_path"):
        build_datasets("cremad", Namespace(**{**vars(load_args("cremad", broken)), "data_path": None}))
    with pytest.raises(ValueError, match=r"--kinetics_sounds_audio|not 'kinetics_sounds'"):
        build_datasets("kinetics_sounds", load_args("kinetics_sounds", broken))


# ---------------------------------------------------------------------------------------------
# Kinetics-Sounds
# ---------------------------------------------------------------------------------------------

KS_CLASSES = ("playing drums", "playing piano", "singing")


def test_kinetics_sounds_from_lists(tmp_path, capsys):
    root = tmp_path / "ks"
    train, test = [], []
    for c, label in enumerate(KS_CLASSES):
        for i in range(5):
            name = f"yt{c}{i}-_x_{i:06d}_{i + 10:06d}"
            write_video(root / "train" / label / f"{name}.mp4", 2.0, "mp4", "mpeg4", "aac", tone=300 + 200 * c)
            (test if i == 4 else train).append(f"{name},10,{label}")
    train.append("gone_000000_000010,10,singing")  # a video no longer on YouTube
    (tmp_path / "train.txt").write_text("\n".join(train) + "\n")
    (tmp_path / "test.txt").write_text("\n".join(test) + "\n")
    out = tmp_path / "out"
    argv = ["kinetics_sounds", "--root", str(root), "--out", str(out), "--train_list", str(tmp_path / "train.txt"),
            "--test_list", str(tmp_path / "test.txt"), "--val_fraction", "0.25", "--fbank_frames", "200",
            "--short_side", "16", "--workers", "1", "--progress", "off"]
    assert prepare(argv) == 1  # the video no longer available
    text = capsys.readouterr().out
    assert "15 clips found; 15 written, 0 skipped (already done), 0 failed, 1 listed but missing" in text
    assert "  gone_000000_000010: no video file named" in text
    m = json.loads((out / "manifest.json").read_text())
    assert m["classes"] == sorted(KS_CLASSES) and "gone_000000_000010" in m["missing"]
    # Val: one clip per class drawn from the training *list*; singing's draw is the missing video, so
    # it is left out rather than replaced (a later download of it would move no other clip).
    assert [m["splits"]["default"][s] for s in ("train", "val", "test")] == [10, 2, 3]
    val = (out / "splits/default/val.csv").read_text().splitlines()[1:]
    assert sorted(r.split(",")[1] for r in val) == ["playing drums", "playing piano"]
    name = "yt10-_x_000000_000010"
    assert m["clips"][name]["frames"] == 2
    frame = Image.open(out / "frames" / name / "frame_0000.jpg")
    assert frame.size == (21, 16)  # short side 24 -> 16, aspect kept
    # The audio track decoded from the MP4 (AAC, stereo 44.1 kHz): the 500 Hz tone dominates.
    feats = np.load(out / "audio_fbank" / f"{name}.npy")
    assert feats.shape == (1, 128, 200)
    wave44, rate = audio_lib.read_video_audio(root / "train" / "playing piano" / f"{name}.mp4")
    assert rate == 44100 and wave44.shape[0] == 2 and abs(wave44.shape[1] / rate - 2.0) < 0.1
    np.testing.assert_allclose(feats, audio_lib.fbank_features(wave44, rate, 200))  # first channel, FFmpeg's 16 kHz
    spectrum = np.abs(np.fft.rfft(wave44[0, 4410:48510]))
    assert abs(np.argmax(spectrum) * rate / 44100 - 500) < 2
    splits = build_datasets("kinetics_sounds", load_args("kinetics_sounds", out, kinetics_sounds_image_size=32))
    assert splits.info.classes == tuple(sorted(KS_CLASSES)) and splits.info.modality_names == ["audio", "visual"]
    assert [m.shape for m in splits.info.modalities] == [(1, 128, 200), (3, 3, 32, 32)]
    train_one_step(splits)


def test_kinetics_sounds_from_class_folders(tmp_path, capsys):
    root = tmp_path / "ks"
    for c, label in enumerate(("a", "b")):
        for i in range(4):
            write_video(root / label / f"v{c}{i}.mkv", 1.2, "matroska", "mpeg4", "aac")
    write_video(root / "b" / "noaudio.mp4", 1.2, "mp4", "mpeg4")  # no audio track
    out = tmp_path / "out"
    assert prepare(["kinetics_sounds", "--root", str(root), "--out", str(out), "--audio", "stft",
                    "--test_fraction", "0.25", "--workers", "1", "--progress", "off"]) == 1
    text = capsys.readouterr().out
    assert "noaudio: b/noaudio.mp4: ValueError: the file has no audio stream" in text
    m = json.loads((out / "manifest.json").read_text())
    assert m["classes"] == ["a", "b"] and len(m["clips"]) == 8
    # Each clip by its seeded hash: test below 0.25, val below 0.25 + 0.1 * 0.75.
    from dnr.data.splits import unit_hash

    for s in ("train", "val", "test"):
        for row in (out / f"splits/default/{s}.csv").read_text().splitlines()[1:]:
            u = unit_hash(0, "kinetics_sounds clip", row.split(",")[0])
            assert s == ("test" if u < 0.25 else "val" if u < 0.325 else "train"), row


# ---------------------------------------------------------------------------------------------
# UCF-101
# ---------------------------------------------------------------------------------------------

UCF_CLASSES = ("ApplyEyeMakeup", "HandstandPushups", "YoYo")


def test_ucf101_frames_flow_splits_and_training(tmp_path, capsys):
    root, lists = tmp_path / "UCF-101", tmp_path / "ucfTrainTestlist"
    lists.mkdir()
    (lists / "classInd.txt").write_text("".join(f"{i + 1} {c}\r\n" for i, c in enumerate(UCF_CLASSES)))
    train, test = [], []
    for c, cls in enumerate(UCF_CLASSES):
        stem = "HandStandPushups" if cls == "HandstandPushups" else cls  # the official spelling quirk
        for g in range(1, 7):
            rel = f"{cls}/v_{stem}_g{g:02d}_c01.avi"
            write_video(root / rel, 2.0, "avi", "mpeg4")
            (test.append(rel) if g <= 2 else train.append(f"{rel} {c + 1}"))
    (lists / "trainlist01.txt").write_text("\r\n".join(train) + "\r\n")
    (lists / "testlist01.txt").write_text("\r\n".join(test) + "\r\n")
    out = tmp_path / "out"
    assert prepare(["ucf101", "--root", str(root), "--splits_dir", str(lists), "--out", str(out), "--val_groups", "1",
                    "--workers", "1", "--progress", "off"]) == 0
    assert "18 clips found; 18 written" in capsys.readouterr().out
    m = json.loads((out / "manifest.json").read_text())
    assert m["classes"] == list(UCF_CLASSES) and m["audio"] == {} and m["flow"]["method"] == "farneback"
    clip = "v_HandStandPushups_g03_c01"
    assert m["clips"][clip]["label"] == "HandstandPushups" and m["clips"][clip]["frames"] == 2
    # The square moves right by 2 pixels per picture: u about +2 px on it, v about 0.
    u = np.asarray(Image.open(out / "flow" / clip / "u_0000.jpg"), np.float64)
    v = np.asarray(Image.open(out / "flow" / clip / "v_0000.jpg"), np.float64)
    assert u.shape == v.shape == (H, W)
    square = (slice(11, 17), slice(2 + 10 + 1, 2 + 10 + 5))  # picture 5: x = 12..17
    assert 0.8 < ((u[square] - 128) * 20 / 127).mean() < 3.0
    assert abs(((v[square] - 128) * 20 / 127).mean()) < 0.6
    assert abs(u[:4, :4].mean() - 128) < 3  # the still background
    groups = {s: {r.split("_g")[1][:2] for r in (out / f"splits/1/{s}.csv").read_text().splitlines()[1:]}
              for s in ("train", "val", "test")}
    assert groups["test"] == {"01", "02"} and len(groups["val"]) == 1 and len(groups["train"]) == 3
    assert not groups["val"] & groups["train"]
    splits = build_datasets("ucf101", load_args("ucf101", out, ucf101_image_size=32, ucf101_frames=2))
    assert splits.info.modality_names == ["rgb", "flow"]
    assert splits.info.spec("flow").shape == (2, 2, 32, 32) and splits.info.spec("rgb").shape == (2, 3, 32, 32)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (9, 3, 6)
    train_one_step(splits, num_workers=2)
    three = build_datasets("ucf101", load_args("ucf101", out, ucf101_image_size=32, ucf101_flow_channels=3))
    assert three.info.spec("flow").shape == (3, 3, 32, 32) and three.test[0]["inputs"]["flow"].shape == (3, 3, 32, 32)


def test_ucf101_bad_lists_are_named(tmp_path, capsys):
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "classInd.txt").write_text("1 A\n2 B\n")
    (lists / "trainlist01.txt").write_text("A/v_A_g01_c01.avi 2\n")
    (lists / "testlist01.txt").write_text("B/v_B_g01_c01.avi\n")
    assert prepare(["ucf101", "--root", str(tmp_path), "--splits_dir", str(lists), "--out", str(tmp_path / "o"),
                    "--progress", "off"]) == 2
    assert "trainlist01.txt:1: class index 2 does not name folder 'A' in classInd.txt" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
