"""The packed frame cache (`script/prepare.py pack`, `--frame_cache cpu|gpu`): what pack writes, that
a second run changes nothing, that a missing or stale cache is refused by name, that cached samples
match the JPEG path, the batched device transform, and training through the trainer."""
import contextlib
import io
import json
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CODE
from dnr.data import build_datasets
from dnr.data.prepare import main as prepare
from dnr.data.transforms import BatchedFrames, flow_from_uint8, flow_to_tensor, random_crop_boxes

from test_data_real import EMOTIONS, load_args, snapshot, train_one_epoch, write_video, write_wav

sys.path.insert(0, str(CODE))
import main as trainer  # noqa: E402

MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]


def quiet_prepare(argv):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = prepare([str(a) for a in argv])
    return rc, buf.getvalue()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A tiny CREMA-D (3 actors x 6 emotions, 2.5 s FLV + WAV: 3 stored frames of 24 x 32 each),
    prepared with the project's tool: 6 train / 6 val / 6 test clips."""
    raw = tmp_path_factory.mktemp("cremad_raw")
    for a, actor in enumerate(("1001", "1002", "1003")):
        for e, emo in enumerate(EMOTIONS):
            name = f"{actor}_DFA_{emo}_XX"
            write_video(raw / "VideoFlash" / f"{name}.flv", 2.5, "flv", "flv")
            write_wav(raw / "AudioWAV" / f"{name}.wav", 2.5, 200 + 60 * e + 7 * a)
    # The three splits from lists in the D&R authors' format ('name,label' header; CRLF here).
    lists = tmp_path_factory.mktemp("lists")
    for split, actor in (("train", "1001"), ("val", "1002"), ("test", "1003")):
        rows = ["name,label"] + [f"{actor}_DFA_{emo}_XX,{emo}" for emo in EMOTIONS]
        (lists / f"{split}.csv").write_bytes(("\r\n".join(rows) + "\r\n").encode())
    out = tmp_path_factory.mktemp("prepared") / "cremad"
    rc, _ = quiet_prepare(["cremad", "--root", raw, "--out", out, "--fbank_frames", "64", "--train_list",
                           lists / "train.csv", "--val_list", lists / "val.csv", "--test_list", lists / "test.csv",
                           "--workers", "1", "--progress", "off"])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def packed(prepared):
    rc, text = quiet_prepare(["pack", "--data_path", prepared, "--workers", "2", "--progress", "off"])
    assert rc == 0
    return prepared, text


def cremad_args(folder, cache="off", **extra):
    return load_args("cremad", folder, cremad_image_size=32, cremad_audio="fbank", frame_cache=cache, **extra)


def test_pack_holds_the_decoded_frames_and_a_second_run_changes_nothing(packed):
    out, text = packed
    m = json.loads((out / "manifest.json").read_text())
    total = sum(c["frames"] for c in m["clips"].values())
    assert total == 18 * 3
    assert f"frames cache written: {out / 'cache' / 'frames_24x32.u8'} ({total} frames of 24 x 32 x 3" in text
    meta = json.loads((out / "cache" / "frames_24x32.json").read_text())
    assert meta["shape"] == [total, 24, 32, 3] and meta["bytes"] == total * 24 * 32 * 3
    assert meta["source"]["settings"] == m["frames"]
    data = np.memmap(out / "cache" / "frames_24x32.u8", dtype=np.uint8, mode="r", shape=tuple(meta["shape"]))
    offsets = sorted(meta["clips"].values())
    assert offsets[0][0] == 0 and all(a[0] + a[1] == b[0] for a, b in zip(offsets, offsets[1:]))
    for clip, (start, count) in meta["clips"].items():  # the stored size: the decoded JPEGs, exactly
        assert count == m["clips"][clip]["frames"]
        for k in range(count):
            jpeg = np.asarray(Image.open(out / "frames" / clip / f"frame_{k:04d}.jpg").convert("RGB"))
            assert np.array_equal(data[start + k], jpeg), (clip, k)
    before = snapshot(out)
    rc, again = quiet_prepare(["pack", "--data_path", out, "--workers", "1", "--progress", "off"])
    assert rc == 0 and "frames cache unchanged (up to date)" in again
    assert snapshot(out) == before


def test_pack_at_another_size_resizes_and_the_loader_wants_one_cache(packed, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(packed[0], out)
    rc, text = quiet_prepare(["pack", "--data_path", out, "--height", "16", "--width", "20", "--workers", "1",
                              "--progress", "off"])
    assert rc == 0 and "frames_16x20.u8" in text
    meta = json.loads((out / "cache" / "frames_16x20.json").read_text())
    data = np.memmap(out / "cache" / "frames_16x20.u8", dtype=np.uint8, mode="r", shape=tuple(meta["shape"]))
    clip = sorted(meta["clips"])[4]
    start = meta["clips"][clip][0]
    jpeg = Image.open(out / "frames" / clip / "frame_0001.jpg").convert("RGB")
    assert np.array_equal(data[start + 1], np.asarray(jpeg.resize((20, 16), Image.BILINEAR)))
    with pytest.raises(ValueError, match=r"holds several frame caches \(frames_16x20.json, frames_24x32.json\)"):
        build_datasets("cremad", cremad_args(out, "cpu"))
    for f in (out / "cache").glob("frames_24x32.*"):
        f.unlink()
    splits = build_datasets("cremad", cremad_args(out, "gpu"))
    assert splits.val[0]["inputs"]["visual"].shape == (2, 3, 16, 20)  # raw frames from the cache
    assert splits.info.spec("visual").shape == (2, 3, 32, 32)  # the model's input, after the device transform


def test_missing_or_stale_cache_is_refused_naming_the_file_and_the_command(prepared, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(prepared, out)
    shutil.rmtree(out / "cache", ignore_errors=True)
    command = f"python script/prepare.py pack --data_path {out}"
    with pytest.raises(FileNotFoundError, match=rf"{out / 'cache'}: no packed frame cache .*'{command}'"):
        build_datasets("cremad", cremad_args(out, "cpu"))
    assert quiet_prepare(["pack", "--data_path", out, "--height", "24", "--progress", "off"])[0] == 2
    assert "--height and --width go together" in capsys.readouterr().err
    assert quiet_prepare(["pack", "--data_path", out, "--workers", "1", "--progress", "off"])[0] == 0
    meta_path, data_path = out / "cache" / "frames_24x32.json", out / "cache" / "frames_24x32.u8"
    good = data_path.read_bytes()

    manifest = (out / "manifest.json").read_text()
    m = json.loads(manifest)
    m["frames"]["jpeg_quality"] = 90  # prepared again with other settings after packing
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=rf"{meta_path}: the packed frame cache is stale or incomplete \(the folder's "
                                         rf"manifest .* changed after packing\); rebuild it with '{command}'"):
        build_datasets("cremad", cremad_args(out, "cpu"))
    (out / "manifest.json").write_text(manifest)

    data_path.write_bytes(good[:-100])  # an interrupted copy
    expected = rf"{data_path} holds {len(good) - 100} bytes, the description says {len(good)}"
    with pytest.raises(ValueError, match=expected):
        build_datasets("cremad", cremad_args(out, "gpu"))
    data_path.write_bytes(b"\x07" * 50 + good[50:])  # another content of the right size
    with pytest.raises(ValueError, match=rf"the content of {data_path} does not match its description"):
        build_datasets("cremad", cremad_args(out, "cpu"))
    rc, text = quiet_prepare(["pack", "--data_path", out, "--workers", "1", "--progress", "off"])
    assert rc == 0 and "frames cache written" in text and data_path.read_bytes() == good  # repaired
    meta_path.unlink()
    with pytest.raises(FileNotFoundError, match="no packed frame cache"):
        build_datasets("cremad", cremad_args(out, "cpu"))
    # The JPEG path does not need the cache; the built-in dataset has no cache to read.
    assert len(build_datasets("cremad", cremad_args(out)).train) == 6
    with pytest.raises(ValueError, match=r"--frame_cache cpu: dataset 'builtin' does not read packed frames; the "
                                         r"option applies to the datasets prepared by script/prepare.py "
                                         r"\(cremad, food101, kinetics_sounds, ucf101, vggsound\)"):
        build_datasets("builtin", trainer.get_args_parser().parse_args(["--frame_cache", "cpu"]))


def test_cpu_cache_samples_match_the_jpeg_path(packed):
    jpeg = build_datasets("cremad", cremad_args(packed[0]))
    cached = build_datasets("cremad", cremad_args(packed[0], "cpu"))
    assert cached.info == jpeg.info and cached.device_transform is None
    for i in range(len(jpeg.val)):  # evaluation: resize 24 x 32 -> 32 x 32, two resamplers
        a, b = jpeg.val[i]["inputs"], cached.val[i]["inputs"]
        assert torch.equal(a["audio"], b["audio"])
        assert b["visual"].shape == (2, 3, 32, 32) and b["visual"].dtype == torch.float32
        assert (a["visual"] - b["visual"]).abs().max() < 0.05  # < 3 grey levels in normalised units
    # Training: the same generator state draws the same segment frames, crop boxes and flips.
    diffs, firsts = [], []
    for seed in range(8):
        torch.manual_seed(seed)
        a = jpeg.train[seed % 6]["inputs"]["visual"]
        torch.manual_seed(seed)
        b = cached.train[seed % 6]["inputs"]["visual"]
        diffs.append(float((a - b).abs().mean()))
        firsts.append(b)
    assert max(diffs) < 0.03
    assert not torch.equal(firsts[0], firsts[6])  # same clip, other draws: augmented


def test_gpu_mode_device_transform_shapes_and_determinism(packed):
    cpu = build_datasets("cremad", cremad_args(packed[0], "cpu"))
    gpu = build_datasets("cremad", cremad_args(packed[0], "gpu"))
    assert gpu.info == cpu.info and gpu.device_transform is not None
    raw = gpu.val[0]["inputs"]
    assert raw["visual"].dtype == torch.uint8 and raw["visual"].shape == (2, 3, 24, 32)
    batch = {m: torch.stack([gpu.val[i]["inputs"][m] for i in range(6)]) for m in ("audio", "visual")}
    out = gpu.device_transform(batch, False)
    assert out["visual"].shape == (6, 2, 3, 32, 32) and out["visual"].dtype == torch.float32
    assert out["audio"] is batch["audio"]
    assert torch.equal(gpu.device_transform(batch, False)["visual"], out["visual"])  # evaluation is deterministic
    reference = torch.stack([cpu.val[i]["inputs"]["visual"] for i in range(6)])
    assert (out["visual"] - reference).abs().max() < 0.05
    torch.manual_seed(0)
    train = gpu.device_transform(batch, True)["visual"]
    assert train.shape == (6, 2, 3, 32, 32) and not torch.equal(train, gpu.device_transform(batch, True)["visual"])
    # Denormalised, training values stay within the pixel range.
    pixels = train * STD + MEAN
    assert pixels.min() > -0.01 and pixels.max() < 1.01


def test_batched_crops_follow_random_resized_crop_and_flip_by_index_reversal():
    torch.manual_seed(0)
    boxes = random_crop_boxes(4000, 360, 480)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 480).all() and (boxes[:, 3] <= 360).all()
    area = w * h / (360 * 480)
    assert area.min() > 0.07 and area.max() <= 1.0 and 0.4 < float(area.mean()) < 0.6
    assert ((w / h) > 0.7).all() and ((w / h) < 1.4).all()
    # A horizontal ramp: each output frame either rises (kept) or falls (flipped) along the width.
    ramp = torch.arange(64, dtype=torch.uint8).mul(3).expand(24, 64)
    x = torch.stack([ramp, ramp, ramp]).expand(16, 4, 3, 24, 64).contiguous()  # (B, T, C, H, W)
    y = BatchedFrames({"v": ("rgb", 16, 3)})({"v": x}, True)["v"]
    slope = (y[..., -1] - y[..., 0]).mean(-1)[:, :, 0].flatten()  # (B*T,)
    assert (slope > 0).sum() > 10 and (slope < 0).sum() > 10 and (slope != 0).all()
    # Flow: u is negated on the flipped frames (mirrored motion), v is not; [u, v, u] for 3 channels.
    u = torch.full((24, 64), 160, dtype=torch.uint8)
    flow = torch.stack([u, ramp]).expand(16, 4, 2, 24, 64).contiguous()
    f = BatchedFrames({"flow": ("flow", 16, 3)})({"flow": flow}, True)["flow"]
    flipped = (f[..., 1, :, -1] - f[..., 1, :, 0]).mean(-1) < 0  # (B, T)
    u_sign = f[..., 0, :, :].mean((-1, -2))
    assert torch.allclose(u_sign.abs(), torch.tensor(32 / 127), atol=1e-5)
    assert torch.equal(u_sign < 0, flipped) and torch.equal(f[:, :, 2], f[:, :, 0])
    ev = BatchedFrames({"flow": ("flow", 16, 2)})({"flow": flow}, False)["flow"]
    assert torch.allclose(ev[:, :, 0], torch.tensor(32 / 127)) and ev.shape == (16, 4, 2, 16, 16)


def test_cpu_flow_from_the_cache_matches_the_jpeg_path():
    rng = np.random.default_rng(0)
    u = np.clip(128 + rng.normal(0, 20, (24, 32)).cumsum(1) / 4, 1, 255).astype(np.uint8)
    v = np.clip(128 + rng.normal(0, 20, (24, 32)).cumsum(0) / 4, 1, 255).astype(np.uint8)
    raw = torch.from_numpy(np.stack([u, v]))[None]  # (T=1, 2, H, W)
    for train in (False, True):
        for seed in range(4):
            torch.manual_seed(seed)
            a = flow_to_tensor(Image.fromarray(u), Image.fromarray(v), 16, train, 3)
            torch.manual_seed(seed)
            b = flow_from_uint8(raw, 16, train, 3)[0]
            assert b.shape == a.shape == (3, 16, 16)
            assert (a - b).abs().mean() < 0.02 and torch.equal(b[2], b[0])


def make_ucf101_like(out, n_clips=9, frames=2, h=24, w=32):
    """A prepared UCF-101-shaped folder (RGB and flow JPEGs, splits, manifest) written directly."""
    from dnr.data.manifest import manifest_text
    from dnr.data.splits import split_csv_text

    rng = np.random.default_rng(0)
    classes = ["A", "B", "C"]
    clips, labels = {}, {}
    for c in range(n_clips):
        clip, label = f"v_{classes[c % 3]}_g{c:02d}_c01", classes[c % 3]
        (out / "frames" / clip).mkdir(parents=True)
        (out / "flow" / clip).mkdir(parents=True)
        for k in range(frames):  # smooth random pictures, like natural images (no pixel noise)
            rgb = np.clip(128 + rng.normal(0, 12, (h, w, 3)).cumsum(0).cumsum(1) / 6, 0, 255).astype(np.uint8)
            Image.fromarray(rgb).save(out / "frames" / clip / f"frame_{k:04d}.jpg", quality=95)
            for name in ("u", "v"):
                smooth = np.clip(128 + rng.normal(0, 12, (h, w)).cumsum(0).cumsum(1) / 6, 1, 255).astype(np.uint8)
                Image.fromarray(smooth).save(out / "flow" / clip / f"{name}_{k:04d}.jpg", quality=95)
        clips[clip], labels[clip] = {"label": label, "frames": frames}, label
    ids = sorted(clips)
    for split, members in (("train", ids[:3]), ("val", ids[3:6]), ("test", ids[6:])):
        (out / "splits" / "1").mkdir(parents=True, exist_ok=True)
        (out / "splits" / "1" / f"{split}.csv").write_text(split_csv_text(members, labels))
    (out / "manifest.json").write_text(manifest_text({
        "format": 1, "dataset": "ucf101", "classes": classes, "frames": {"fps": 1.0}, "flow": {"bound": 20.0},
        "audio": {}, "clips": clips, "failed": {}, "missing": {}, "versions": []}))
    return out


def test_flow_is_packed_with_two_channels_and_read_in_both_modes(tmp_path):
    out = make_ucf101_like(tmp_path / "ucf101")
    rc, text = quiet_prepare(["pack", "--data_path", out, "--workers", "1", "--progress", "off"])
    assert rc == 0 and "frames cache written" in text and "flow cache written" in text
    meta = json.loads((out / "cache" / "flow_24x32.json").read_text())
    assert meta["shape"] == [18, 24, 32, 2]
    data = np.memmap(out / "cache" / "flow_24x32.u8", dtype=np.uint8, mode="r", shape=(18, 24, 32, 2))
    clip = sorted(meta["clips"])[5]
    start = meta["clips"][clip][0]
    for c, name in enumerate(("u", "v")):
        assert np.array_equal(data[start + 1][..., c], np.asarray(Image.open(out / "flow" / clip / f"{name}_0001.jpg")))
    args = dict(ucf101_image_size=16, ucf101_frames=2)
    jpeg = build_datasets("ucf101", load_args("ucf101", out, **args))
    cpu = build_datasets("ucf101", load_args("ucf101", out, frame_cache="cpu", **args))
    gpu = build_datasets("ucf101", load_args("ucf101", out, frame_cache="gpu", **args))
    assert jpeg.info == cpu.info == gpu.info and gpu.info.spec("flow").shape == (2, 2, 16, 16)
    assert gpu.val[0]["inputs"]["flow"].shape == (2, 2, 24, 32) and gpu.val[0]["inputs"]["flow"].dtype == torch.uint8
    batch = {m: torch.stack([gpu.val[i]["inputs"][m] for i in range(3)]) for m in ("rgb", "flow")}
    on_device = gpu.device_transform(batch, False)
    for i in range(3):
        for m in ("rgb", "flow"):
            a, b = jpeg.val[i]["inputs"][m], cpu.val[i]["inputs"][m]
            assert a.shape == b.shape == on_device[m][i].shape
            assert (a - b).abs().mean() < 0.03 and (on_device[m][i] - b).abs().mean() < 0.05, m


@pytest.mark.parametrize("cache", ["cpu", "gpu"])
def test_one_training_epoch_through_the_trainer(packed, tmp_path, cache):
    data = train_one_epoch("cremad", packed[0], tmp_path, ["--cremad_image_size", "32", "--cremad_audio", "fbank",
                                                           "--frame_cache", cache])
    assert data["modalities"][1] == {"name": "visual", "kind": "frames", "shape": [2, 3, 32, 32]}
    args = json.loads((tmp_path / "run_cremad" / "args.json").read_text())
    assert args["frame_cache"] == cache


def test_no_train_augment_gives_training_batches_the_evaluation_device_transform():
    calls = []
    transform = trainer.without_augmentation(lambda inputs, train: calls.append(train) or inputs)
    assert transform({"x": 1}, True) == {"x": 1} and calls == [False]
    assert trainer.without_augmentation(None) is None
