"""The train augmentation as data: RandomResizedCrop window and flip of every (epoch, sample).

`CropPlan(seed).windows(epoch, indices, heights, widths)` follows torchvision's
`RandomResizedCrop.get_params` step for step (area scale uniform, aspect ratio log-uniform,
10 tries, then the center crop clamped to the ratio range), but every uniform comes from
`counter_rng`, so the window of sample `i` in epoch `e` is a pure function of
`(seed, e, i, image size)`. The DALI pipeline replays it through `fn.decoders.image_slice`, the
torch fallback through a PIL crop, and the teacher cache through the same call.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .counter_rng import STREAM_CROP, uniforms

_TRIES = 10
# Per try: area scale, log aspect ratio, top, left. Then one draw for the flip.
_DRAWS_PER_TRY = 4
_N_DRAWS = _TRIES * _DRAWS_PER_TRY + 1


class CropWindows(NamedTuple):
    """Per-sample crop windows in source-image pixels (int64 arrays) and flip bits (bool)."""
    top: np.ndarray
    left: np.ndarray
    height: np.ndarray
    width: np.ndarray
    flip: np.ndarray


class CropPlan:
    """Replayable RandomResizedCrop + horizontal flip (torchvision semantics)."""

    def __init__(self, seed: int, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: float = 0.5,
                 cycle: int | None = None):
        if not (0 < scale[0] <= scale[1]) or not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"bad RandomResizedCrop ranges: scale={scale}, ratio={ratio}")
        if cycle is not None and cycle < 1:
            raise ValueError(f"cycle must be at least 1, got {cycle}")
        self.seed = int(seed)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.hflip = float(hflip)
        self.cycle = cycle

    def __repr__(self) -> str:
        return (f"CropPlan(seed={self.seed}, scale={self.scale}, ratio={self.ratio}, "
                f"hflip={self.hflip}, cycle={self.cycle})")

    def planned_epoch(self, epoch: int) -> int:
        """The epoch whose windows `epoch` replays: itself, or with `cycle` = E (a teacher cache
        of E planned epochs) epochs 1..E again and again, (epoch − 1) mod E + 1."""
        return epoch if self.cycle is None else (epoch - 1) % self.cycle + 1

    def windows(self, epoch: int, indices, heights, widths) -> CropWindows:
        """Crop windows for samples `indices` whose images are `heights` x `widths`."""
        epoch = self.planned_epoch(epoch)
        indices = np.atleast_1d(np.asarray(indices, dtype=np.int64))
        H = np.atleast_1d(np.asarray(heights, dtype=np.int64))
        W = np.atleast_1d(np.asarray(widths, dtype=np.int64))
        u = uniforms(self.seed, STREAM_CROP, epoch, indices, _N_DRAWS)
        top, left, h, w = self._center_fallback(H, W)
        found = np.zeros(len(indices), dtype=bool)
        area = (H * W).astype(np.float64)
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for t in range(_TRIES):
            u_area, u_ratio, u_top, u_left = u[:, t * _DRAWS_PER_TRY:(t + 1) * _DRAWS_PER_TRY].T
            target_area = area * (self.scale[0] + u_area * (self.scale[1] - self.scale[0]))
            aspect = np.exp(log_lo + u_ratio * (log_hi - log_lo))
            # np.rint rounds half to even, like Python's round() in torchvision.
            tw = np.rint(np.sqrt(target_area * aspect)).astype(np.int64)
            th = np.rint(np.sqrt(target_area / aspect)).astype(np.int64)
            ok = ~found & (tw > 0) & (tw <= W) & (th > 0) & (th <= H)
            # torch.randint(0, n + 1) is uniform over 0..n; floor(u * (n + 1)) is the same law.
            top = np.where(ok, np.floor(u_top * (H - th + 1)).astype(np.int64), top)
            left = np.where(ok, np.floor(u_left * (W - tw + 1)).astype(np.int64), left)
            h = np.where(ok, th, h)
            w = np.where(ok, tw, w)
            found |= ok
        flip = u[:, -1] < self.hflip
        return CropWindows(top, left, h, w, flip)

    def window(self, epoch: int, index: int, height: int, width: int) -> tuple[int, int, int, int, bool]:
        """(top, left, height, width, flip) of one sample; see `windows`."""
        win = self.windows(epoch, [index], [height], [width])
        return (int(win.top[0]), int(win.left[0]), int(win.height[0]), int(win.width[0]),
                bool(win.flip[0]))

    def _center_fallback(self, H: np.ndarray, W: np.ndarray):
        """torchvision's fallback: the whole image, clamped to the allowed aspect-ratio range."""
        in_ratio = W / H
        lo, hi = self.ratio
        w = np.where(in_ratio < lo, W, np.where(in_ratio > hi, np.rint(H * hi), W)).astype(np.int64)
        h = np.where(in_ratio < lo, np.rint(W / lo), H).astype(np.int64)
        return (H - h) // 2, (W - w) // 2, h, w


def center_crop_rois(heights, widths, img_size: int, resize_shorter: int):
    """timm's eval geometry as a region of the source image: (start, end) float arrays (N, 2),
    rows then columns.

    timm resizes the shorter side to `resize_shorter` (the longer to
    int(resize_shorter * long / short), torchvision's rounding) and center-crops `img_size`
    (offset int(round((side - img_size) / 2))). Resizing the matching source region straight to
    `img_size` samples the very same positions, without computing the pixels thrown away.
    """
    H = np.asarray(heights, dtype=np.float64)
    W = np.asarray(widths, dtype=np.float64)
    if resize_shorter < img_size:
        raise ValueError(f"eval resize {resize_shorter} is smaller than the crop {img_size} "
                         f"(crop_pct > 1 is not supported)")
    short = np.minimum(H, W)
    long_side = np.floor(resize_shorter * np.maximum(H, W) / short)
    new_h = np.where(H <= W, resize_shorter, long_side)
    new_w = np.where(H <= W, long_side, resize_shorter)
    top = np.round((new_h - img_size) / 2.0)     # half to even, like Python's round()
    left = np.round((new_w - img_size) / 2.0)
    scale_y, scale_x = H / new_h, W / new_w
    start = np.stack([top * scale_y, left * scale_x], axis=1)
    end = np.stack([(top + img_size) * scale_y, (left + img_size) * scale_x], axis=1)
    return start.astype(np.float32), end.astype(np.float32)
