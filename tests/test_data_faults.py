"""The preparation tool on raw trees with the faults a real download has (issue 12): lists with a
header and CRLF, the D&R authors' three split files, a missing WAV, a truncated video, a video
without duration metadata, a video much longer or much shorter than its audio, a silent WAV, a
stereo WAV at 44.1 kHz, a clip under 1 s; splits that do not move when a file comes or goes; worker
processes that die with a killed tool and never load torch."""
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from argparse import Namespace

import av
import numpy as np
import pytest
import soundfile

from conftest import ROOT
from dnr.data import audio as audio_lib
from dnr.data import cremad, kinetics_sounds, ucf101
from dnr.data.prepare import Task, UsageError, run_tasks
from dnr.data.prepare import main as prepare
from test_data_real import EMOTIONS, H, W, snapshot, write_video, write_wav

TRUNCATED = "1002_DFA_ANG_XX"   # FLV with an audio track, cut to half its bytes
NO_WAV = "1002_DFA_SAD_XX"      # its WAV is missing (then "downloaded")
LONG = "1002_IEO_DIS_MD"        # 6-s video, 2-s WAV (as CREMA-D's 60-s 1064_IEO_DIS_MD)
SHORT = "1002_MTI_NEU_XX"       # 0.3-s video without audio, 2-s WAV (as 1076_MTI_NEU_XX)
NO_DURATION = "1002_DFA_FEA_XX"  # FLV written to a pipe (no duration in its metadata), then cut short
SILENT = "1002_DFA_HAP_XX"      # all-zero WAV
STEREO = "1002_ITS_ANG_XX"      # stereo WAV at 44.1 kHz, the channels different
UNDER_1S = "1002_ITS_SAD_XX"    # 0.6 s of video and audio


class _Pipe(io.RawIOBase):
    """A write-only, non-seekable file: the muxer cannot go back to write the duration."""

    def __init__(self, f):
        self.f = f

    def writable(self):
        return True

    def seekable(self):
        return False

    def write(self, b):
        return self.f.write(b)


def write_flv_without_duration(path, seconds, keep=1.0):
    """An FLV with an interleaved MP3 track written to a pipe, its first `keep` of the bytes kept.
    Whole, FFmpeg reads its duration from its last tag; cut short, it has none at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rate, step = 44100, 4410  # 0.1 s of audio per picture
    tone = (0.4 * np.sin(2 * np.pi * 440 * np.arange(int(rate * seconds)) / rate)).astype(np.float32)
    with open(path, "wb") as f, av.open(_Pipe(f), "w", format="flv") as c:
        vs = c.add_stream("flv", rate=10)
        vs.width, vs.height, vs.pix_fmt = W, H, "yuv420p"
        aus = c.add_stream("mp3", rate=rate)
        for i in range(int(seconds * 10)):
            for p in vs.encode(av.VideoFrame.from_ndarray(np.full((H, W, 3), 10 + 8 * i, np.uint8), format="rgb24")):
                c.mux(p)
            frame = av.AudioFrame.from_ndarray(np.stack([tone[i * step:(i + 1) * step]] * 2), format="fltp",
                                               layout="stereo")
            frame.sample_rate, frame.pts = rate, i * step
            for p in aus.encode(frame):
                c.mux(p)
        for stream in (vs, aus):
            for p in stream.encode():
                c.mux(p)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def write_samples(path, samples, rate):
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), samples, rate, subtype="PCM_16")


def read_splits(out, scheme):
    return {row.split(",")[0]: split for split in ("train", "val", "test")
            for row in (out / f"splits/{scheme}/{split}.csv").read_text().splitlines()[1:]}


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    """A CREMA-D tree: one clean clip per emotion (actor 1001) and the faulty clips above (actor
    1002), prepared with both recipes -> (raw root, out, argv, rc, printout, the missing WAV's path
    in a side folder)."""
    root = tmp_path_factory.mktemp("faulty_raw")
    vid, wav = root / "VideoFlash", root / "AudioWAV"
    for e, emo in enumerate(EMOTIONS):
        write_video(vid / f"1001_DFA_{emo}_XX.flv", 2.5, "flv", "flv")
        write_wav(wav / f"1001_DFA_{emo}_XX.wav", 2.5, 200 + 60 * e)
    write_video(vid / f"{TRUNCATED}.flv", 2.5, "flv", "flv", audio_codec="mp3")
    data = (vid / f"{TRUNCATED}.flv").read_bytes()
    (vid / f"{TRUNCATED}.flv").write_bytes(data[: len(data) // 2])
    write_wav(wav / f"{TRUNCATED}.wav", 2.5, 300)
    write_video(vid / f"{NO_WAV}.flv", 2.5, "flv", "flv")
    aside = tmp_path_factory.mktemp("later") / f"{NO_WAV}.wav"
    write_wav(aside, 2.5, 330)
    write_video(vid / f"{LONG}.flv", 6.0, "flv", "flv")
    write_wav(wav / f"{LONG}.wav", 2.0, 360)
    write_video(vid / f"{SHORT}.flv", 0.3, "flv", "flv")
    write_wav(wav / f"{SHORT}.wav", 2.0, 390)
    write_flv_without_duration(vid / f"{NO_DURATION}.flv", 2.0, keep=0.7)
    write_wav(wav / f"{NO_DURATION}.wav", 2.0, 420)
    write_video(vid / f"{SILENT}.flv", 2.0, "flv", "flv")
    write_samples(wav / f"{SILENT}.wav", np.zeros(32000), 16000)
    write_video(vid / f"{STEREO}.flv", 2.0, "flv", "flv")
    t = np.arange(2 * 44100) / 44100
    write_samples(wav / f"{STEREO}.wav", np.stack([0.4 * np.sin(2 * np.pi * 300 * t),
                                                   0.3 * np.sin(2 * np.pi * 2500 * t)], axis=1), 44100)
    write_video(vid / f"{UNDER_1S}.flv", 0.6, "flv", "flv")
    write_wav(wav / f"{UNDER_1S}.wav", 0.6, 450)
    out = tmp_path_factory.mktemp("faulty_out") / "cremad"
    argv = ["cremad", "--root", str(root), "--out", str(out), "--audio", "fbank,stft", "--fbank_frames", "64",
            "--test_fraction", "0.25", "--workers", "1", "--progress", "off"]
    import contextlib

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = prepare(argv)
    return root, out, argv, rc, buf.getvalue(), aside


def test_truncated_video_fails_missing_wav_exits_1_and_quirks_are_warnings(faulty):
    root, out, argv, rc, text, _ = faulty
    assert rc == 1
    assert "13 clips found; 12 written, 0 skipped (already done), 1 failed, 1 listed but missing" in text
    assert (f"  {TRUNCATED}: VideoFlash/{TRUNCATED}.flv: truncated or cut short: its data ends at 1.30 s "
            f"(13 pictures, 1.30 s of video), the file declares 2.52 s") in text
    assert f"  {NO_WAV}: no AudioWAV/<clip>.wav" in text and "exit status 1: 1 failed, 1 listed but missing" in text
    m = json.loads((out / "manifest.json").read_text())
    assert sorted(m["failed"]) == [TRUNCATED] and m["missing"] == {NO_WAV: "no AudioWAV/<clip>.wav"}
    assert not (out / "frames" / TRUNCATED).exists() and not (out / "audio_fbank" / f"{TRUNCATED}.npy").exists()
    assert m["warnings"] == {
        LONG: ["the video lasts 6.00 s, the audio 2.00 s"],
        SHORT: ["the video lasts 0.30 s, the audio 2.00 s"],
        NO_DURATION: ["the video file declares no duration, so a truncated file cannot be told (decoded 1.40 s)",
                      "the video lasts 1.40 s, the audio 2.00 s"],
        SILENT: ["the audio is silent (peak 0, under 0.001)"],
    }
    assert f"warnings (4 clips, prepared; every one in {out / 'manifest.json'}, key 'warnings'):" in text
    assert f"  {LONG}: the video lasts 6.00 s, the audio 2.00 s" in text
    assert m["clips"][LONG]["frames"] == 6 and m["clips"][SHORT]["frames"] == 1 and m["clips"][UNDER_1S]["frames"] == 1
    assert m["clips"][LONG]["probe"] == {"audio_peak": pytest.approx(0.45, abs=1e-3), "audio_s": 2.0,
                                         "declared_s": 6.0, "video_s": 6.0}
    assert m["clips"][NO_DURATION]["probe"]["declared_s"] is None
    assert m["checks"]["duration_tolerance_s"] == 0.5
    assert TRUNCATED not in read_splits(out, "clip") and NO_WAV not in read_splits(out, "clip")
    assert len(read_splits(out, "clip")) == 12
    assert not (out / "splits/actor").exists()  # two actors cannot fill three actor-disjoint splits
    assert "note: the 'actor' split left" in text


def test_stereo_44k_fbank_reads_the_first_channel_through_ffmpeg_and_stft_the_mean(faulty):
    root, out, *_ = faulty
    x, rate = audio_lib.read_wav(root / "AudioWAV" / f"{STEREO}.wav")
    assert x.shape == (2, 88200) and rate == 44100
    fbank = np.load(out / "audio_fbank" / f"{STEREO}.npy")
    first = audio_lib.kaldi_fbank(audio_lib.resample_ffmpeg(x[0], 44100, 16000), 16000)  # (198, 128)
    np.testing.assert_allclose(fbank[0].T, (first[:64] + 4.503877) / (2 * 5.141276), atol=1e-5)
    mean = audio_lib.fbank_features(x, rate, 64, channel="mean")
    assert np.abs(mean - fbank).mean() > 0.05  # the right channel's 2.5 kHz tone is not in it
    stft = np.load(out / "audio_stft" / f"{STEREO}.npy")
    np.testing.assert_allclose(stft, audio_lib.log_stft(x.mean(axis=0), 44100), atol=1e-6)
    m = json.loads((out / "manifest.json").read_text())
    assert m["audio"]["fbank"]["channel"] == "first" and m["audio"]["stft"]["mono"].startswith("mean")


def test_clip_under_one_second_is_tiled_three_times_then_silent(faulty):
    root, out, *_ = faulty
    x, _ = audio_lib.read_wav(root / "AudioWAV" / f"{UNDER_1S}.wav")
    stft = np.load(out / "audio_stft" / f"{UNDER_1S}.npy")[0]
    y = audio_lib.resample_soxr(x[0], 16000, 22050)  # 13,230 samples: three tiles end at 1.8 s
    assert y.size == 13230
    tiled = np.zeros(66150)
    tiled[: 3 * y.size] = np.tile(y, 3)
    assert np.allclose(stft[:, 2:110], audio_lib.log_stft(tiled, 22050)[0][:, 2:110], atol=1e-4)
    np.testing.assert_allclose(stft[:, 3 * y.size // 353 + 2:], np.log(1e-7), atol=1e-5)


def test_a_second_run_changes_nothing_and_a_finished_download_moves_no_clip(faulty, tmp_path, capsys):
    root, out, argv, _, _, aside = faulty
    before = snapshot(out)
    splits_before = {"clip": read_splits(out, "clip")}
    assert prepare(argv) == 1
    text = capsys.readouterr().out
    assert "0 written, 12 skipped (already done), 1 failed, 1 listed but missing" in text
    assert "warnings (4 clips" in text and snapshot(out) == before
    # A changed channel rule is refused on a folder prepared with the other one (exit 2, nothing written).
    assert prepare(argv + ["--fbank_channel", "mean"]) == 2
    assert "holds fbank features made with" in capsys.readouterr().err and snapshot(out) == before
    # The missing WAV arrives: its clip is prepared, and no other clip changes split.
    shutil.copy(aside, root / "AudioWAV" / aside.name)
    try:
        assert prepare(argv) == 1  # the truncated video still fails
        assert "1 written, 12 skipped (already done), 1 failed, 0 listed but missing" in capsys.readouterr().out
        for scheme, old in splits_before.items():
            new = read_splits(out, scheme)
            assert NO_WAV in new and {c: s for c, s in new.items() if c != NO_WAV} == old, scheme
    finally:
        (root / "AudioWAV" / aside.name).unlink()


def test_clips_prepared_without_checks_are_checked_by_the_next_run(faulty, tmp_path, capsys):
    """A folder whose manifest has no 'probe' for its clips (prepared by an earlier version, or a
    killed run): the next run measures them without rewriting any output, and finds the warnings."""
    root, out, argv, *_ = faulty
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    m = json.loads((copy / "manifest.json").read_text())
    for entry in m["clips"].values():
        del entry["probe"]
    (copy / "manifest.json").write_text(json.dumps(m))
    outputs = {k: v for k, v in snapshot(copy).items() if k.startswith(("frames/", "audio_"))}
    assert len(outputs) > 36
    assert prepare(argv[:3] + ["--out", str(copy)] + argv[5:]) == 1
    assert "0 written, 0 skipped (already done), 1 failed, 1 listed but missing; 12 checked" in capsys.readouterr().out
    again = json.loads((copy / "manifest.json").read_text())
    assert again["warnings"] == json.loads((out / "manifest.json").read_text())["warnings"]
    assert {k: v for k, v in snapshot(copy).items() if k.startswith(("frames/", "audio_"))} == outputs


# ---------------------------------------------------------------------------------------------
# Split stability and lists, on the listing alone (no decoding)
# ---------------------------------------------------------------------------------------------

def _cremad_tree(root, actors=range(1001, 1013), sentences=("DFA", "IEO", "ITS")):
    for a in actors:
        for s in sentences:
            for e in EMOTIONS:
                for sub, ext in (("VideoFlash", "flv"), ("AudioWAV", "wav")):
                    (root / sub).mkdir(parents=True, exist_ok=True)
                    (root / sub / f"{a}_{s}_{e}_XX.{ext}").touch()


def _cremad_args(root, **kw):
    return Namespace(root=str(root), test_fraction=0.1, train_list=None, val_list=None, test_list=None, seed=0, **kw) \
        if not kw else Namespace(**{**vars(_cremad_args(root)), **kw})


def _membership(collected):
    return {scheme: {c: s for s, ids in parts.items() for c in ids} for scheme, parts in collected.splits.items()}


def _assert_only_gone_moved(before, after, gone):
    for scheme, old in before.items():
        assert {c: s for c, s in old.items() if c != gone} == after[scheme], scheme
        assert gone not in after[scheme]


def test_removing_one_file_moves_no_other_clip(tmp_path):
    root = tmp_path / "cremad"
    _cremad_tree(root)  # 12 actors x 3 sentences x 6 emotions = 216 clips
    lists = tmp_path / "lists"
    lists.mkdir()
    ids = sorted(p.stem for p in (root / "AudioWAV").iterdir())
    test = [c for c in ids if c.startswith(("1001", "1002"))]
    (lists / "train.csv").write_text("".join(f"{c},{c.split('_')[2]}\n" for c in ids if c not in test))
    (lists / "test.csv").write_text("".join(f"{c},{c.split('_')[2]}\n" for c in test))
    gone = "1007_IEO_HAP_XX"
    for kw in ({}, {"train_list": str(lists / "train.csv"), "test_list": str(lists / "test.csv")}):
        before = _membership(cremad.collect(_cremad_args(root, **kw)))
        assert set(before) == ({"clip", "actor"}) and len(before["clip"]) == 216
        (root / "AudioWAV" / f"{gone}.wav").rename(tmp_path / "aside.wav")
        after = cremad.collect(_cremad_args(root, **kw))
        (tmp_path / "aside.wav").rename(root / "AudioWAV" / f"{gone}.wav")
        assert after.missing == {gone: "no AudioWAV/<clip>.wav"}
        _assert_only_gone_moved(before, _membership(after), gone)
    # Drawn without lists: about 10% each for test and val; by actor one of every 10 ids each.
    clip = cremad.collect(_cremad_args(root)).splits
    assert all(10 <= len(clip["clip"][s]) <= 40 for s in ("test", "val"))
    actors = {s: {c[:4] for c in ids} for s, ids in clip["actor"].items()}
    assert (len(actors["test"]), len(actors["val"])) in ((1, 1), (1, 2), (2, 1), (2, 2))  # blocks 1001-1010, 1011-1020

    # Kinetics-Sounds without lists (hash of the name) and UCF-101 (groups from the list).
    ks = tmp_path / "ks"
    for label in ("a", "b"):
        (ks / label).mkdir(parents=True)
        for i in range(30):
            (ks / label / f"{label}{i:02d}.mp4").touch()
    ks_args = Namespace(root=str(ks), test_fraction=0.15, val_fraction=0.1, train_list=None, test_list=None, seed=0)
    before = _membership(kinetics_sounds.collect(ks_args))
    (ks / "a" / "a07.mp4").unlink()
    _assert_only_gone_moved(before, _membership(kinetics_sounds.collect(ks_args)), "a07")

    ucf, lists = tmp_path / "ucf", tmp_path / "ucflists"
    lists.mkdir()
    (lists / "classInd.txt").write_text("1 A\r\n2 B\r\n")
    train, test = [], []
    for c, cls in enumerate("AB"):
        for g in range(1, 9):
            for k in (1, 2):
                rel = f"{cls}/v_{cls}_g{g:02d}_c{k:02d}.avi"
                (ucf / cls).mkdir(parents=True, exist_ok=True)
                (ucf / rel).touch()
                (test.append(rel) if g <= 2 else train.append(f"{rel} {c + 1}"))
    (lists / "trainlist01.txt").write_text("\r\n".join(train) + "\r\n")
    (lists / "testlist01.txt").write_text("\r\n".join(test) + "\r\n")
    ucf_args = Namespace(root=str(ucf), splits_dir=str(lists), val_groups=2, seed=0)
    before = _membership(ucf101.collect(ucf_args))
    # Both clips of a validation group go: its group is still drawn (from the list), so nothing moves.
    val_group = sorted(c for c, s in before["1"].items() if s == "val")[0].split("_g")[1][:2]
    for k in (1, 2):
        (ucf / "A" / f"v_A_g{val_group}_c{k:02d}.avi").unlink()
    after = _membership(ucf101.collect(ucf_args))
    assert {c: s for c, s in before["1"].items() if f"_A_g{val_group}_" not in c} == after["1"]


def test_the_authors_three_lists_give_exactly_their_splits(tmp_path):
    root = tmp_path / "cremad"
    _cremad_tree(root, actors=range(1001, 1005), sentences=("DFA", "IEO"))  # 48 clips
    ids = sorted(p.stem for p in (root / "AudioWAV").iterdir())
    parts = {"my_train": ids[:30], "val": ids[30:38], "test": ids[38:]}
    for name, members in parts.items():  # their format: a header, here with CRLF
        rows = ["name,label"] + [f"{c},{c.split('_')[2]}" for c in members]
        (tmp_path / f"{name}.csv").write_bytes(("\r\n".join(rows) + "\r\n").encode())
    (tmp_path / "train.csv").write_text("name,label\n" + "".join(f"{c},{c.split('_')[2]}\n" for c in ids[:38]))
    for train in ("my_train.csv", "train.csv"):  # their train.csv is my_train + val: the same splits
        got = cremad.collect(_cremad_args(root, train_list=str(tmp_path / train), val_list=str(tmp_path / "val.csv"),
                                          test_list=str(tmp_path / "test.csv"))).splits["clip"]
        assert got == {"train": parts["my_train"], "val": parts["val"], "test": parts["test"]}, train
    with pytest.raises(UsageError, match=r"1 clip\(s\) are in both --val_list and --test_list"):
        (tmp_path / "bad.csv").write_text(f"name,label\n{ids[40]},{ids[40].split('_')[2]}\n")
        cremad.collect(_cremad_args(root, train_list=str(tmp_path / "my_train.csv"), val_list=str(tmp_path / "bad.csv"),
                                    test_list=str(tmp_path / "test.csv")))
    with pytest.raises(UsageError, match="--val_list needs --train_list and --test_list"):
        cremad.collect(_cremad_args(root, val_list=str(tmp_path / "val.csv")))


# ---------------------------------------------------------------------------------------------
# Worker processes
# ---------------------------------------------------------------------------------------------

def test_worker_processes_prepare_clips_without_importing_torch(tmp_path):
    from data_crash_worker import prepare_and_report_modules

    tasks = []
    for k in range(2):
        video, wav = tmp_path / f"c{k}.flv", tmp_path / f"c{k}.wav"
        write_video(video, 1.0, "flv", "flv")
        write_wav(wav, 1.0, 300 + 50 * k)
        tasks.append(Task(clip=f"c{k}", out=str(tmp_path / "out"), video=str(video), audio=str(wav),
                          video_rel=video.name, audio_rel=wav.name, frames=True, flow=None,
                          recipes=("fbank", "stft"), fps=1.0, short_side=0, jpeg_quality=90, flow_bound=20.0,
                          fbank_frames=32, root=str(tmp_path)))
    (tmp_path / "out").mkdir()
    results = run_tasks(tasks, 2, False, "test", work=prepare_and_report_modules)
    assert {c: o.error for c, o in results.items()} == {"c0": None, "c1": None}
    assert results["c0"].probe["video_s"] == 1.0 and (tmp_path / "out/audio_stft/c1.npy").is_file()


def _children(pid):
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry))
    return out


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _maps(pid):
    try:
        with open(f"/proc/{pid}/maps") as f:
            return f.read()
    except OSError:
        return ""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and uses named pipes")
def test_workers_die_with_a_killed_tool_and_never_load_torch(tmp_path):
    """Each WAV is a named pipe nobody writes to: a worker reading one blocks, so the workers are
    busy when `prepare.py` gets SIGKILL; they must be gone soon after, and never have mapped torch."""
    root = tmp_path / "raw"
    for emo in EMOTIONS[:4]:
        write_video(root / "VideoFlash" / f"1001_DFA_{emo}_XX.flv", 1.0, "flv", "flv")
        (root / "AudioWAV").mkdir(exist_ok=True)
        os.mkfifo(root / "AudioWAV" / f"1001_DFA_{emo}_XX.wav")
    tool = subprocess.Popen([sys.executable, str(ROOT / "script" / "prepare.py"), "cremad", "--root", str(root),
                             "--out", str(tmp_path / "out"), "--workers", "2", "--progress", "off"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # until two workers are blocked reading a WAV
            workers = [p for p in _children(tool.pid) if "spawn_main" in open(f"/proc/{p}/cmdline").read()]
            if len(workers) == 2 and all("libsndfile" in _maps(p) for p in workers):
                break
            assert tool.poll() is None, "prepare.py ended early"
            time.sleep(0.2)
        else:
            pytest.fail(f"no two busy workers within 120 s (found {workers})")
        for p in workers:
            assert "torch" not in _maps(p), f"worker {p} loaded torch"
        tool.send_signal(signal.SIGKILL)
        tool.wait(timeout=30)
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in workers), "workers outlived the killed tool"
    finally:
        if tool.poll() is None:
            tool.kill()
        for p in workers:
            if _alive(p):
                os.kill(p, signal.SIGKILL)
