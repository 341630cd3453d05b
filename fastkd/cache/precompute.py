"""`fastkd cache build`: the frozen teacher over `cache.epochs` planned epochs, once.

The views are the training views: the same loader (DALI by default), `CropPlan`, resize,
interpolation, normalisation, AMP dtype and memory format as `fastkd train`, so a record is
what the online teacher would have computed at that step. Only the sample order differs: the
precompute walks each shard in index order, which the (epoch, index)-keyed plan makes free.

Work is split by (epoch, shard) over the global ranks of a torchrun launch, and a shard's
content does not depend on who computed it, so any world size writes the same files. A rerun
after a crash (SIGKILL included) recomputes only the shards without a finished sidecar.
"""
from __future__ import annotations

import logging
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

import fastkd
from fastkd.build import (amp_dtype, budget_threads, build_teacher, count_classes,
                          index_splits_first_on_rank0)
from fastkd.config import Config, ConfigError, config_to_dict
from fastkd.distillers import build_params, get_distiller_class
from fastkd.distributed import World, barrier, init_world, shutdown_world
from fastkd.losses import topk_from_logits
from fastkd.models import Teacher, stage_info
from fastkd.pipelines import build_loader, load_index
from fastkd.pipelines.sampling import RankBatch
from fastkd.pipelines.settings import resolve_image_settings
from fastkd.projectors import pooled_dim

from .identity import (data_fingerprint, image_identity, plan_identity, refuse, static_mismatches,
                       teacher_identity, unreplayable_augmentation)
from .layout import (FORMAT, FP16_MAX, MANIFEST, VERSION, CacheError, RecordLayout, ShardSpec,
                     ShardWriter, finished_entry, read_manifest, shard_specs, write_json_atomic)
from .meta import student_data_config

logger = logging.getLogger(__name__)
_PROBE_LIMIT = 1024   # the largest precompute batch tried on a GPU


def check_cacheable(cfg: Config) -> None:
    """What no cache can do, refused from the config alone: no directory, a method whose
    teacher outputs cannot be replayed, augmentation beyond crop + flip, a bad k."""
    c = cfg.cache
    if c.dir is None:
        raise ConfigError("cache.dir: not set (the directory the teacher cache is written to)")
    method = get_distiller_class(cfg.distill.method)
    needs = method.needs_for(build_params(cfg.distill.method, cfg.distill.params))
    if not needs.teacher:
        raise ConfigError(f"cache.dir: distill.method '{method.name}' uses no teacher; there is "
                          f"nothing to cache")
    if not needs.cacheable:
        raise ConfigError(f"cache.dir: distill.method '{method.name}' cannot be served by a "
                          f"teacher cache (it needs the live teacher: gradients through it, "
                          f"its weights, or its internal blocks); remove cache.dir")
    if cfg.teacher.train_mode:
        raise ConfigError("cache.dir: teacher.train_mode runs the teacher with BatchNorm batch "
                          "statistics and drop-path, so its outputs depend on the batch and on "
                          "random draws that no cache can replay; set teacher.train_mode=false "
                          "or remove cache.dir")
    extra = unreplayable_augmentation(cfg)
    if extra:
        raise ConfigError(f"cache.dir: the teacher must see the student's very view, and "
                          f"{', '.join(extra)} add(s) randomness no cache can replay (only "
                          f"RandomResizedCrop + flip can be planned); turn it off or remove "
                          f"cache.dir")
    if c.topk < 0:
        raise ConfigError(f"cache.topk: {c.topk} must be 0 (all logits) or a positive k")
    for key, value in (("cache.shard_size", c.shard_size), ("cache.epochs", c.epochs),
                       ("cache.batch_size", c.batch_size)):
        if value is not None and value < 1:
            raise ConfigError(f"{key}: {value} must be at least 1")


def required_layout(cfg: Config, teacher_model: torch.nn.Module, num_classes: int,
                    input_size: tuple[int, int, int]) -> RecordLayout:
    """The record the config's method needs, read from its `Needs`."""
    needs = get_distiller_class(cfg.distill.method).needs_for(
        build_params(cfg.distill.method, cfg.distill.params))
    stages = ()
    if needs.teacher_stages:
        info = stage_info(teacher_model, input_size)
        stages = tuple((s, (info[s].channels, info[s].height, info[s].width))
                       for s in sorted(needs.teacher_stages))
    topk = cfg.cache.topk if cfg.cache.topk < num_classes else 0
    return RecordLayout(num_classes=num_classes, topk=topk, logits_dtype=cfg.cache.dtype,
                        logits=needs.teacher_logits,
                        pooled_dim=pooled_dim(teacher_model) if needs.teacher_pooled else 0,
                        stages=stages)


def _fp16(tensor: torch.Tensor) -> np.ndarray:
    """fp16 on the host, saturating instead of overflowing to inf."""
    return tensor.float().clamp(-FP16_MAX, FP16_MAX).half().cpu().numpy()


@torch.no_grad()
def teacher_records(teacher: Teacher, images: torch.Tensor, layout: RecordLayout) -> dict:
    """The record fields of one batch, as host arrays."""
    stages = tuple(s for s, _ in layout.stages)
    logits = pooled = None
    maps = {}
    if stages or layout.pooled_dim:
        found = teacher.features(images, stages, with_logits=layout.logits)
        logits, pooled, maps = found.logits, found.pooled, found.stages
    elif layout.logits:
        logits = teacher.logits(images)
    fields = {}
    if layout.logits and layout.topk:
        top = topk_from_logits(logits.float(), layout.topk)
        fields.update(values=_fp16(top.values), ids=top.indices.cpu().numpy(),
                      lse=top.logsumexp.float().cpu().numpy())
    elif layout.logits:
        fields["logits"] = (_fp16(logits) if layout.logits_dtype == "fp16"
                            else logits.float().cpu().numpy())
    if layout.pooled_dim:
        fields["pooled"] = _fp16(pooled)
    for stage in stages:
        fields[f"stage{stage}"] = _fp16(maps[stage].contiguous())
    return fields


class ShardBatches:
    """The sample plan of a precompute: the selected shards of one epoch, each cut into
    batches of `batch_size` that never straddle two shards (the last one of a shard may be
    short). Quacks like `ShardPlan` for the loaders."""

    def __init__(self, batch_size: int, *, seed: int, rank: int):
        self.batch_size, self.seed, self.rank = batch_size, seed, rank
        self.specs: list[ShardSpec] = []

    def select(self, specs: list[ShardSpec]) -> None:
        self.specs = list(specs)

    def _all(self) -> list[RankBatch]:
        out = []
        for spec in self.specs:
            for start in range(spec.start, spec.start + spec.count, self.batch_size):
                ids = np.arange(start, min(start + self.batch_size, spec.start + spec.count))
                out.append(RankBatch(ids, ids))
        return out

    def __len__(self) -> int:
        return sum(-(-spec.count // self.batch_size) for spec in self.specs)

    def batches(self, epoch: int, start_batch: int = 0):
        yield from self._all()[start_batch:]


def _largest_batch(teacher: Teacher, layout: RecordLayout, size: int, world: World,
                   dtype: torch.dtype, limit: int) -> int:
    """On a GPU: the largest power of two ≤ `limit` whose teacher pass fits in memory."""
    batch = 1 << (max(1, limit).bit_length() - 1)
    while batch > 1:
        try:
            teacher_records(teacher, torch.zeros(batch, 3, size, size, device=world.device,
                                                 dtype=dtype), layout)
            torch.cuda.synchronize(world.device)
            return batch
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            batch //= 2
    return 1


def _header(cfg: Config, index, settings, layout: RecordLayout, epochs: int) -> dict:
    return {"format": FORMAT, "version": VERSION, "fastkd_version": fastkd.__version__,
            "teacher": teacher_identity(cfg), "plan": plan_identity(cfg),
            "image": image_identity(settings),
            "data": {"split": cfg.data.train_split, "num_samples": len(index),
                     "fingerprint": data_fingerprint(index)},
            "layout": layout.to_json(), "record_bytes": layout.record_bytes,
            "epochs": epochs, "shard_size": cfg.cache.shard_size,
            "compute": {"amp": cfg.train.amp, "channels_last": cfg.train.channels_last,
                        "method": cfg.distill.method},
            "config": config_to_dict(cfg),   # what `fastkd cache verify --teacher` rebuilds
            "complete": False, "shards": []}


def _same_request(old: dict, new: dict) -> bool:
    keys = ("teacher", "plan", "image", "data", "layout", "epochs", "shard_size", "compute")
    return all(old.get(k) == new.get(k) for k in keys)


def _open_directory(directory: Path, header: dict, world: World) -> dict | None:
    """Rank 0 writes the unfinished manifest (or finds a finished one); every rank then
    returns the existing complete manifest, or None when there is work to do."""
    state = None
    if world.is_primary:
        directory.mkdir(parents=True, exist_ok=True)
        if (directory / MANIFEST).exists():
            old = read_manifest(directory)
            if not _same_request(old, header):
                problems = static_mismatches(old, header) or [
                    "the record layout, epochs, shard size, data or image settings differ"]
                refuse(directory, problems + ["choose another cache.dir, or delete this one "
                                              "to rebuild it"])
            state = old if old.get("complete") else None
        if state is None:
            write_json_atomic(directory / MANIFEST, header)
    barrier(world)
    return read_manifest(directory) if read_manifest(directory).get("complete") else None


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def _announce(directory: Path, layout: RecordLayout, specs, todo, world: World) -> None:
    """Print what will be written and refuse when the disk lacks the room."""
    per_epoch = sum(s.count for s in specs if s.epoch == 1) * layout.record_bytes
    remaining = sum(s.count for s in todo) * layout.record_bytes
    free = shutil.disk_usage(directory).free
    total = per_epoch * len({s.epoch for s in specs})
    if world.is_primary:
        logger.info(f"fastkd cache: {layout.record_bytes} B per sample-epoch ({layout.describe()}); "
                    f"{_bytes(per_epoch)} per epoch, {_bytes(total)} in all; {len(todo)} of "
                    f"{len(specs)} shards to compute ({_bytes(remaining)}); {_bytes(free)} free "
                    f"on {directory}")
    if remaining > free:
        raise CacheError(f"cache.dir: {directory} has {_bytes(free)} free but the cache needs "
                         f"{_bytes(remaining)} more; free space or choose another cache.dir")


def _progress(total: int, world: World):
    from tqdm import tqdm
    return tqdm(total=total, unit="img", desc="teacher cache", disable=not world.is_primary,
                dynamic_ncols=True, mininterval=1.0)


def _compute_shards(cfg: Config, teacher: Teacher, layout: RecordLayout, mine: list[ShardSpec],
                    directory: Path, world: World, model_cfg: dict, num_classes: int,
                    batch_size: int) -> None:
    plan = ShardBatches(batch_size, seed=cfg.train.seed, rank=world.rank)
    loader = build_loader(cfg.data, split=cfg.data.train_split, train=True,
                          batch_size=batch_size, model_cfg=model_cfg, seed=cfg.train.seed,
                          device=world.device, amp_dtype=amp_dtype(cfg),
                          channels_last=cfg.train.channels_last, num_classes=num_classes,
                          plan=plan)
    dtype = layout.numpy_dtype()
    progress = _progress(sum(s.count for s in mine), world)
    try:
        for epoch in sorted({s.epoch for s in mine}):
            specs = [s for s in mine if s.epoch == epoch]
            plan.select(specs)
            loader.set_epoch(epoch)
            writers = {s.shard: ShardWriter(directory, s, dtype) for s in specs}
            for batch in loader:
                ids = batch.indices.cpu().numpy()
                writer = writers[int(ids[0]) // cfg.cache.shard_size]
                writer.write(ids, teacher_records(teacher, batch.images, layout))
                progress.update(len(ids))
                if writer.full:
                    writer.finish()
    finally:
        progress.close()


def build_cache(cfg: Config, *, batch_size: int | None = None) -> Path:
    """Precompute (or finish) the teacher cache of `cfg` in `cfg.cache.dir`; returns the
    directory. Under torchrun every rank computes its share of the shards."""
    check_cacheable(cfg)
    directory = Path(cfg.cache.dir)
    world = init_world(cfg.train.device)
    cfg, _ = budget_threads(cfg, world.device)
    try:
        index_splits_first_on_rank0(cfg, world)
        num_classes = count_classes(cfg)
        model_cfg = student_data_config(cfg, num_classes)
        settings = resolve_image_settings(cfg.data, model_cfg)
        teacher = build_teacher(cfg, num_classes, student_mean_std=(settings.mean, settings.std),
                                device=world.device)
        size = (3, settings.img_size, settings.img_size)
        layout = required_layout(cfg, teacher.model, num_classes, size)
        index = load_index(cfg.data.root, cfg.data.train_split)
        epochs = cfg.cache.epochs or cfg.train.epochs
        header = _header(cfg, index, settings, layout, epochs)
        if _open_directory(directory, header, world) is not None:
            if world.is_primary:
                logger.info(f"fastkd cache: {directory} is already complete")
            return directory
        specs = shard_specs(len(index), cfg.cache.shard_size, epochs)
        todo = [s for s in specs if finished_entry(directory, s) is None]
        _announce(directory, layout, specs, todo, world)
        barrier(world)   # every rank has listed the unfinished shards before any is written
        batch = batch_size or cfg.cache.batch_size
        if batch is None:
            batch = (_largest_batch(teacher, layout, settings.img_size, world,
                                    amp_dtype(cfg) or torch.float32,
                                    min(_PROBE_LIMIT, cfg.cache.shard_size))
                     if world.device.type == "cuda" else cfg.train.batch_size)
        start = time.perf_counter()
        _compute_shards(cfg, teacher, layout, todo[world.rank::world.world_size], directory,
                        world, model_cfg, num_classes, batch)
        barrier(world)
        if world.is_primary:
            _seal(directory, header, specs, time.perf_counter() - start, batch)
        barrier(world)
        return directory
    finally:
        shutdown_world(world)


def _seal(directory: Path, header: dict, specs: list[ShardSpec], seconds: float,
          batch: int) -> None:
    """The final manifest: every shard with its checksum, `complete: true`."""
    entries = [finished_entry(directory, s) for s in specs]
    missing = [s.stem for s, e in zip(specs, entries) if e is None]
    if missing:
        raise CacheError(f"cache: shards {', '.join(missing[:5])} were not written; rerun "
                         f"`fastkd cache build` to finish them")
    manifest = dict(header, complete=True, shards=entries,
                    created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    precompute={"seconds_last_run": round(seconds, 2), "batch_size": batch})
    write_json_atomic(directory / MANIFEST, manifest)
    logger.info(f"fastkd cache: {directory} complete: {len(entries)} shards, "
                f"{header['epochs']} epochs x {header['data']['num_samples']} samples "
                f"({seconds:.1f} s this run)")
