"""Frame transforms of the prepared video datasets (SPEC section 2, the authors' CREMA-D code).

RGB    training: RandomResizedCrop(size) (scale 0.08-1, aspect 3/4-4/3) and a horizontal flip with
       probability 0.5, drawn for each frame on its own, as the authors' loader does; evaluation:
       resize to size x size. Then ImageNet mean/std.
Flow   (u, v) images written by the preparation tool: the same crop and flip for u and v of one
       frame (a flip also negates u: the motion is mirrored); values mapped back to [-1, 1] in
       units of the stored bound, (q - 128) / 127 (not rescaled by the crop). Optionally
       [u, v, u] for encoders that want three channels.
Random draws use torch's generator, which the trainer seeds per epoch (and per DataLoader worker).
"""
from __future__ import annotations

from typing import Callable

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
