"""The audio recipes against direct computations written here from the published definitions,
the frame/flow transforms, and the split makers."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from dnr.data import audio, splits, transforms


def direct_kaldi_fbank(x, sr, bins=128):
    """Kaldi's compute-fbank-feats, frame by frame, with the options of the AST recipe."""
    win, shift = int(0.025 * sr), int(0.010 * sr)
    nfft = 1
    while nfft < win:
        nfft *= 2
    mel = lambda f: 1127.0 * math.log(1.0 + f / 700.0)  # noqa: E731
    lo, hi = mel(20.0), mel(sr / 2.0)
    step = (hi - lo) / (bins + 1)
    weights = np.zeros((bins, nfft // 2))
    for b in range(bins):
        left, center, right = lo + b * step, lo + (b + 1) * step, lo + (b + 2) * step
        for i in range(nfft // 2):
            m = mel(i * sr / nfft)
            if left < m <= center:
                weights[b, i] = (m - left) / (center - left)
            elif center < m < right:
                weights[b, i] = (right - m) / (right - center)
    out = []
    for t in range(1 + (len(x) - win) // shift):
        frame = np.array(x[t * shift:t * shift + win], dtype=np.float64)
        frame -= frame.mean()
        emph = np.empty_like(frame)
        emph[0] = frame[0] - 0.97 * frame[0]
        for n in range(1, win):
            emph[n] = frame[n] - 0.97 * frame[n - 1]
        hann = np.array([0.5 - 0.5 * math.cos(2 * math.pi * n / (win - 1)) for n in range(win)])
        padded = np.zeros(nfft)
        padded[:win] = emph * hann
        spectrum = np.fft.fft(padded)[: nfft // 2]
        energies = weights @ (spectrum.real ** 2 + spectrum.imag ** 2)
        out.append(np.log(np.maximum(energies, np.finfo(np.float32).eps)))
    return np.array(out)


def direct_log_stft(x22):
    """OGM-GE: np.tile(x, 3)[:3 s] (zeros after three tiles of a clip under 1 s), clip,
    librosa.stft(n_fft=512, hop_length=353) centred with reflect padding and a periodic Hann window,
    log(|S| + 1e-7); here as an explicit DFT."""
    n = 3 * 22050
    x = np.zeros(n)
    tiled = np.tile(x22, 3)[:n]
    x[:tiled.size] = tiled
    x = np.clip(x, -1, 1)
    x = np.concatenate([x[1:257][::-1], x, x[-257:-1][::-1]])  # reflect 256 samples each side
    window = 0.5 * (1 - np.cos(2 * np.pi * np.arange(512) / 512))
    k = np.arange(257)[:, None]
    dft = np.exp(-2j * np.pi * k * np.arange(512)[None, :] / 512)  # (257, 512)
    frames = np.stack([x[s:s + 512] * window for s in range(0, len(x) - 511, 353)], axis=1)  # (512, T)
    return np.log(np.abs(dft @ frames) + 1e-7)


def test_kaldi_fbank_matches_direct_computation():
    rng = np.random.default_rng(0)
    sr = 16000
    t = np.arange(int(0.4 * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size) + 0.02  # with a DC offset
    ours = audio.kaldi_fbank(x, sr)
    direct = direct_kaldi_fbank(x, sr)
    assert ours.shape == direct.shape == (1 + (t.size - 400) // 160, 128)
    np.testing.assert_allclose(ours, direct, rtol=0, atol=1e-9)


def test_fbank_recipe_pads_cuts_and_normalises():
    sr = 16000
    x = 0.5 * np.sin(2 * np.pi * 1000 * np.arange(int(0.5 * sr)) / sr)
    feats = audio.fbank_features(x, sr, target_frames=64)
    raw = direct_kaldi_fbank(x, sr)  # 48 frames: padded with zeros up to 64
    assert feats.shape == (1, 128, 64) and feats.dtype == np.float32
    expected = np.concatenate([raw, np.zeros((64 - raw.shape[0], 128))])
    expected = (expected + 4.503877) / (2 * 5.141276)
    np.testing.assert_allclose(feats[0].T, expected, atol=1e-5)
    # A 1 kHz tone peaks in the mel bin whose centre is nearest to 1 kHz.
    centres = [700 * (math.exp((1127 * math.log(1 + 20 / 700) + (b + 1) * (1127 * math.log(1 + 8000 / 700)
               - 1127 * math.log(1 + 20 / 700)) / 129) / 1127) - 1) for b in range(128)]
    assert int(np.argmax(raw[10])) == int(np.argmin([abs(c - 1000) for c in centres]))
    cut = audio.fbank_features(x, sr, target_frames=16)
    np.testing.assert_allclose(cut, feats[:, :, :16])


def test_log_stft_matches_direct_computation_and_shape():
    rng = np.random.default_rng(1)
    x = 0.4 * np.sin(2 * np.pi * 300 * np.arange(30000) / 22050) + 0.1 * rng.standard_normal(30000)
    x[100] = 3.0  # clipped to 1
    ours = audio.log_stft(x, 22050)
    assert ours.shape == (1, 257, 188) == audio.stft_shape()
    np.testing.assert_allclose(ours[0], direct_log_stft(x), atol=2e-4)
    # From 16 kHz: the same recipe after the rate conversion (soxr HQ, librosa's length).
    y = x[:16000]
    y22 = audio.resample_soxr(y, 16000, 22050)
    assert y22.shape == (22050,)
    np.testing.assert_allclose(audio.log_stft(y, 16000)[0], direct_log_stft(y22), atol=2e-4)
    # Several channels: their mean, as librosa.load(mono=True).
    both = np.stack([y, 0.5 * y[::-1]])
    np.testing.assert_array_equal(audio.log_stft(both, 16000), audio.log_stft(both.mean(axis=0), 16000))


def test_log_stft_of_a_clip_under_one_second_tiles_three_times_then_silence():
    """OGM-GE's np.tile(x, 3)[:3 s]: a 0.5 s clip fills 1.5 s; the rest is zero-padded (their code
    would give fewer frames), so the frames past 1.5 s hold the log floor."""
    t = np.arange(11025) / 22050
    x = 0.5 * np.sin(2 * np.pi * 440 * t)
    ours = audio.log_stft(x, 22050)[0]
    assert ours.shape == (257, 188)
    np.testing.assert_allclose(ours, direct_log_stft(x), atol=2e-4)
    tail = ours[:, 3 * 11025 // 353 + 2:]  # frames whose window lies past the three tiles
    np.testing.assert_allclose(tail, np.log(1e-7), atol=1e-6)
    assert ours[:, :90].max() > 0  # the tone, three times
    np.testing.assert_array_equal(audio.tile_three_times(np.array([1.0, 2.0]), 9), [1, 2, 1, 2, 1, 2, 0, 0, 0])
    np.testing.assert_array_equal(audio.tile_three_times(np.arange(4.0), 9), [0, 1, 2, 3, 0, 1, 2, 3, 0])


def test_fbank_reads_the_first_channel_or_the_mean():
    sr = 16000
    t = np.arange(int(0.3 * sr)) / sr
    left, right = 0.4 * np.sin(2 * np.pi * 500 * t), 0.2 * np.sin(2 * np.pi * 3000 * t)
    stereo = np.stack([left, right])
    np.testing.assert_array_equal(audio.fbank_features(stereo, sr, 32), audio.fbank_features(left, sr, 32))
    np.testing.assert_array_equal(audio.fbank_features(stereo, sr, 32, channel="mean"),
                                  audio.fbank_features((left + right) / 2, sr, 32))
    with pytest.raises(ValueError, match="unknown fbank channel rule 'left'"):
        audio.fbank_features(stereo, sr, 32, channel="left")
    assert audio.recipe_params("fbank", 32, "mean")["channel"] == "mean"


def test_ffmpeg_resampler_to_16k_keeps_the_signal():
    """44.1 kHz -> 16 kHz through FFmpeg's resampler: a 1 kHz tone comes out as the same tone
    sampled at 16 kHz (away from the ends), with the expected number of samples."""
    t44 = np.arange(44100) / 44100
    y = audio.resample_ffmpeg(0.5 * np.sin(2 * np.pi * 1000 * t44), 44100, 16000)
    assert y.shape == (16000,)
    t16 = np.arange(16000) / 16000
    np.testing.assert_allclose(y[200:-200], 0.5 * np.sin(2 * np.pi * 1000 * t16)[200:-200], atol=2e-3)
    # A 10 kHz tone cannot exist at 16 kHz: the anti-aliasing filter removes it (no 6 kHz image).
    z = audio.resample_ffmpeg(0.5 * np.sin(2 * np.pi * 10000 * t44), 44100, 16000)
    assert np.abs(z[200:-200]).max() < 1e-2
    assert audio.resample_ffmpeg(y, 16000, 16000) is y


def test_audio_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="fewer than one 25 ms frame"):
        audio.kaldi_fbank(np.zeros(100), 16000)
    with pytest.raises(ValueError, match="no samples"):
        audio.log_stft(np.zeros(0), 22050)
    with pytest.raises(ValueError, match="unknown audio recipe 'mfcc'"):
        audio.compute_features("mfcc", np.zeros(16000), 16000)


def test_rgb_and_flow_transforms():
    torch.manual_seed(0)
    img = Image.fromarray(np.full((24, 40, 3), 128, np.uint8))
    assert transforms.rgb_transform(16, train=True)(img).shape == (3, 16, 16)
    ev = transforms.rgb_transform(16, train=False)(img)
    assert torch.allclose(ev[0], torch.full((16, 16), (128 / 255 - 0.485) / 0.229), atol=1e-5)
    # Flow: u > 0 everywhere (motion to the right); a flip must turn it into motion to the left.
    u = Image.fromarray(np.full((24, 40), 128 + 64, np.uint8))
    v = Image.fromarray(np.full((24, 40), 128 - 32, np.uint8))
    x = transforms.flow_to_tensor(u, v, 16, train=False)
    assert x.shape == (2, 16, 16)
    assert torch.allclose(x[0], torch.full((16, 16), 64 / 127))
    assert torch.allclose(x[1], torch.full((16, 16), -32 / 127))
    signs = set()
    for seed in range(12):
        torch.manual_seed(seed)
        y = transforms.flow_to_tensor(u, v, 16, train=True, channels=3)
        assert y.shape == (3, 16, 16) and torch.equal(y[2], y[0])
        assert torch.allclose(y[1], torch.full((16, 16), -32 / 127))
        signs.add(round(float(y[0].mean()) * 127))
    assert signs == {64, -64}  # flipped and not flipped both happened


def test_splits_are_stratified_seeded_and_disjoint():
    labels = {f"c{i:03d}": "ab"[i % 2] if i < 80 else "c" for i in range(100)}  # 40 a, 40 b, 20 c
    ids = sorted(labels)
    test, rest = splits.stratified_fraction(ids, labels, 0.1, 0)
    assert splits.class_counts(test, labels) == {"a": 4, "b": 4, "c": 2}
    assert sorted(test + rest) == ids and not set(test) & set(rest)
    assert splits.stratified_fraction(ids, labels, 0.1, 0)[0] == test
    assert splits.stratified_fraction(ids, labels, 0.1, 1)[0] != test
    val, train = splits.take_per_class(rest, labels, splits.class_counts(test, labels), 5)
    assert splits.class_counts(val, labels) == {"a": 4, "b": 4, "c": 2}
    assert len(train) == 80 and not set(val) & set(train)
    assert splits.fraction_count(1, 0.1) == 0 and splits.fraction_count(3, 0.1) == 1
    key = {i: str(int(i[1:]) % 10) for i in ids}
    a, b, r = splits.partition_by_key(ids, key, 2, 3, 0)
    ka, kb, kr = ({key[i] for i in s} for s in (a, b, r))
    assert (len(ka), len(kb), len(kr)) == (2, 3, 5) and not (ka & kb or ka & kr or kb & kr)
    with pytest.raises(ValueError, match="keep one for training"):
        splits.partition_by_key(ids, key, 5, 5, 0)


def test_split_files_round_trip_and_errors(tmp_path):
    p = tmp_path / "train.csv"
    p.write_text(splits.split_csv_text(["b", "a"], {"a": "X", "b": "Y"}))
    assert p.read_text() == "clip,label\na,X\nb,Y\n"
    assert splits.read_split_csv(p) == [("a", "X"), ("b", "Y")]
    p.write_text("id,label\na,X\n")
    with pytest.raises(ValueError, match="expected the header 'clip,label'"):
        splits.read_split_csv(p)
    q = tmp_path / "list.csv"
    q.write_text("1001_DFA_ANG_XX,ANG\n\nvid_000001_000011,10,playing drums\n")
    expected = [("1001_DFA_ANG_XX", "ANG"), ("vid_000001_000011", "playing drums")]
    assert splits.read_list(q) == expected
    # The D&R authors' header, a byte-order mark, CRLF and a final line without an end: the same rows.
    q.write_bytes(b"\xef\xbb\xbfname,label\r\n1001_DFA_ANG_XX,ANG\r\n\r\nvid_000001_000011,10,playing drums")
    assert splits.read_list(q) == expected
    q.write_bytes(b"name,10,label\r\nvid_000001_000011,10,playing drums\r\n")
    assert splits.read_list(q) == expected[1:]
    q.write_text("only-one-field\n")
    with pytest.raises(ValueError, match=r"list.csv:1: expected"):
        splits.read_list(q)
    q.write_text("name,label\n")
    with pytest.raises(ValueError, match=r"list.csv has no rows"):
        splits.read_list(q)


def test_hash_draws_depend_on_the_clip_alone():
    ids = [f"{1000 + a}_S{s:02d}_{e}" for a in range(1, 41) for s in range(10) for e in "ABC"]
    bands = splits.hash_bands(ids, [0.1, 0.2], 0, "clip")
    assert sorted(sum(bands, [])) == sorted(ids)
    assert 80 < len(bands[0]) < 160 and 80 < len(bands[1]) < 160  # 10% each of 1,200 in expectation (std 10)
    # Without one clip, or with another, every other clip stays in its band.
    fewer = splits.hash_bands([i for i in ids if i != ids[7]] + ["new_clip"], [0.1, 0.2], 0, "clip")
    for old, new in zip(bands, fewer):
        assert set(old) - {ids[7]} == set(new) - {"new_clip"}
    assert splits.hash_bands(ids, [0.1, 0.2], 1, "clip") != bands  # the seed matters
    assert splits.unit_hash(0, "clip", "x") == splits.unit_hash(0, "clip", "x") != splits.unit_hash(0, "other", "x")
    assert splits.unit_hash(0, "cremad clip", "1001_DFA_ANG_XX") == pytest.approx(0.9883036209, abs=1e-9)  # any machine
    with pytest.raises(ValueError, match="must increase"):
        splits.hash_bands(ids, [0.3, 0.2], 0, "clip")
    # Numbered keys: in every block of 10 ids exactly one has rank 0 and one rank 1, present or not.
    actors = [str(a) for a in range(1001, 1092)]
    rank = splits.numbered_blocks(actors, 10, 0, "actor")
    assert sum(r == 0 for r in rank.values()) in (9, 10) and sum(r == 1 for r in rank.values()) in (9, 10)
    for first in range(1001, 1091, 10):
        assert sorted(rank[str(a)] for a in range(first, first + 10)) == list(range(10))
    some = splits.numbered_blocks(actors[::3], 10, 0, "actor")
    assert all(some[a] == rank[a] for a in some)
    with pytest.raises(ValueError, match="integer keys"):
        splits.numbered_blocks(["a1"], 10, 0, "actor")


def test_a_prepared_dataset_is_one_declaration():
    """register_prepared makes the trainer's entry (its flags and loader) and the preparation
    sub-command from one PreparedDataset."""
    import argparse

    from dnr.data import DATASETS
    from dnr.data.clips import AUDIO, PREPARED, RGB, PreparedDataset, register_prepared
    from dnr.data.prepare import PREPARERS, Collected

    spec = PreparedDataset(name="toy", title="Toy", description="Toy: sound + pictures",
                           modalities=(("sound", AUDIO), ("pictures", RGB)), frames=4, schemes=("a", "b"),
                           scheme_help="a or b", raw="Toy from its folder", add_prepare_args=lambda g: None,
                           collect=lambda args: Collected([], [], {}, {}))
    register_prepared(spec)
    try:
        parser = argparse.ArgumentParser()
        DATASETS["toy"].add_args(parser.add_argument_group("toy"))
        args = parser.parse_args(["--toy_split", "b"])
        assert (args.toy_audio, args.toy_split, args.toy_frames, args.toy_image_size) == ("auto", "b", 4, 224)
        assert not hasattr(args, "toy_flow_channels")
        assert PREPARERS["toy"].audio and not PREPARERS["toy"].flow and PREPARERS["toy"].description == spec.raw
        with pytest.raises(ValueError, match="--dataset toy needs --data_path"):
            DATASETS["toy"].build(argparse.Namespace(**vars(args), data_path=None))
        with pytest.raises(ValueError, match="prepared dataset 'toy' registered twice"):
            register_prepared(spec)
    finally:
        for registry in (DATASETS, PREPARED, PREPARERS):
            registry.pop("toy", None)
