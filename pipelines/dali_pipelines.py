"""DALI graphs for training and evaluation, as small `@pipeline_def` functions.

Both graphs take their per-sample geometry from `fn.external_source`, computed in Python from
the dataset index: the train graph replays `CropPlan` windows (decode only the window with
`fn.decoders.image_slice`, resize it, flip it in `crop_mirror_normalize`); the eval graph
resizes a region of interest that equals timm's "resize the shorter side to size / crop_pct,
then center crop" (same sampling positions, computed for the kept pixels only). Decoding runs
on the CPU (`device="cpu"`, `device_id=None`) or as nvJPEG "mixed" decode with everything after
it on the GPU: `on_gpu` is the one switch.

This module imports DALI at import time; `fastkd.pipelines` imports it only when a DALI loader
is built.
"""
from __future__ import annotations

import nvidia.dali.fn as fn
import nvidia.dali.types as types
from nvidia.dali import pipeline_def

from .settings import ImageSettings, RandAugmentSpec

INTERPOLATION = {"bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC,
                 "nearest": types.INTERP_NN}
# Train outputs from the external source, in this order (see dali_loader.PlanSource).
TRAIN_INPUTS = ("encoded", "anchor", "shape", "flip", "labels", "indices")
EVAL_INPUTS = ("encoded", "roi_start", "roi_end", "labels", "indices")


def _decoder_args(on_gpu: bool, hw_decoder_load: float) -> dict:
    if not on_gpu:
        return {"device": "cpu"}
    # The padding hints preallocate nvJPEG's buffers once for ImageNet-sized images instead of
    # growing them batch after batch (DALI's ResNet-50 example does the same).
    return {"device": "mixed", "hw_decoder_load": hw_decoder_load,
            "device_memory_padding": 211025920, "host_memory_padding": 140544512}


def normalize(images, settings: ImageSettings, *, mirror, fp16: bool, channels_last: bool):
    """uint8 HWC -> normalized float (fp16 for fp16 AMP: DALI has no bf16) in NCHW or NHWC."""
    return fn.crop_mirror_normalize(
        images, mirror=mirror, dtype=types.FLOAT16 if fp16 else types.FLOAT,
        mean=[255 * m for m in settings.mean], std=[255 * s for s in settings.std],
        output_layout="HWC" if channels_last else "CHW")


def strong_augment(images, settings: ImageSettings, *, rand_augment: RandAugmentSpec | None,
                   color_jitter: float):
    """RandAugment (timm's magnitude scale: level m of 10) or color jitter, on uint8 HWC."""
    if rand_augment is not None:
        from nvidia.dali.auto_aug import rand_augment as dali_rand_augment
        # 11 bins make DALI's magnitude m/10, as timm's `_LEVEL_DENOM`; translations reach 45% of
        # the side as timm's `translate_const`. DALI has no magnitude noise (timm's `mstd`).
        return dali_rand_augment.rand_augment(
            images, n=rand_augment.num_ops, m=min(rand_augment.magnitude, 10),
            num_magnitude_bins=11, shape=(settings.img_size, settings.img_size),
            max_translate_rel=0.45, monotonic_mag=rand_augment.increasing,
            interp_type=INTERPOLATION[settings.interpolation])
    if color_jitter > 0:
        span = [max(0.0, 1 - color_jitter), 1 + color_jitter]
        return fn.color_twist(images, brightness=fn.random.uniform(range=span),
                              contrast=fn.random.uniform(range=span),
                              saturation=fn.random.uniform(range=span))
    return images


@pipeline_def(enable_conditionals=True)
def train_pipeline(source, settings: ImageSettings, on_gpu: bool, hw_decoder_load: float,
                   fp16: bool, channels_last: bool, rand_augment: RandAugmentSpec | None,
                   color_jitter: float):
    """Planned RandomResizedCrop + flip (+ optional strong augmentation), normalized."""
    encoded, anchor, shape, flip, labels, indices = fn.external_source(
        source=source, num_outputs=len(TRAIN_INPUTS), batch=True, batch_info=True)
    images = fn.decoders.image_slice(
        encoded, anchor, shape, axis_names="HW", normalized_anchor=False, normalized_shape=False,
        output_type=types.RGB, adjust_orientation=False,   # PIL ignores EXIF orientation too
        **_decoder_args(on_gpu, hw_decoder_load))
    images = fn.resize(images, size=[settings.img_size, settings.img_size], antialias=True,
                       interp_type=INTERPOLATION[settings.interpolation])
    images = strong_augment(images, settings, rand_augment=rand_augment, color_jitter=color_jitter)
    images = normalize(images, settings, mirror=flip, fp16=fp16, channels_last=channels_last)
    return (images, *_on_device(on_gpu, labels, indices))


def _on_device(on_gpu: bool, *outputs):
    """Labels and indices leave a GPU graph on the GPU (no pageable host copy per batch)."""
    return tuple(out.gpu() for out in outputs) if on_gpu else outputs


@pipeline_def
def eval_pipeline(source, settings: ImageSettings, on_gpu: bool, hw_decoder_load: float,
                  fp16: bool, channels_last: bool):
    """timm's eval transform: the center-crop region of the image resized to the output size."""
    encoded, roi_start, roi_end, labels, indices = fn.external_source(
        source=source, num_outputs=len(EVAL_INPUTS), batch=True, batch_info=True)
    images = fn.decoders.image(encoded, output_type=types.RGB, adjust_orientation=False,
                               **_decoder_args(on_gpu, hw_decoder_load))
    images = fn.resize(images, size=[settings.img_size, settings.img_size], roi_start=roi_start,
                       roi_end=roi_end, roi_relative=False, antialias=True,
                       interp_type=INTERPOLATION[settings.interpolation])
    images = normalize(images, settings, mirror=0, fp16=fp16, channels_last=channels_last)
    return (images, *_on_device(on_gpu, labels, indices))
