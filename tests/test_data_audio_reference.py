"""The audio recipes against reference values computed once with the authors' libraries
(torchaudio's Kaldi fbank; librosa's load + stft), stored in fixtures/audio_reference.npz by
make_audio_reference.py (which says how to remake them, and with which versions)."""
import json
from pathlib import Path

import numpy as np
import pytest

from dnr.data import audio
from make_audio_reference import RATES, STFT_FRAMES, digest, signals

REFERENCE = Path(__file__).resolve().parent / "fixtures" / "audio_reference.npz"


@pytest.fixture(scope="module")
def reference():
    ref = np.load(REFERENCE)
    sig = signals()
    stored = json.loads(str(ref["sha256"]))
    # The signals are regenerated here: the comparison means something only if they are the same samples.
    assert {name: digest(x) for name, x in sig.items()} == stored
    return ref, {name: x.astype(np.float64) / 32768.0 for name, x in sig.items()}


@pytest.mark.parametrize("name", ["mono16k", "stereo16k"])
def test_kaldi_fbank_matches_torchaudio(reference, name):
    """torchaudio computes in float32; the stereo signal is given to it whole and it reads channel 0."""
    ref, sig = reference
    expected = ref[f"fbank_{name}"]
    ours = audio.kaldi_fbank(audio.pick_channel(sig[name], "first"), 16000)
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, rtol=0, atol=5e-4)
    if name == "mono16k":  # the first 30 ms are digital silence: the first frame sits on the log floor
        np.testing.assert_allclose(ours[0], np.log(audio.FLOAT32_EPS), atol=1e-6)
    else:  # the other channel, or the mean, would not match
        assert np.abs(audio.kaldi_fbank(sig[name][1], 16000) - expected).mean() > 1.0
    # The stored recipe pads, cuts and normalises exactly these values.
    feats = audio.fbank_features(sig[name], 16000, target_frames=16)
    n = expected.shape[0]
    np.testing.assert_allclose(feats[0, :, :n].T, (expected + 4.503877) / (2 * 5.141276), atol=1e-4)
    np.testing.assert_array_equal(feats[0, :, n:], (0 + 4.503877) / (2 * 5.141276) * np.ones((128, 16 - n), np.float32))


def test_fbank_of_44k_stereo_matches_the_authors_ffmpeg_chain(reference):
    """Audio at another rate: first channel, FFmpeg's resampler to 16 kHz, as `ffmpeg -ar 16000` +
    torchaudio did (their WAV was 16-bit: its rounding shows in near-empty bins only, so the
    comparison is on the mean). The former scipy resampler was at 1.7e-2; the channel mean at 1.3."""
    ref, sig = reference
    expected = ref["fbank_stereo44k"]
    x = sig["stereo44k"]
    n, scale = expected.shape[0], 2 * 5.141276  # the normalisation's scale: differences in log units below
    ours = audio.fbank_features(x, RATES["stereo44k"], target_frames=n)[0].T
    diff = np.abs(ours - (expected + 4.503877) / scale) * scale
    assert ours.shape == expected.shape
    assert diff.mean() < 2e-3 and np.median(diff) < 5e-4  # measured 3.0e-4 and 9e-5 (largest 5.6e-3)
    mean = audio.fbank_features(x, RATES["stereo44k"], target_frames=n, channel="mean")[0].T
    assert np.abs(mean - (expected + 4.503877) / scale).mean() * scale > 0.5


def test_log_stft_matches_librosa_with_soxr_hq(reference):
    """librosa.load(sr=22050) resamples with soxr 'HQ': below 7.5 kHz the mean difference must be at
    the level of two librosa releases (< 0.01 log units; measured 5e-8), where scipy's resample_poly
    left images that made it 1.9 over all rows."""
    ref, sig = reference
    expected = ref["stft_speech16k"]  # (frames, 257)
    assert tuple(ref["stft_frames"]) == STFT_FRAMES
    ours = audio.log_stft(sig["speech16k"], 16000)[0][:, list(STFT_FRAMES)].T
    below = np.arange(257) * 22050 / 512 < 7500
    diff = np.abs(ours - expected)
    assert diff[:, below].mean() < 1e-3 and diff.mean() < 1e-3
