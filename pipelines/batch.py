"""The one batch type every loader yields, and what both loaders share: the epoch bookkeeping
(`PlannedLoader`) and the batch-level steps (`BatchFinisher`).

`BatchFinisher` takes a decoded batch already on the target device and applies what is done
per batch rather than per image: the dtype (AMP) and memory format, timm's random erasing, and
timm's mixup/cutmix (which turns the labels into soft targets, label smoothing included).
Mixup draws from numpy's global RNG inside timm; the finisher seeds it per batch from the
counter generator and restores the caller's state, so mixup is reproducible and resumable.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from .counter_rng import STREAM_MIXUP, hash_keys
from .replacement import SampleReplacer


class Batch(NamedTuple):
    images: Tensor    # B x 3 x H x W on the device, normalized (AMP dtype, channels_last if asked)
    labels: Tensor    # int64 (B,), or float (B, K) soft targets when mixup/cutmix is on
    indices: Tensor   # int64 (B,) dataset index of each sample; -1 marks padding


class PlannedLoader:
    """Base of the DALI and torch loaders: `len()` is the plan's batches per epoch, and
    `set_epoch(epoch, start_batch)` chooses what the next `iter()` yields."""
    kind: str

    def __init__(self, index, plan, finisher: BatchFinisher, device: torch.device):
        self.index, self.plan, self.finisher, self.device = index, plan, finisher, device
        self.num_samples, self.classes = len(index), index.classes
        self.num_classes = finisher.num_classes
        self.epoch, self.start_batch = 0, 0
        self.replacer = SampleReplacer(index)

    def take_replaced(self) -> list[tuple[str, str]]:
        """Samples replaced because their file broke after indexing, since the last call."""
        return self.replacer.take()

    def __len__(self) -> int:
        return len(self.plan)

    def close(self) -> None:
        """Release worker processes or threads (the loader is not used afterwards)."""

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if not 0 <= start_batch <= len(self.plan):
            raise ValueError(f"start_batch {start_batch} outside 0..{len(self.plan)}")
        self.epoch, self.start_batch = epoch, start_batch


class BatchFinisher:
    """Dtype, layout, random erasing and mixup/cutmix on a device batch."""

    def __init__(self, data, *, train: bool, seed: int, rank: int, world_size: int,
                 amp_dtype: torch.dtype | None, channels_last: bool, num_classes: int,
                 device: torch.device):
        self.amp_dtype, self.channels_last = amp_dtype, channels_last
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_classes = num_classes
        self.erase = self.mixup = None
        if train and data.reprob > 0:
            from timm.data.random_erasing import RandomErasing
            # 'pixel' mode (per-pixel normal noise) is timm train.py's default `remode`.
            self.erase = RandomErasing(probability=data.reprob, mode="pixel", device=str(device))
        if train and (data.mixup > 0 or data.cutmix > 0):
            from timm.data import Mixup
            self.mixup = Mixup(mixup_alpha=data.mixup, cutmix_alpha=data.cutmix,
                               prob=data.mixup_prob, switch_prob=data.mixup_switch_prob,
                               mode="batch", label_smoothing=data.label_smoothing,
                               num_classes=num_classes)

    def __call__(self, images: Tensor, labels: Tensor, indices: Tensor, epoch: int,
                 batch_no: int) -> Batch:
        """`images` normalized float (NCHW, any strides) on the device; `labels` int64."""
        if self.erase is not None:
            images = self.erase(images.float())
        if self.mixup is not None:
            images, labels = self._mix(images.float(), labels, epoch, batch_no)
        # Dtype and layout in one copy, none when both already match. `to` returns its input
        # unchanged when the dtype matches, whatever the strides: `contiguous` covers that case.
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        images = images.to(dtype=self.amp_dtype or torch.float32, memory_format=fmt)
        return Batch(images.contiguous(memory_format=fmt), labels, indices)

    def _mix(self, images: Tensor, labels: Tensor, epoch: int, batch_no: int):
        """timm's batch mixup; an odd last batch mixes its even prefix and keeps the last
        sample unmixed (timm asserts an even batch)."""
        key = hash_keys(self.seed, STREAM_MIXUP, epoch,
                        np.array([batch_no * self.world_size + self.rank]))[0]
        saved = np.random.get_state()
        np.random.seed(int(key % (2**32)))
        try:
            even = images.shape[0] - images.shape[0] % 2
            if even == images.shape[0]:
                return self.mixup(images, labels)
            from timm.data.mixup import mixup_target
            head, soft = self.mixup(images[:even], labels[:even]) if even else (images[:0], None)
            tail = mixup_target(labels[even:], self.mixup.num_classes, 1.0,
                                self.mixup.label_smoothing)
            soft = tail if soft is None else torch.cat([soft, tail])
            return torch.cat([head, images[even:]]), soft
        finally:
            np.random.set_state(saved)
