"""Audio: decoding, rate conversion and the two published feature recipes, in NumPy.

Recipes (each returns a float32 array (1, F, T), the layout of a "spectrogram" modality):

  stft   the OGM-GE log-STFT, as `librosa.load(path, sr=22050)` + `librosa.stft` computed it:
         the channels averaged (librosa's mono), converted to 22,050 Hz with the SoX resampler at
         "HQ" quality (python-soxr; what librosa >= 0.10 calls `soxr_hq`, its default) and cut or
         zero-padded to ceil(n * 22050 / rate) samples (librosa's `fix`); then OGM-GE's fit: the
         waveform tiled exactly three times and cut to 3 s, clipped to [-1, 1]; STFT with n_fft 512,
         hop 353, a periodic Hann window, frames centred (the signal reflect-padded by n_fft/2 at
         both ends: librosa's `center=True` with the 'reflect' padding of the librosa releases
         OGM-GE ran on; librosa >= 0.10 pads with zeros, which changes the first and last frame
         only), then log(|S| + 1e-7) -> (1, 257, 188).
         Clips under 1 s: three tiles last under 3 s, and OGM-GE's code would then give fewer than
         188 frames (a shape its batching cannot stack); here the three tiles are zero-padded to
         3 s (silence), so the shape stays (1, 257, 188). Clips of 1 s or more: exactly OGM-GE's.
  fbank  the Kaldi-style log-mel filterbank of AST and of the D&R authors' tensors, i.e.
         torchaudio's `kaldi.fbank(htk_compat=True, use_energy=False, window_type='hanning',
         num_mel_bins=128, dither=0.0, frame_shift=10)` at 16 kHz; re-implemented here because
         torchaudio cannot be installed beside every torch release (pinned against values computed
         with torchaudio: tests/fixtures/audio_reference.npz). Options followed: 25 ms
         frames (400 samples at 16 kHz) every 10 ms, `snip_edges` (only whole frames), per-frame
         DC removal, pre-emphasis 0.97 (the first sample pre-emphasised against itself), the
         symmetric "hanning" window 0.5 - 0.5 cos(2 pi n / (N - 1)), zero-padded to the next
         power of two (512), power spectrum, 128 triangular mel filters evenly spaced on the
         mel scale 1127 ln(1 + f / 700) between 20 Hz and Nyquist (the Nyquist bin has weight 0),
         log with a floor of float32's epsilon. `use_energy=False` means no energy term, so
         `htk_compat` changes nothing. The (frames, 128) result is zero-padded at the end or cut
         to 1024 frames and normalised as (x - (-4.503877)) / (2 * 5.141276) (SPEC section 2).
         AST subtracts the waveform's mean first; the per-frame DC removal makes that a no-op.
         Input as the authors made it: their WAVs were written by FFmpeg at 16 kHz (`-ar 16000`,
         channels kept) and `kaldi.fbank` reads the first channel. So by default the first channel
         is taken (`channel="mean"`, prepare.py's --fbank_channel mean, averages them instead), and
         audio at another rate is converted to 16 kHz by FFmpeg's own resampler (libswresample,
         through PyAV's `av.AudioResampler`, at its defaults as `-ar` uses them; in float, where
         the authors' WAVs were 16-bit).

Waveforms are float arrays (channels, samples) in [-1, 1] (16-bit PCM divided by 32768, as
soundfile, librosa and torchaudio return them); a 1-D array is one channel.
"""
from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import Dict, Tuple

import numpy as np

RECIPES = ("fbank", "stft")
FBANK_CHANNELS = ("first", "mean")  # which channel the filterbank reads (module docstring)

# OGM-GE's CREMA-D recipe.
STFT_SAMPLE_RATE = 22050
STFT_SECONDS = 3.0
STFT_TILES = 3
STFT_N_FFT = 512
STFT_HOP = 353
STFT_LOG_OFFSET = 1e-7
SOXR_QUALITY = "HQ"  # librosa's default res_type 'soxr_hq'

# The Kaldi-style filterbank (AST / the D&R authors).
FBANK_SAMPLE_RATE = 16000
FBANK_FRAME_LENGTH_MS = 25.0
FBANK_FRAME_SHIFT_MS = 10.0
FBANK_PREEMPHASIS = 0.97
FBANK_MEL_BINS = 128
FBANK_LOW_FREQ = 20.0
FBANK_FRAMES = 1024
FBANK_NORM_MEAN = -4.503877
FBANK_NORM_STD = 5.141276
FLOAT32_EPS = float(np.finfo(np.float32).eps)  # torch.finfo(torch.float).eps, Kaldi's log floor


def as_channels(wave: np.ndarray) -> np.ndarray:
    """-> (channels, samples) float64; a 1-D waveform is one channel."""
    x = np.asarray(wave, dtype=np.float64)
    if x.ndim == 1:
        return x[None, :]
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"expected a waveform (samples,) or (channels, samples), got shape {x.shape}")
    return x


def resample_soxr(x: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """A mono waveform to another rate as librosa.resample(res_type='soxr_hq') does it: the SoX
    resampler at HQ quality, then cut or zero-padded to ceil(n * rate_out / rate_in) samples."""
    if rate_in == rate_out:
        return x
    import soxr

    y = soxr.resample(x, rate_in, rate_out, quality=SOXR_QUALITY)
    n = int(math.ceil(x.shape[-1] * float(rate_out) / rate_in))
    return y[:n] if y.shape[-1] >= n else np.pad(y, (0, n - y.shape[-1]))


def resample_ffmpeg(x: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """A mono waveform to another rate with FFmpeg's resampler (libswresample, through PyAV, at
    the defaults `ffmpeg -ar` uses), the whole signal as one frame, then flushed."""
    if rate_in == rate_out:
        return x
    import av

    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(x, dtype=np.float64)[None, :], format="dbl",
                                       layout="mono")
    frame.sample_rate = int(rate_in)
    resampler = av.AudioResampler(format="dbl", layout="mono", rate=int(rate_out))
    chunks = [f.to_ndarray()[0] for f in resampler.resample(frame)]
    chunks += [f.to_ndarray()[0] for f in resampler.resample(None)]
    if not chunks:
        raise ValueError(f"FFmpeg's resampler returned no samples for {x.size} samples at {rate_in} Hz")
    return np.concatenate(chunks).astype(np.float64)


# ---------------------------------------------------------------------------------------------
# The OGM-GE log-STFT
# ---------------------------------------------------------------------------------------------

def stft_params() -> dict:
    return {
        "recipe": "OGM-GE log-STFT",
        "sample_rate": STFT_SAMPLE_RATE,
        "seconds": STFT_SECONDS,
        "fit": "tile the waveform exactly 3 times, cut to 3 s (zero-padded to 3 s when shorter, i.e. clips "
               "under 1 s), clip to [-1, 1]",
        "n_fft": STFT_N_FFT,
        "hop_length": STFT_HOP,
        "window": "hann, periodic (0.5 - 0.5 cos(2 pi n / n_fft))",
        "center": True,
        "pad_mode": "reflect",
        "value": "log(|STFT| + 1e-7)",
        "shape": list(stft_shape()),
        "layout": "(1, frequency, time) float32 .npy",
        "resampler": "soxr HQ (python-soxr; librosa's soxr_hq), length ceil(n * 22050 / rate)",
        "mono": "mean of the channels (librosa.load's mono)",
    }


def stft_shape() -> Tuple[int, int, int]:
    n = int(round(STFT_SAMPLE_RATE * STFT_SECONDS))
    return (1, STFT_N_FFT // 2 + 1, 1 + n // STFT_HOP)  # (1, 257, 188)


def tile_three_times(wave: np.ndarray, n: int) -> np.ndarray:
    """OGM-GE's fit: np.tile(x, 3)[:n]; zero-padded to n samples when three tiles are shorter
    (a clip under 1 s; module docstring)."""
    if wave.size == 0:
        raise ValueError("the audio has no samples")
    x = np.tile(wave, STFT_TILES)[:n]
    return np.pad(x, (0, n - x.size)) if x.size < n else x


def log_stft(wave: np.ndarray, sample_rate: int) -> np.ndarray:
    """OGM-GE's CREMA-D audio input from a waveform (channels, samples) -> (1, 257, 188) float32."""
    mono = as_channels(wave).mean(axis=0)
    if mono.size == 0:
        raise ValueError("the audio has no samples")
    x = resample_soxr(mono, sample_rate, STFT_SAMPLE_RATE)
    n = int(round(STFT_SAMPLE_RATE * STFT_SECONDS))
    x = np.clip(tile_three_times(x, n), -1.0, 1.0)
    pad = STFT_N_FFT // 2
    x = np.pad(x, pad, mode="reflect")  # centred frames
    n_frames = 1 + (x.size - STFT_N_FFT) // STFT_HOP
    idx = np.arange(STFT_N_FFT)[None, :] + STFT_HOP * np.arange(n_frames)[:, None]
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(STFT_N_FFT) / STFT_N_FFT)
    spec = np.fft.rfft(x[idx] * window, axis=1)  # (T, 257)
    out = np.log(np.abs(spec) + STFT_LOG_OFFSET).T  # (257, T)
    return out[None].astype(np.float32)


# ---------------------------------------------------------------------------------------------
# The Kaldi-style filterbank
# ---------------------------------------------------------------------------------------------

def fbank_params(target_frames: int = FBANK_FRAMES, channel: str = "first") -> dict:
    return {
        "recipe": "Kaldi-style log-mel filterbank (AST; torchaudio kaldi.fbank(htk_compat=True, "
                  "use_energy=False, window_type='hanning', num_mel_bins=128, dither=0.0, frame_shift=10))",
        "sample_rate": FBANK_SAMPLE_RATE,
        "frame_length_ms": FBANK_FRAME_LENGTH_MS,
        "frame_shift_ms": FBANK_FRAME_SHIFT_MS,
        "snip_edges": True,
        "dither": 0.0,
        "remove_dc_offset": True,
        "preemphasis": FBANK_PREEMPHASIS,
        "window": "hanning, symmetric (0.5 - 0.5 cos(2 pi n / (N - 1)))",
        "round_to_power_of_two": True,
        "power_spectrum": True,
        "num_mel_bins": FBANK_MEL_BINS,
        "low_freq": FBANK_LOW_FREQ,
        "high_freq": "Nyquist",
        "mel_scale": "1127 ln(1 + f / 700)",
        "log_floor": FLOAT32_EPS,
        "target_frames": int(target_frames),
        "fit": "zero-pad at the end or cut to target_frames",
        "norm_mean": FBANK_NORM_MEAN,
        "norm_std": FBANK_NORM_STD,
        "value": "(fbank - norm_mean) / (2 * norm_std)",
        "shape": list(fbank_shape(target_frames)),
        "layout": "(1, mel bin, frame) float32 .npy",
        "resampler": "FFmpeg's libswresample through PyAV (av.AudioResampler), as ffmpeg -ar 16000",
        "channel": channel,
        "channels": ("the first channel, as torchaudio's kaldi.fbank reads it" if channel == "first"
                     else "the mean of the channels"),
    }


def fbank_shape(target_frames: int = FBANK_FRAMES) -> Tuple[int, int, int]:
    return (1, FBANK_MEL_BINS, int(target_frames))


def mel(freq):
    return 1127.0 * np.log(1.0 + np.asarray(freq, dtype=np.float64) / 700.0)


def mel_banks(num_bins: int, padded_window: int, sample_rate: int, low_freq: float,
              high_freq: float) -> np.ndarray:
    """Kaldi's triangular mel filters -> (num_bins, padded_window // 2); FFT bin i is at
    i * sample_rate / padded_window Hz (the Nyquist bin is left out: weight 0)."""
    nyquist = 0.5 * sample_rate
    if high_freq <= 0.0:
        high_freq += nyquist
    if not 0.0 <= low_freq < high_freq <= nyquist:
        raise ValueError(f"mel filters need 0 <= low_freq < high_freq <= Nyquist, got {low_freq}, {high_freq}")
    mel_low, mel_high = mel(low_freq), mel(high_freq)
    delta = (mel_high - mel_low) / (num_bins + 1)
    left = mel_low + delta * np.arange(num_bins)[:, None]  # (bins, 1)
    center, right = left + delta, left + 2.0 * delta
    fft_mel = mel(np.arange(padded_window // 2) * sample_rate / padded_window)[None, :]  # (1, fft bins)
    up = (fft_mel - left) / (center - left)
    down = (right - fft_mel) / (right - center)
    return np.maximum(0.0, np.minimum(up, down))


def kaldi_fbank(wave: np.ndarray, sample_rate: int, num_mel_bins: int = FBANK_MEL_BINS) -> np.ndarray:
    """Log-mel filterbank of a mono float waveform, Kaldi's defaults plus the options in the
    module docstring -> (frames, num_mel_bins) float64."""
    x = np.asarray(wave, dtype=np.float64)
    window_size = int(sample_rate * FBANK_FRAME_LENGTH_MS * 0.001)
    shift = int(sample_rate * FBANK_FRAME_SHIFT_MS * 0.001)
    if x.size < window_size:
        raise ValueError(f"the audio has {x.size} samples, fewer than one {FBANK_FRAME_LENGTH_MS:g} ms "
                         f"frame ({window_size} samples at {sample_rate} Hz)")
    padded = 1 << (window_size - 1).bit_length()
    n_frames = 1 + (x.size - window_size) // shift  # snip_edges: whole frames only
    idx = np.arange(window_size)[None, :] + shift * np.arange(n_frames)[:, None]
    frames = x[idx]  # (T, window)
    frames = frames - frames.mean(axis=1, keepdims=True)  # remove_dc_offset
    previous = np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
    frames = frames - FBANK_PREEMPHASIS * previous
    frames = frames * (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(window_size) / (window_size - 1)))
    power = np.abs(np.fft.rfft(frames, n=padded, axis=1)) ** 2  # (T, padded/2 + 1)
    banks = mel_banks(num_mel_bins, padded, sample_rate, FBANK_LOW_FREQ, 0.0)
    energies = power[:, : padded // 2] @ banks.T  # (T, bins)
    return np.log(np.maximum(energies, FLOAT32_EPS))


def pick_channel(wave: np.ndarray, channel: str) -> np.ndarray:
    """(channels, samples) -> (samples,): the first channel, or the mean of all."""
    x = as_channels(wave)
    if channel == "first":
        return x[0]
    if channel == "mean":
        return x.mean(axis=0)
    raise ValueError(f"unknown fbank channel rule {channel!r}; choose one of {FBANK_CHANNELS}")


def fbank_features(wave: np.ndarray, sample_rate: int, target_frames: int = FBANK_FRAMES,
                   channel: str = "first") -> np.ndarray:
    """The full recipe: one channel, 16 kHz (FFmpeg's resampler), filterbank, pad/cut to
    target_frames, normalise -> (1, 128, T) float32."""
    x = resample_ffmpeg(pick_channel(wave, channel), sample_rate, FBANK_SAMPLE_RATE)
    fb = kaldi_fbank(x, FBANK_SAMPLE_RATE)  # (frames, 128)
    if fb.shape[0] < target_frames:
        fb = np.concatenate([fb, np.zeros((target_frames - fb.shape[0], fb.shape[1]))], axis=0)
    fb = fb[:target_frames]
    fb = (fb - FBANK_NORM_MEAN) / (2.0 * FBANK_NORM_STD)
    return fb.T[None].astype(np.float32)


def recipe_params(recipe: str, fbank_frames: int = FBANK_FRAMES, fbank_channel: str = "first") -> dict:
    if recipe == "stft":
        return stft_params()
    if recipe == "fbank":
        return fbank_params(fbank_frames, fbank_channel)
    raise ValueError(f"unknown audio recipe {recipe!r}; choose one of {RECIPES}")


def compute_features(recipe: str, wave: np.ndarray, sample_rate: int, fbank_frames: int = FBANK_FRAMES,
                     fbank_channel: str = "first") -> np.ndarray:
    if recipe == "stft":
        out = log_stft(wave, sample_rate)
    elif recipe == "fbank":
        out = fbank_features(wave, sample_rate, fbank_frames, fbank_channel)
    else:
        raise ValueError(f"unknown audio recipe {recipe!r}; choose one of {RECIPES}")
    if not np.isfinite(out).all():
        raise ValueError(f"the {recipe} features hold non-finite values")
    return out


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------

def check_wav_complete(path: Path) -> None:
    """Raise when a RIFF/WAVE file's data chunk declares more bytes than the file holds (a
    truncated download): decoders read such a file without complaint, shorter than it should be."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] not in (b"RIFF", b"RF64") or head[8:12] != b"WAVE":
            return  # not RIFF/WAVE: the decoder judges it
        pos = 12
        while pos + 8 <= size:
            f.seek(pos)
            chunk, length = struct.unpack("<4sI", f.read(8))
            if chunk == b"data":
                if length in (0, 0xFFFFFFFF):  # size left open by a streaming writer, or RF64
                    return
                if pos + 8 + length > size:
                    raise ValueError(f"truncated WAV: its header declares {length} bytes of audio, "
                                     f"the file holds {size - pos - 8}")
                return
            pos += 8 + length + (length & 1)
    raise ValueError("WAV file without a data chunk")


def read_wav(path: Path) -> Tuple[np.ndarray, int]:
    """A WAV file (libsndfile through soundfile) -> (float64 waveform (channels, samples) in [-1, 1], rate)."""
    import soundfile

    check_wav_complete(path)
    data, rate = soundfile.read(str(path), dtype="float64", always_2d=True)  # (samples, channels)
    if data.shape[0] == 0:
        raise ValueError("the WAV file holds no samples")
    return np.ascontiguousarray(data.T), int(rate)


def read_video_audio(path: Path) -> Tuple[np.ndarray, int]:
    """The first audio stream of a video file (FFmpeg through PyAV) -> (float64 (channels, samples), rate)."""
    import av

    chunks = []
    with av.open(str(path)) as container:
        if not container.streams.audio:
            raise ValueError("the file has no audio stream")
        stream = container.streams.audio[0]
        rate = stream.rate or stream.codec_context.sample_rate
        # Any sample format -> float planar, same layout and rate: (channels, samples) arrays.
        resampler = None
        for frame in container.decode(stream):
            if resampler is None:
                resampler = av.AudioResampler(format="fltp", layout=frame.layout, rate=frame.sample_rate)
                rate = frame.sample_rate
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray())
        if resampler is not None:
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray())
    if not chunks:
        raise ValueError("no audio could be decoded")
    data = np.concatenate(chunks, axis=1).astype(np.float64)  # (channels, samples)
    if data.shape[1] == 0:
        raise ValueError("the audio stream holds no samples")
    return data, int(rate)


def versions() -> Dict[str, str]:
    import soundfile
    import soxr

    return {"numpy": np.__version__, "soundfile": soundfile.__version__,
            "libsndfile": soundfile.__libsndfile_version__, "soxr": soxr.__version__}
