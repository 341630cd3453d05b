"""What a cache was made from, and what a run asks of it.

A cached record is the teacher's output on one planned view, so a cache serves a run only when
everything that shapes that view or that output is the same: the teacher (name, arguments,
weights), the data (paths, labels, image sizes), the crop plan (seed, scale, ratio, flip), the
input size, interpolation and normalisation, and the class count. Each difference is named in
its own message; the run stops at start-up instead of learning from another teacher's answers.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from fastkd.config import Config
from fastkd.pipelines import DatasetIndex
from fastkd.pipelines.settings import ImageSettings, replayable

from .layout import CacheError, sha256_file


def teacher_identity(cfg: Config) -> dict:
    """The teacher's name, arguments and weights (the checkpoint file's sha256)."""
    t = cfg.teacher
    checkpoint = None if t.checkpoint is None else sha256_file(Path(t.checkpoint))
    return {"name": t.name, "kwargs": dict(t.kwargs), "checkpoint_sha256": checkpoint,
            "pretrained": t.pretrained, "use_ema": t.use_ema}


def plan_identity(cfg: Config) -> dict:
    d = cfg.data
    return {"seed": cfg.train.seed, "scale": list(d.scale), "ratio": list(d.ratio),
            "hflip": d.hflip}


def image_identity(settings: ImageSettings) -> dict:
    return {"img_size": settings.img_size, "interpolation": settings.interpolation,
            "mean": list(settings.mean), "std": list(settings.std)}


def data_fingerprint(index: DatasetIndex) -> str:
    """sha256 over the split's relative paths, labels and image sizes, in index order (the
    order that gives each sample its index)."""
    digest = hashlib.sha256()
    digest.update("\n".join(index.paths).encode())
    for array in (index.labels, index.heights, index.widths):
        digest.update(np.ascontiguousarray(array, dtype=np.int64).tobytes())
    return digest.hexdigest()


def unreplayable_augmentation(cfg: Config) -> list[str]:
    """The data keys that add randomness a cache cannot replay (beyond crop + flip)."""
    d = cfg.data
    if replayable(d):
        return []
    named = {"data.auto_augment": d.auto_augment, "data.color_jitter": d.color_jitter,
             "data.reprob": d.reprob, "data.mixup": d.mixup, "data.cutmix": d.cutmix}
    return [f"{key}={value}" for key, value in named.items() if value]


def _differences(cached: dict, wanted: dict, keys: dict[str, str]) -> list[str]:
    out = []
    for key, label in keys.items():
        if cached.get(key) != wanted.get(key):
            out.append(f"{label}: the cache was built with {cached.get(key)!r}, this run has "
                       f"{wanted.get(key)!r}")
    return out


def static_request(cfg: Config) -> dict:
    """The parts of a manifest that the config alone determines."""
    return {"teacher": teacher_identity(cfg), "plan": plan_identity(cfg),
            "data": {"split": cfg.data.train_split}}


def static_mismatches(cached: dict, wanted: dict) -> list[str]:
    """Differences in teacher, crop plan and split between two manifest-shaped dicts."""
    problems = _differences(cached["teacher"], wanted["teacher"], {
        "name": "teacher.name", "kwargs": "teacher.kwargs",
        "checkpoint_sha256": "teacher.checkpoint (sha256 of the weights)",
        "pretrained": "teacher.pretrained", "use_ema": "teacher.use_ema"})
    problems += _differences(cached["plan"], wanted["plan"], {
        "seed": "train.seed (the crop plan's seed)", "scale": "data.scale",
        "ratio": "data.ratio", "hflip": "data.hflip"})
    problems += _differences(cached["data"], wanted["data"], {"split": "data.train_split"})
    return problems


def data_mismatches(manifest: dict, index: DatasetIndex, settings: ImageSettings,
                    num_classes: int) -> list[str]:
    """Differences that need the dataset index and the resolved image settings."""
    problems = _differences(manifest["image"], image_identity(settings), {
        "img_size": "data.img_size (input size)", "interpolation": "data.interpolation",
        "mean": "data.mean (normalisation)", "std": "data.std (normalisation)"})
    data = manifest["data"]
    if data["num_samples"] != len(index) or data["fingerprint"] != data_fingerprint(index):
        problems.append(f"data: the training split differs from the one cached ({data['num_samples']} "
                        f"samples then, {len(index)} now, or other paths, labels or image sizes)")
    if manifest["layout"]["num_classes"] != num_classes:
        problems.append(f"data.num_classes: the cache holds {manifest['layout']['num_classes']} "
                        f"classes, this run has {num_classes}")
    return problems


def refuse(directory, problems: list[str]) -> None:
    if problems:
        raise CacheError(f"cache.dir: the teacher cache at {directory} cannot serve this run:\n  - "
                         + "\n  - ".join(problems))
