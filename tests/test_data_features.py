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
    """OGM-GE: tile to 3 s, clip, librosa.stft(n_fft=512, hop_length=353) centred with reflect
    padding and a periodic Hann window, log(|S| + 1e-7); here as an explicit DFT."""
    n = 3 * 22050
    x = np.tile(x22, int(math.ceil(n / len(x22))))[:n]
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
    # From 16 kHz: the same recipe after the rate conversion.
    from scipy.signal import resample_poly

    y = x[:16000]
    np.testing.assert_allclose(audio.log_stft(y, 16000)[0], direct_log_stft(resample_poly(y, 441, 320)), atol=2e-4)


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
    assert splits.read_ogm_list(q) == [("1001_DFA_ANG_XX", "ANG"), ("vid_000001_000011", "playing drums")]
    q.write_text("only-one-field\n")
    with pytest.raises(ValueError, match=r"list.csv:1: expected"):
        splits.read_ogm_list(q)
