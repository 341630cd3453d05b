"""What the image pipelines need from the config: one resolution of data fields vs model_cfg.

Explicit data-config fields win; `None` means "the student's own value" from timm's
`resolve_data_config` (`model_cfg`). Both loaders read the result, so DALI and the torch
fallback cannot disagree on size, crop_pct, interpolation or normalization.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

_DEFAULT_CROP_PCT = 0.875   # timm's DEFAULT_CROP_PCT


@dataclass(frozen=True)
class ImageSettings:
    img_size: int
    crop_pct: float
    interpolation: str                      # "bilinear" | "bicubic" | "nearest"
    mean: tuple[float, float, float]        # in [0, 1] units, as timm gives them
    std: tuple[float, float, float]

    @property
    def eval_resize(self) -> int:
        """Shorter side before the eval center crop: floor(size / crop_pct), as timm."""
        return int(self.img_size / self.crop_pct)


def _model_size(model_cfg: dict) -> int | None:
    size = model_cfg.get("input_size")
    if size is None:
        return None
    height, width = size[-2], size[-1]
    if height != width:
        raise NotImplementedError(f"non-square input size {size} is not supported yet")
    return int(height)


def resolve_image_settings(data, model_cfg: dict | None) -> ImageSettings:
    """Merge the data section with the student's timm data config (explicit fields first)."""
    model_cfg = model_cfg or {}
    size = data.img_size or _model_size(model_cfg) or 224
    interpolation = data.interpolation or model_cfg.get("interpolation") or "bilinear"
    if interpolation == "random":   # timm's train-time default; one filter keeps DALI and torch equal
        interpolation = "bicubic"
    if interpolation not in ("bilinear", "bicubic", "nearest"):
        raise ValueError(f"interpolation {interpolation!r} not supported "
                         f"(bilinear, bicubic, nearest)")
    mean = tuple(data.mean or model_cfg.get("mean") or (0.485, 0.456, 0.406))
    std = tuple(data.std or model_cfg.get("std") or (0.229, 0.224, 0.225))
    crop_pct = data.crop_pct or model_cfg.get("crop_pct") or _DEFAULT_CROP_PCT
    return ImageSettings(int(size), float(crop_pct), interpolation, mean, std)


def replayable(data) -> bool:
    """Whether the train augmentation is only CropPlan (crop + flip), so a teacher cache that
    replays the plan sees exactly the student's views. Any extra random augmentation
    (RandAugment, color jitter, random erasing, mixup/cutmix) makes the views unplannable."""
    return not (data.auto_augment or data.color_jitter > 0 or data.reprob > 0
                or data.mixup > 0 or data.cutmix > 0)


@dataclass(frozen=True)
class RandAugmentSpec:
    """timm's `rand-m9-n2-mstd0.5-inc1` string, parsed."""
    magnitude: int = 9
    num_ops: int = 2
    magnitude_std: float = 0.0
    increasing: bool = False


def parse_rand_augment(config: str) -> RandAugmentSpec:
    parts = config.split("-")
    if parts[0] != "rand":
        raise ValueError(f"only RandAugment (`rand-...`) is supported, got {config!r}")
    values = {}
    for part in parts[1:]:
        match = re.fullmatch(r"([a-z]+)([0-9.]+)", part)
        if not match:
            raise ValueError(f"cannot parse {part!r} in {config!r}")
        values[match.group(1)] = float(match.group(2))
    return RandAugmentSpec(int(values.get("m", 9)), int(values.get("n", 2)),
                           float(values.get("mstd", 0.0)), bool(values.get("inc", 0)))
