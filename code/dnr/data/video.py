"""Video: frames at a fixed rate (FFmpeg through PyAV) and optical flow (OpenCV).

Frame sampling (`--fps`, 1 by default): a clip lasting d seconds (first frame's time to the last
frame's time plus one frame period) gives max(1, round(d * fps)) frames; frame k is the picture on
screen at (k + 0.5) / fps seconds, the middle of the k-th 1/fps interval (the last decoded picture
when that time is past the end). With `short_side` > 0 a frame whose shorter side is longer is
scaled down (OpenCV, area interpolation) so that side has that many pixels; frames are never
scaled up.

Durations, for the preparation's checks (prepare.py): the decoded video's duration as above; the
duration the file declares (the container's, e.g. FLV's metadata, Matroska's segment info, MP4's
movie header; or the video stream's frame count in its header (AVI, MP4) over its frame rate: the
longer); and where the file's data ends (the end of its last packet, of any stream). A file whose
data ends well before its declared duration was cut short (a truncated download): decoders read
what is there without complaint.

Optical flow (UCF-101): for each sampled frame, the dense flow (u = horizontal, v = vertical
displacement in pixels) from that picture to the next decoded one (from the previous to it for
the clip's last picture), at the video's own frame rate and on grayscale, by OpenCV's Farneback or
DIS method; scaled with the frame when it is resized; stored as two 8-bit images with
q = clip(round(f * 127 / bound) + 128, 1, 255), i.e. f = (q - 128) * bound / 127, |f| <= bound.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

FLOW_METHODS = ("farneback", "dis")
# OpenCV's documented example values for Farneback: pyramid scale 0.5, 3 levels, 15-px window,
# 3 iterations, 5-px polynomial neighbourhood, sigma 1.2.
FARNEBACK = dict(pyr_scale=0.5, levels=3, winsize=15, iterations=3, poly_n=5, poly_sigma=1.2, flags=0)


def frames_params(fps: float, short_side: int, jpeg_quality: int) -> dict:
    return {
        "fps": float(fps),
        "sampling": "max(1, round(duration * fps)) frames; frame k shows time (k + 0.5) / fps s",
        "short_side": int(short_side),
        "resize": "shorter side scaled down to short_side (0: original size), OpenCV INTER_AREA",
        "format": "RGB JPEG (Pillow)",
        "jpeg_quality": int(jpeg_quality),
        "names": "frames/<clip>/frame_0000.jpg, frame_0001.jpg, ...",
        "decoder": "FFmpeg through PyAV",
    }


def flow_params(method: str, bound: float) -> dict:
    return {
        "method": method,
        "options": FARNEBACK if method == "farneback" else {"preset": "DISOPTICAL_FLOW_PRESET_MEDIUM"},
        "library": "OpenCV",
        "pair": "each sampled picture and the next decoded one (previous and it for the last)",
        "input": "grayscale at the decoded resolution; vectors scaled with the frame when resized",
        "bound": float(bound),
        "quantisation": "q = clip(round(f * 127 / bound) + 128, 1, 255); f = (q - 128) * bound / 127",
        "names": "flow/<clip>/u_0000.jpg (horizontal), v_0000.jpg (vertical), one pair per frame",
        "format": "8-bit grayscale JPEG (Pillow)",
    }


@dataclass
class SampledVideo:
    frames: List[np.ndarray]              # each (H, W, 3) uint8 RGB
    flows: Optional[List[np.ndarray]]     # each (H, W, 2) float32 (u, v) in pixels, or None
    duration: float                       # decoded video, seconds
    decoded: int                          # pictures decoded
    declared: Optional[float] = None      # seconds the file declares; None: it declares none
    data_end: float = 0.0                 # seconds: where the last packet of any stream ends


def _resize_shape(h: int, w: int, short_side: int) -> Tuple[int, int]:
    if short_side <= 0 or min(h, w) <= short_side:
        return h, w
    scale = short_side / min(h, w)
    return max(1, int(round(h * scale))), max(1, int(round(w * scale)))


def compute_flow(prev_rgb: np.ndarray, next_rgb: np.ndarray, method: str) -> np.ndarray:
    import cv2

    a = cv2.cvtColor(prev_rgb, cv2.COLOR_RGB2GRAY)
    b = cv2.cvtColor(next_rgb, cv2.COLOR_RGB2GRAY)
    if method == "farneback":
        f = FARNEBACK
        flow = cv2.calcOpticalFlowFarneback(a, b, None, f["pyr_scale"], f["levels"], f["winsize"],
                                            f["iterations"], f["poly_n"], f["poly_sigma"], f["flags"])
    elif method == "dis":
        flow = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM).calc(a, b, None)
    else:
        raise ValueError(f"unknown flow method {method!r}; choose one of {FLOW_METHODS}")
    return flow.astype(np.float32)  # (H, W, 2): u, v


def quantise_flow(flow: np.ndarray, bound: float) -> np.ndarray:
    """(H, W) float pixels -> uint8, 128 = no motion, 1 / 255 = -bound / +bound."""
    q = np.round(np.asarray(flow, dtype=np.float64) * (127.0 / bound)) + 128.0
    return np.clip(q, 1, 255).astype(np.uint8)


def sample_video(path: Path, fps: float, short_side: int = 0, flow: Optional[str] = None) -> SampledVideo:
    """Decode a video and keep the pictures at the sampling times above (and their flow)."""
    import av
    import cv2

    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    picks: List[Tuple[np.ndarray, Optional[np.ndarray]]] = []  # (picture, its successor) as RGB
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("the file has no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        period = float(1 / rate) if rate else 0.0
        declared = _declared_duration(container, stream, rate)
        first_packet, data_end = None, 0.0  # seconds, over the packets of every stream
        start = None
        last = None        # (time, frame) of the last decoded picture
        before_last = None
        decoded = 0
        # Every stream is demuxed (only the video decoded) to see where the file's data ends.
        for packet in container.demux():
            if packet.pts is not None and packet.time_base is not None:
                t0 = float(packet.pts * packet.time_base)
                first_packet = t0 if first_packet is None else min(first_packet, t0)
                data_end = max(data_end, t0 + float((packet.duration or 0) * packet.time_base))
            if packet.stream.index != stream.index:
                continue
            for frame in packet.decode():
                t = frame.time if frame.time is not None else decoded * period
                if start is None:
                    start = t
                t -= start
                # Every sampling time passed by this picture belongs to the previous one.
                while last is not None and t > (len(picks) + 0.5) / fps + 1e-9:
                    nxt = frame.to_ndarray(format="rgb24") if flow else None
                    picks.append((last[1].to_ndarray(format="rgb24"), nxt))
                before_last, last = last, (t, frame)
                decoded += 1
        if last is None:
            raise ValueError("no video picture could be decoded")
        if period == 0.0 and before_last is not None:
            period = last[0] - before_last[0]
        duration = last[0] + period
        data_end = max(data_end - (first_packet or 0.0), duration)
        count = max(1, int(duration * fps + 0.5))
        picks = picks[:count]
        if len(picks) < count:
            if flow and before_last is None:
                raise ValueError("the video has a single picture: no optical flow")
            tail = last[1].to_ndarray(format="rgb24")
            prev = before_last[1].to_ndarray(format="rgb24") if flow else None
            while len(picks) < count:
                picks.append((tail, None))
    frames, flows = [], [] if flow else None
    for picture, successor in picks:
        h, w = picture.shape[:2]
        nh, nw = _resize_shape(h, w, short_side)
        if flow:
            f = compute_flow(picture, successor, flow) if successor is not None else compute_flow(prev, picture, flow)
            if (nh, nw) != (h, w):
                f = cv2.resize(f, (nw, nh), interpolation=cv2.INTER_AREA)
                f[..., 0] *= nw / w
                f[..., 1] *= nh / h
            flows.append(f)
        if (nh, nw) != (h, w):
            picture = cv2.resize(picture, (nw, nh), interpolation=cv2.INTER_AREA)
        frames.append(np.ascontiguousarray(picture))
    return SampledVideo(frames=frames, flows=flows, duration=float(duration), decoded=decoded,
                        declared=declared, data_end=float(data_end))


def image_params(short_side: int, jpeg_quality: int) -> dict:
    """The 'frames' settings of a dataset of still images (one stored frame per sample)."""
    return {
        "source": "one image per sample, stored as its only frame",
        "short_side": int(short_side),
        "resize": "shorter side scaled down to short_side (0: original size), OpenCV INTER_AREA",
        "format": "RGB JPEG (Pillow)",
        "jpeg_quality": int(jpeg_quality),
        "names": "frames/<clip>/frame_0000.jpg",
        "decoder": "Pillow",
    }


def read_image(path: Path, short_side: int = 0) -> Tuple[np.ndarray, Tuple[int, int]]:
    """An image file -> ((H, W, 3) uint8 RGB, scaled down as the video frames are; its original
    (width, height)). The whole file is decoded here, so a truncated or corrupt image fails now
    (Pillow refuses a truncated JPEG) instead of in the loader."""
    import cv2
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        size = im.size
        picture = np.asarray(im.convert("RGB"))
    h, w = picture.shape[:2]
    nh, nw = _resize_shape(h, w, short_side)
    if (nh, nw) != (h, w):
        picture = cv2.resize(picture, (nw, nh), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(picture), size


def _declared_duration(container, stream, rate) -> Optional[float]:
    """Seconds the file says it lasts (module docstring), None when it says nothing."""
    values = []
    if container.duration is not None and container.duration > 0:
        values.append(container.duration / 1_000_000)  # AV_TIME_BASE units
    if stream.frames and rate:
        values.append(stream.frames / float(rate))  # the header's frame count (AVI, MP4)
    return max(values) if values else None


def versions() -> dict:
    import av
    import cv2
    import PIL

    libav = av.library_versions.get("libavcodec", ())
    return {"av": av.__version__, "libavcodec": ".".join(str(v) for v in libav),
            "opencv": cv2.__version__, "pillow": PIL.__version__}
