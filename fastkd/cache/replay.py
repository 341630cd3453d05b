"""Training from a teacher cache: a `CachedTeacher` in place of the teacher network, and a
loader wrapper that hands it each batch's records.

The loader replays the crops of cached epoch `(epoch − 1) mod E + 1` (`CropPlan(cycle=E)`)
while the sample order still follows the true epoch, so the student sees exactly the views the
teacher saw. `CachedBatches` walks the same sample plan as the loader, gathers the records of
the coming batches on a background thread (memory-mapped shards → one gather per batch →
pinned host memory on a GPU) and gives them to the teacher just before the loader's batch is
yielded; the distillers call `teacher.logits(images)` / `teacher.features(...)` as always.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from fastkd.config import Config
from fastkd.distillers import build_params, get_distiller_class
from fastkd.losses import TopKLogits
from fastkd.models import Features, model_family, stage_info

from .identity import data_mismatches, refuse, static_mismatches, static_request
from .layout import CacheError, RecordLayout, ShardReader, read_manifest
from .meta import teacher_architecture

READ_AHEAD = 3   # batches of records gathered ahead of the step


def open_manifest(cfg: Config) -> dict:
    """The manifest of `cache.dir` after the checks the config alone allows: finished, same
    teacher and plan, and holding what the method reads."""
    manifest = read_manifest(cfg.cache.dir)
    if not manifest.get("complete"):
        raise CacheError(f"cache.dir: the teacher cache at {cfg.cache.dir} is unfinished (its "
                         f"precompute stopped early); rerun `fastkd cache build` to finish it")
    problems = static_mismatches(manifest, static_request(cfg))
    needs = get_distiller_class(cfg.distill.method).needs_for(
        build_params(cfg.distill.method, cfg.distill.params))
    problems += missing_fields(RecordLayout.from_json(manifest["layout"]), needs,
                               cfg.distill.method)
    refuse(cfg.cache.dir, problems)
    return manifest


def missing_fields(layout: RecordLayout, needs, method: str) -> list[str]:
    """What `needs` asks for that `layout` does not hold."""
    held = {s for s, _ in layout.stages}
    problems = []
    if needs.teacher_logits and not layout.logits:
        problems.append(f"distill.method '{method}' needs the teacher logits, which the cache "
                        f"does not hold")
    if needs.teacher_pooled and not layout.pooled_dim:
        problems.append(f"distill.method '{method}' needs the teacher's pooled features, which "
                        f"the cache does not hold")
    lacking = sorted(set(needs.teacher_stages) - held)
    if lacking:
        problems.append(f"distill.method '{method}' needs teacher stage(s) "
                        f"{', '.join(map(str, lacking))}, the cache holds "
                        f"{', '.join(map(str, sorted(held))) or 'none'}")
    return problems


def check_data(cfg: Config, manifest: dict, index, settings, num_classes: int) -> None:
    refuse(cfg.cache.dir, data_mismatches(manifest, index, settings, num_classes))


class CachedTeacher:
    """The `Teacher` interface served from cache records. `model` is the architecture on the
    meta device (shapes for the distillers' projectors, no weights, no compute)."""

    def __init__(self, cfg: Config, manifest: dict, num_classes: int, device: torch.device):
        self.model: nn.Module = teacher_architecture(cfg, num_classes)
        self.family = model_family(self.model)
        self.layout = RecordLayout.from_json(manifest["layout"])
        self.directory = Path(cfg.cache.dir)
        self.epochs = manifest["epochs"]
        self.device = device
        self.current: dict[str, Tensor] | None = None

    @property
    def info(self):
        return stage_info(self.model)

    def to(self, device) -> CachedTeacher:
        self.device = torch.device(device)
        return self

    def train(self, mode: bool = True) -> CachedTeacher:
        return self

    def eval(self) -> CachedTeacher:
        return self

    def describe(self) -> str:
        return (f"teacher cache {self.directory} ({self.epochs} epochs, "
                f"{self.layout.describe()})")

    def _records(self) -> dict[str, Tensor]:
        if self.current is None:
            raise RuntimeError("CachedTeacher called outside a cached training batch")
        return self.current

    def logits(self, images: Tensor) -> Tensor | TopKLogits:
        """B×K fp32 logits, or a `TopKLogits` the losses rebuild (top-k caches)."""
        r = self._records()
        if "logits" in r:
            return r["logits"].float()
        if "values" not in r:
            raise CacheError("the teacher cache holds no logits")
        return TopKLogits(r["values"].float(), r["ids"].long(), r["lse"].float())

    def features(self, images: Tensor, stages: Sequence[int], *, graph: bool = False,
                 with_logits: bool = True) -> Features:
        if graph:
            raise CacheError("a cached teacher cannot run with gradients (teacher_graph methods "
                             "are not cacheable)")
        r = self._records()
        missing = [s for s in stages if f"stage{s}" not in r]
        if missing:
            raise CacheError(f"the teacher cache holds no stage {missing} maps")
        return Features(logits=self.logits(images) if with_logits else None,
                        pooled=r["pooled"].float() if "pooled" in r else None,
                        stages={s: r[f"stage{s}"] for s in stages}, prefix={})

    def run(self, fn, images: Tensor, *, graph: bool = False):
        raise CacheError("a cached teacher cannot run arbitrary teacher blocks; this method is "
                         "not cacheable")


def _to_tensors(records: np.ndarray, pin: bool) -> dict[str, Tensor]:
    out = {}
    for name in records.dtype.names:
        tensor = torch.from_numpy(np.ascontiguousarray(records[name]))
        out[name] = tensor.pin_memory() if pin else tensor
    return out


class CachedBatches:
    """The training loader, with each batch's teacher records handed to the `CachedTeacher`
    before the batch is yielded. Forwards the loader's interface (`len`, `set_epoch`, ...)."""

    def __init__(self, loader, teacher: CachedTeacher, manifest: dict):
        self.loader, self.teacher = loader, teacher
        self.reader = ShardReader(teacher.directory, manifest)
        self.kind = f"{loader.kind}+cache"
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastkd-cache")

    def __getattr__(self, name):          # num_samples, classes, plan, epoch, ...
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.loader.set_epoch(epoch, start_batch)

    def cached_epoch(self, epoch: int) -> int:
        return (epoch - 1) % self.teacher.epochs + 1

    def _gather(self, epoch: int, sample_ids: np.ndarray) -> dict[str, Tensor]:
        pin = self.teacher.device.type == "cuda"
        return _to_tensors(self.reader.gather(self.cached_epoch(epoch), sample_ids), pin)

    def __iter__(self):
        loader = self.loader
        epoch = loader.epoch
        planned = iter(loader.plan.batches(epoch, loader.start_batch))
        pending: deque = deque()

        def submit() -> None:
            batch = next(planned, None)
            if batch is not None:
                pending.append(self._pool.submit(self._gather, epoch, batch.sample_ids))

        for _ in range(READ_AHEAD):
            submit()
        try:
            for batch in loader:
                records = pending.popleft().result()
                submit()
                self.teacher.current = {k: v.to(self.teacher.device, non_blocking=True)
                                        for k, v in records.items()}
                yield batch
        finally:
            self.teacher.current = None
            for future in pending:
                future.cancel()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.loader.close()
