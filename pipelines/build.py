"""`build_loader`: the one entry point the trainer uses, whatever loader runs underneath.

It resolves the index, the image settings, the sample plan and the batch finisher once, then
hands them to the DALI loader (default when DALI imports) or the torch fallback; both yield
`Batch(images, labels, indices)` with the same order, sharding and crop windows.
"""
from __future__ import annotations

import importlib.util
import logging

import torch

from .batch import BatchFinisher
from .crop_plan import CropPlan
from .datasets import DataError, load_index
from .sampling import ShardPlan
from .settings import resolve_image_settings

logger = logging.getLogger(__name__)
_notice_printed = False


def dali_available() -> bool:
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:   # no `nvidia` namespace package at all
        return False


def choose_kind(data, device: torch.device) -> str:
    """"dali-gpu" | "dali-cpu" | "torch" from `data.loader`, `data.dali_device` and the device."""
    global _notice_printed
    if data.loader not in ("auto", "dali", "torch"):
        raise ValueError(f"data.loader must be auto, dali or torch, got {data.loader!r}")
    if data.loader == "torch":
        return "torch"
    if not dali_available():
        if data.loader == "dali":
            raise RuntimeError("data.loader=dali but NVIDIA DALI is not importable "
                               "(pip install nvidia-dali-cuda120)")
        if not _notice_printed:
            logger.info("fastkd: NVIDIA DALI not importable; using the PyTorch DataLoader fallback")
            _notice_printed = True
        return "torch"
    dali_device = data.dali_device
    if dali_device == "auto":
        dali_device = "gpu" if device.type == "cuda" else "cpu"
    if dali_device == "gpu" and device.type != "cuda":
        raise ValueError(f"data.dali_device=gpu needs a CUDA device, got {device}")
    return f"dali-{dali_device}"


def build_loader(data, *, split: str, train: bool, batch_size: int, model_cfg: dict,
                 seed: int, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu", amp_dtype: torch.dtype | None = None,
                 channels_last: bool = False, num_classes: int | None = None,
                 index_dir: str | None = None, crop_cycle: int | None = None, plan=None):
    """A loader over `data.root/split` for this rank: iterate it after `set_epoch(epoch)`.

    Train loaders shuffle with a (seed, epoch) permutation and crop with `CropPlan(seed)`;
    eval loaders keep the dataset order, never drop samples, and pad ranks with index -1.
    `crop_cycle` = E replays the crops of epochs 1..E (a teacher cache of E epochs); `plan`
    replaces the sample plan (anything with `ShardPlan`'s `batches`, `len`, `batch_size`,
    `seed` and `rank`: the teacher cache's precompute walks its own shards).
    """
    device = torch.device(device)
    index = load_index(data.root, split, index_dir=index_dir, workers=max(4, data.num_workers or 0))
    if rank == 0:
        index.warn_bad_files()
    num_classes = num_classes or getattr(data, "num_classes", None) or len(index.classes)
    if int(index.labels.max()) >= num_classes:
        raise DataError(f"label {int(index.labels.max())} in {data.root}/{split} is out of range "
                        f"for {num_classes} classes")
    settings = resolve_image_settings(data, model_cfg)
    if plan is None:
        plan = ShardPlan(len(index), batch_size, seed=seed, shuffle=train, rank=rank,
                         world_size=world_size, drop_last=train and data.drop_last)
    crop_plan = CropPlan(seed, data.scale, data.ratio, data.hflip, crop_cycle) if train else None
    finisher = BatchFinisher(data, train=train, seed=seed, rank=rank, world_size=world_size,
                             amp_dtype=amp_dtype, channels_last=channels_last,
                             num_classes=num_classes, device=device)
    kind = choose_kind(data, device)
    if kind == "torch":
        from .torch_loader import TorchLoader, extra_train_transform
        extra = extra_train_transform(data, settings) if train else None
        return TorchLoader(index, plan, settings, crop_plan=crop_plan, finisher=finisher,
                           device=device, num_workers=data.num_workers, extra_transform=extra)
    from .dali_loader import DaliLoader
    return DaliLoader(index, plan, settings, data, crop_plan=crop_plan, finisher=finisher,
                      device=device, on_gpu=kind == "dali-gpu", amp_dtype=amp_dtype,
                      channels_last=channels_last)
