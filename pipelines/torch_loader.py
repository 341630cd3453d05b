"""The plain PyTorch fallback: a DataLoader over the same index, plan, order and sharding as DALI.

Workers decode with PIL and return uint8 CHW tensors; normalization runs once per batch on the
target device (as timm's prefetcher does), which keeps the worker-to-main transfer 4x smaller
than float. Train: the CropPlan window (PIL crop, resize, flip), then timm's RandAugment or
color jitter when configured. Eval: timm's own eval transform (resize shorter side to
size / crop_pct, center crop), so the fallback is the reference the DALI pipeline is checked
against.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .batch import BatchFinisher, PlannedLoader
from .crop_plan import CropPlan
from .datasets import DatasetIndex
from .replacement import SampleReplacer
from .sampling import ShardPlan
from .settings import ImageSettings

_PIL_FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


def open_rgb(path: str) -> Image.Image:
    """Decode any supported file to RGB (grayscale, CMYK, palette and alpha images included)."""
    with Image.open(path) as img:
        return img.convert("RGB")


def planned_crop(img: Image.Image, window: tuple[int, int, int, int, bool], size: int,
                 interpolation: str) -> Image.Image:
    """torchvision's resized_crop on PIL (crop, then resize) and the planned flip."""
    top, left, height, width, flip = window
    img = img.crop((left, top, left + width, top + height)).resize((size, size),
                                                                   _PIL_FILTERS[interpolation])
    return img.transpose(Image.FLIP_LEFT_RIGHT) if flip else img


def extra_train_transform(data, settings: ImageSettings):
    """timm's secondary train transforms: RandAugment, else color jitter (timm disables color
    jitter when RandAugment is on)."""
    if data.auto_augment:
        from timm.data import rand_augment_transform
        hparams = dict(translate_const=int(settings.img_size * 0.45),
                       img_mean=tuple(min(255, round(255 * m)) for m in settings.mean),
                       interpolation=_PIL_FILTERS[settings.interpolation])
        return rand_augment_transform(data.auto_augment, hparams)
    if data.color_jitter > 0:
        from torchvision.transforms import ColorJitter
        return ColorJitter(data.color_jitter, data.color_jitter, data.color_jitter)
    return None


class PlannedImageDataset(Dataset):
    """Item key (epoch, sample_id, reported_index) -> (uint8 CHW image, label, reported index,
    a note naming the file when a broken one was replaced, else '')."""

    def __init__(self, index: DatasetIndex, settings: ImageSettings, crop_plan: CropPlan | None,
                 replacer: SampleReplacer, extra_transform=None):
        self.index, self.settings, self.crop_plan = index, settings, crop_plan
        self.replacer = replacer
        self.extra_transform = extra_transform
        self.eval_transform = None
        if crop_plan is None:
            from timm.data import create_transform
            # use_prefetcher=True: timm stops at a uint8 tensor, normalization happens on device.
            self.eval_transform = create_transform(
                settings.img_size, is_training=False, interpolation=settings.interpolation,
                crop_pct=settings.crop_pct, use_prefetcher=True)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: tuple[int, int, int]):
        epoch, sample_id, reported = key
        sample_id, img, note = self.replacer.open_image(sample_id, open_rgb)
        reported = sample_id if reported >= 0 else reported
        if self.crop_plan is None:
            chw = self.eval_transform(img)
        else:
            # Sizes from the index (file headers), the same numbers the DALI pipeline gets.
            window = self.crop_plan.window(epoch, sample_id, int(self.index.heights[sample_id]),
                                           int(self.index.widths[sample_id]))
            img = planned_crop(img, window, self.settings.img_size, self.settings.interpolation)
            if self.extra_transform is not None:
                img = self.extra_transform(img)
            chw = torch.from_numpy(np.asarray(img).transpose(2, 0, 1).copy())
        return chw, int(self.index.labels[sample_id]), reported, note


class _EpochBatchSampler:
    """Yields this rank's batches of item keys for the loader's current epoch."""

    def __init__(self, loader: "TorchLoader"):
        self.loader = loader

    def __iter__(self):
        loader = self.loader
        for batch in loader.plan.batches(loader.epoch, loader.start_batch):
            yield [(loader.epoch, int(s), int(i)) for s, i in zip(batch.sample_ids, batch.indices)]

    def __len__(self) -> int:
        return len(self.loader.plan) - self.loader.start_batch


class TorchLoader(PlannedLoader):
    """DataLoader-backed loader; see `fastkd.pipelines.build_loader` for the contract."""
    kind = "torch"

    def __init__(self, index: DatasetIndex, plan: ShardPlan, settings: ImageSettings, *,
                 crop_plan: CropPlan | None, finisher: BatchFinisher, device: torch.device,
                 num_workers: int, extra_transform=None):
        super().__init__(index, plan, finisher, device)
        self.settings = settings
        self.mean = torch.tensor(settings.mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(settings.std, device=device).view(1, 3, 1, 1) * 255
        dataset = PlannedImageDataset(index, settings, crop_plan, self.replacer, extra_transform)
        # An explicit generator: without one, starting the workers draws their base seed from
        # the global torch RNG, which shifts dropout/drop-path streams and breaks exact resume.
        workers_seed = torch.Generator().manual_seed(plan.seed * 1009 + plan.rank)
        self.dataloader = DataLoader(
            dataset, batch_sampler=_EpochBatchSampler(self), num_workers=num_workers,
            pin_memory=device.type == "cuda", persistent_workers=num_workers > 0,
            generator=workers_seed)

    def close(self) -> None:
        """Shut the persistent workers down now: the DataLoader owns their iterator, and
        dropping it joins them at once, where interpreter exit waits about 20 s for them."""
        self.dataloader = None

    def __iter__(self):
        batch_no = self.start_batch
        for images, labels, indices, notes in self.dataloader:
            for note in filter(None, notes):      # replaced in a worker process
                self.replacer.record(note)
            # In place on the fresh float copy: one batch-sized allocation instead of three.
            images = images.to(self.device, non_blocking=True).float()
            images = images.sub_(self.mean).div_(self.std)
            labels = labels.to(self.device, non_blocking=True)
            indices = indices.to(self.device, non_blocking=True)
            yield self.finisher(images, labels, indices, self.epoch, batch_no)
            batch_no += 1
