"""Frame transforms of the prepared video datasets (SPEC section 2, the authors' CREMA-D code).

RGB    training: RandomResizedCrop(size) (scale 0.08-1, aspect 3/4-4/3) and a horizontal flip with
       probability 0.5, drawn for each frame on its own, as the authors' loader does; evaluation:
       resize to size x size. Then ImageNet mean/std.
Flow   (u, v) images written by the preparation tool: the same crop and flip for u and v of one
       frame (a flip also negates u: the motion is mirrored); values mapped back to [-1, 1] in
       units of the stored bound, (q - 128) / 127 (not rescaled by the crop). Optionally
       [u, v, u] for encoders that want three channels.
Random draws use torch's generator, which the trainer seeds per epoch (and per DataLoader worker).

Packed frames (`--frame_cache`, cache.py) get the same augmentation on tensors:
  cpu  `rgb_from_uint8` / `flow_from_uint8` in the loader: crop, then torch's antialiased
       bilinear resize of the uint8 frame (what torchvision does to tensors), the crop box and flip
       drawn in the same order from the same generator as above (so a cache of the stored size
       draws the very same boxes as the JPEG path; pixel values differ by resampling rounding at
       most);
  gpu  `BatchedFrames` on the training device, for a whole batch at once: one box per frame
       (RandomResizedCrop's distribution, drawn on the CPU from torch's generator), cut and resized
       by torchvision.ops.roi_align (bilinear, several samples per output pixel when shrinking:
       close to, not equal to, an antialiased resize), flip by reversing the width index;
       evaluation is the whole frame as the box.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Mapping, Tuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision import transforms as T
from torchvision.transforms import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def rgb_transform(size: int, train: bool) -> Callable[[Image.Image], Tensor]:
    """PIL RGB image -> (3, size, size) normalised tensor."""
    if train:
        head = [T.RandomResizedCrop(size, scale=CROP_SCALE, ratio=CROP_RATIO), T.RandomHorizontalFlip()]
    else:
        head = [T.Resize((size, size))]
    return T.Compose(head + [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def flow_to_tensor(u: Image.Image, v: Image.Image, size: int, train: bool, channels: int = 2) -> Tensor:
    """Two 8-bit flow images of one frame -> (channels, size, size): [u, v] or [u, v, u]."""
    flip = False
    if train:
        i, j, h, w = T.RandomResizedCrop.get_params(u, scale=list(CROP_SCALE), ratio=list(CROP_RATIO))
        u = TF.resized_crop(u, i, j, h, w, [size, size])
        v = TF.resized_crop(v, i, j, h, w, [size, size])
        flip = bool(torch.rand(1) < 0.5)
        if flip:
            u, v = TF.hflip(u), TF.hflip(v)
    else:
        u, v = TF.resize(u, [size, size]), TF.resize(v, [size, size])
    x = torch.from_numpy(np.stack([np.asarray(u), np.asarray(v)]).astype(np.float32))  # (2, S, S)
    x = (x - 128.0) / 127.0
    if flip:
        x[0] = -x[0]  # mirrored horizontal motion
    if channels == 3:
        x = torch.cat([x, x[:1]], dim=0)  # [u, v, u]
    return x


# ---------------------------------------------------------------------------------------------
# Packed frames (uint8 tensors)
# ---------------------------------------------------------------------------------------------

_MEAN255 = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255.0
_STD255 = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255.0


def _resize_uint8(frame: Tensor, size: int) -> Tensor:
    """(C, h, w) uint8 -> (C, size, size) uint8, bilinear with antialiasing (what torchvision's
    resize does for uint8 tensors, without its wrapper's overhead)."""
    return torch.nn.functional.interpolate(frame[None], size=(size, size), mode="bilinear", antialias=True,
                                           align_corners=False)[0]


def _crop_flip(frame: Tensor, size: int) -> Tuple[Tensor, bool]:
    """One (C, H, W) uint8 frame -> RandomResizedCrop to size x size and a flip with probability
    0.5, drawn in the order the PIL path draws them."""
    i, j, h, w = T.RandomResizedCrop.get_params(frame, list(CROP_SCALE), list(CROP_RATIO))
    out = _resize_uint8(frame[:, i:i + h, j:j + w], size)
    flip = bool(torch.rand(1) < 0.5)
    return (out.flip(-1) if flip else out), flip


def rgb_from_uint8(frames: Tensor, size: int, train: bool) -> Tensor:
    """(T, 3, H, W) uint8 -> (T, 3, size, size) normalised float, as `rgb_transform` per frame.
    Frame by frame: torch's antialiased uint8 resize is fastest on one channels-last (H, W, 3)
    picture, which is how the cache stores them."""
    if train:
        x = torch.stack([_crop_flip(f, size)[0] for f in frames])
    else:
        x = torch.stack([_resize_uint8(f, size) for f in frames])
    return x.float().sub_(_MEAN255).div_(_STD255)


def flow_from_uint8(frames: Tensor, size: int, train: bool, channels: int = 2) -> Tensor:
    """(T, 2, H, W) uint8 (u, v as stored) -> (T, channels, size, size), as `flow_to_tensor` per frame."""
    out = []
    for f in frames:
        flip = False
        if train:
            f, flip = _crop_flip(f, size)
        else:
            f = _resize_uint8(f, size)
        x = (f.float() - 128.0) / 127.0
        if flip:
            x[0] = -x[0]  # mirrored horizontal motion
        out.append(torch.cat([x, x[:1]]) if channels == 3 else x)
    return torch.stack(out)


def random_crop_boxes(n: int, height: int, width: int, scale=CROP_SCALE, ratio=CROP_RATIO,
                      attempts: int = 10) -> Tensor:
    """n boxes (x1, y1, x2, y2) in pixels from RandomResizedCrop's distribution, vectorised: up to
    `attempts` draws of (area, log aspect) per box, the first that fits, else the central crop that
    torchvision falls back to. Drawn from torch's (CPU) generator."""
    area = float(height * width)
    target = torch.empty(n, attempts).uniform_(scale[0], scale[1]) * area
    aspect = torch.exp(torch.empty(n, attempts).uniform_(math.log(ratio[0]), math.log(ratio[1])))
    w = torch.sqrt(target * aspect).round()
    h = torch.sqrt(target / aspect).round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)  # (n, 1): the first attempt that fits
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(height * max(ratio))), height
    else:
        fw, fh = width, height
    found = fits.any(1)
    w = torch.where(found, w, torch.full_like(w, fw))
    h = torch.where(found, h, torch.full_like(h, fh))
    y1 = torch.floor(torch.rand(n) * (height - h + 1))
    x1 = torch.floor(torch.rand(n) * (width - w + 1))
    y1 = torch.where(found, y1, torch.div(height - h, 2, rounding_mode="floor"))
    x1 = torch.where(found, x1, torch.div(width - w, 2, rounding_mode="floor"))
    return torch.stack([x1, y1, x1 + w, y1 + h], dim=1)


class BatchedFrames:
    """The device transform of `--frame_cache gpu`: (B, T, C, H, W) uint8 frames, as the loader
    returns them from the packed cache, -> the model's (B, T, C', size, size) float inputs, cut,
    flipped, resized and normalised for the whole batch at once on the tensor's device.

    `specs`: modality -> (kind "rgb" or "flow", output size, output channels). Other modalities
    pass through unchanged."""

    def __init__(self, specs: Mapping[str, Tuple[str, int, int]]):
        self.specs: Dict[str, Tuple[str, int, int]] = dict(specs)

    @torch.no_grad()
    def __call__(self, inputs: Mapping[str, Tensor], train: bool) -> Dict[str, Tensor]:
        out = dict(inputs)
        for name, (kind, size, channels) in self.specs.items():
            if name in out:
                out[name] = self._apply(out[name], kind, size, channels, train)
        return out

    @staticmethod
    def _apply(x: Tensor, kind: str, size: int, channels: int, train: bool) -> Tensor:
        from torchvision.ops import roi_align

        if x.dtype != torch.uint8 or x.dim() != 5:
            raise ValueError(f"--frame_cache gpu expects (B, T, C, H, W) uint8 frames from the loader, got "
                             f"{tuple(x.shape)} {x.dtype}")
        b, t, c, height, width = x.shape
        n = b * t
        flat = x.flatten(0, 1).float()  # (B, T, C, H, W) -> (B*T, C, H, W)
        if train:
            boxes = random_crop_boxes(n, height, width)
            flip = torch.rand(n) < 0.5
        else:
            boxes = torch.tensor([[0.0, 0.0, float(width), float(height)]]).expand(n, 4)
            flip = torch.zeros(n, dtype=torch.bool)
        rois = torch.cat([torch.arange(n, dtype=torch.float32)[:, None], boxes], dim=1).to(flat.device)
        # aligned=True: box (x1, y1, x2, y2) covers exactly the pixels x1..x2-1, y1..y2-1; adaptive
        # sampling averages ceil(box / size) samples per output pixel and axis when shrinking.
        y = roi_align(flat, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1,
                      aligned=True)  # (B*T, C, size, size)
        flip = flip.to(y.device)
        y = torch.where(flip[:, None, None, None], y.flip(-1), y)
        if kind == "rgb":
            y = (y - _MEAN255.to(y.device)) / _STD255.to(y.device)
        else:
            y = (y - 128.0) / 127.0
            y[:, 0] *= 1.0 - 2.0 * flip.to(y.dtype)[:, None, None]  # mirrored horizontal motion
            if channels == 3:
                y = torch.cat([y, y[:, :1]], dim=1)  # [u, v, u]
        return y.view(b, t, y.shape[1], size, size)  # (B*T, C', S, S) -> (B, T, C', S, S)
