"""The teacher cache: teacher outputs precomputed once on the planned views, replayed in training.

`build_cache(cfg)` writes it (`fastkd cache build`); a run with `cache.dir` set trains from it
through `cached_teacher` (no teacher network is built); `verify_cache` and `cache_info` back
`fastkd cache verify` and `fastkd cache info`. The on-disk format is in `layout`.
"""
from __future__ import annotations

from .layout import CacheError, RecordLayout, read_manifest
from .precompute import build_cache, check_cacheable
from .replay import CachedBatches, CachedTeacher, check_data, open_manifest


def cached_teacher(cfg, manifest: dict, train_loader, settings, num_classes: int, device):
    """The `CachedTeacher` of a run and its training loader wrapped to feed it, after the
    checks that need the dataset index and the image settings."""
    check_data(cfg, manifest, train_loader.index, settings, num_classes)
    teacher = CachedTeacher(cfg, manifest, num_classes, device)
    return teacher, CachedBatches(train_loader, teacher, manifest)


__all__ = ["CacheError", "RecordLayout", "read_manifest", "build_cache", "check_cacheable",
           "CachedBatches", "CachedTeacher", "open_manifest", "cached_teacher"]
