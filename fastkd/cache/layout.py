"""The teacher cache on disk: one directory, a manifest and fixed-size records.

    DIR/manifest.json          what produced the cache and what it holds (`Manifest`)
    DIR/e0001-s00000.npy       records of planned epoch 1, samples 0 .. shard_size-1
    DIR/e0001-s00000.json      that shard's count and sha256, written once the shard is whole

A shard file is a NumPy `.npy` array of one structured record per sample, so a record is found
by (epoch, sample index) in O(1) — file `e{epoch}-s{index // shard_size}`, row
`index % shard_size` — and a batch of records is one fancy-index gather on a memory map.

A record holds what a method's `Needs` ask for: the teacher logits (top-k fp16 values, int16
class ids when the classes fit, else int32, and the fp32 log-sum-exp of the full logits, the
`TopKLogits` triple; or all K logits in fp16/fp32), the pooled features and stage maps in fp16.

Crash safety: a shard is written under a temporary name, flushed, checksummed and renamed; its
`.json` sidecar follows. A shard counts as done only when both exist; anything else is
recomputed by the next `fastkd cache build`, and training reads only the shards the final
manifest lists (`complete: true`).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT = "fastkd-teacher-cache"
VERSION = 1
MANIFEST = "manifest.json"
FP16_MAX = float(np.finfo(np.float16).max)


class CacheError(ValueError):
    """A cache that cannot serve this run (missing, incomplete, corrupt or made for another
    configuration); the CLI prints it and exits with status 2."""


@dataclass(frozen=True)
class RecordLayout:
    """The fields of one record. `topk` = 0 stores all `num_classes` logits in `logits_dtype`."""
    num_classes: int
    topk: int
    logits_dtype: str                       # "fp16" | "fp32": full logits only
    logits: bool = True
    pooled_dim: int = 0                     # 0: no pooled features
    stages: tuple[tuple[int, tuple[int, int, int]], ...] = ()   # (stage, (C, H, W))

    @property
    def class_id_dtype(self) -> str:
        return "<i2" if self.num_classes <= np.iinfo(np.int16).max else "<i4"

    def numpy_dtype(self) -> np.dtype:
        fields = []
        if self.logits and self.topk:
            fields += [("values", "<f2", (self.topk,)), ("ids", self.class_id_dtype, (self.topk,)),
                       ("lse", "<f4")]
        elif self.logits:
            fields += [("logits", "<f2" if self.logits_dtype == "fp16" else "<f4",
                        (self.num_classes,))]
        if self.pooled_dim:
            fields += [("pooled", "<f2", (self.pooled_dim,))]
        fields += [(f"stage{stage}", "<f2", tuple(shape)) for stage, shape in self.stages]
        return np.dtype(fields, align=True)

    @property
    def record_bytes(self) -> int:
        return self.numpy_dtype().itemsize

    def to_json(self) -> dict:
        return {"num_classes": self.num_classes, "topk": self.topk,
                "logits_dtype": self.logits_dtype, "logits": self.logits,
                "pooled_dim": self.pooled_dim,
                "stages": {str(stage): list(shape) for stage, shape in self.stages}}

    @classmethod
    def from_json(cls, blob: dict) -> RecordLayout:
        stages = tuple(sorted((int(s), tuple(shape)) for s, shape in blob["stages"].items()))
        return cls(num_classes=blob["num_classes"], topk=blob["topk"],
                   logits_dtype=blob["logits_dtype"], logits=blob["logits"],
                   pooled_dim=blob["pooled_dim"], stages=stages)

    def describe(self) -> str:
        parts = []
        if self.logits:
            parts.append(f"top-{self.topk} logits" if self.topk else
                         f"all {self.num_classes} logits ({self.logits_dtype})")
        if self.pooled_dim:
            parts.append(f"pooled features ({self.pooled_dim})")
        parts += [f"stage {s} map {'x'.join(map(str, shape))}" for s, shape in self.stages]
        return ", ".join(parts) or "nothing"


@dataclass(frozen=True)
class ShardSpec:
    """Samples start .. start+count-1 of planned epoch `epoch`."""
    epoch: int
    shard: int
    start: int
    count: int

    @property
    def stem(self) -> str:
        return f"e{self.epoch:04d}-s{self.shard:05d}"


def shard_specs(num_samples: int, shard_size: int, epochs: int) -> list[ShardSpec]:
    """Every (epoch, shard) of a cache, epoch-major."""
    return [ShardSpec(epoch, start // shard_size, start, min(shard_size, num_samples - start))
            for epoch in range(1, epochs + 1) for start in range(0, num_samples, shard_size)]


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: Path, blob: dict) -> None:
    """Write `blob` to `path` so that a reader sees the old file or the new one, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(blob, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ShardWriter:
    """One shard's records, filled batch by batch into a temporary memory map, then made
    visible under its final name with its checksum (`finish`)."""

    def __init__(self, directory: Path, spec: ShardSpec, dtype: np.dtype):
        self.directory, self.spec = directory, spec
        self.final = directory / f"{spec.stem}.npy"
        self.partial = directory / f".{spec.stem}.npy.partial"
        self.records = np.lib.format.open_memmap(self.partial, mode="w+", dtype=dtype,
                                                 shape=(spec.count,))
        self.filled = 0

    def write(self, sample_ids: np.ndarray, fields: dict[str, np.ndarray]) -> None:
        rows = sample_ids - self.spec.start
        for name, values in fields.items():
            self.records[name][rows] = values
        self.filled += len(rows)

    @property
    def full(self) -> bool:
        return self.filled >= self.spec.count

    def finish(self) -> dict:
        """Flush, checksum, rename, then the sidecar: from here on the shard counts as done."""
        self.records.flush()
        del self.records
        with open(self.partial, "rb+") as handle:
            os.fsync(handle.fileno())
        entry = {"epoch": self.spec.epoch, "shard": self.spec.shard, "start": self.spec.start,
                 "count": self.spec.count, "file": self.final.name,
                 "bytes": self.partial.stat().st_size, "sha256": sha256_file(self.partial)}
        os.replace(self.partial, self.final)
        write_json_atomic(self.directory / f"{self.spec.stem}.json", entry)
        return entry


def finished_entry(directory: Path, spec: ShardSpec) -> dict | None:
    """The sidecar of a shard that was completed (file present at its recorded size)."""
    sidecar, data = directory / f"{spec.stem}.json", directory / f"{spec.stem}.npy"
    try:
        entry = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return None
    if not data.is_file() or data.stat().st_size != entry.get("bytes") or entry.get("count") != spec.count:
        return None
    return entry


def read_manifest(directory: str | Path) -> dict:
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CacheError(f"cache.dir: no teacher cache at {directory} (no {MANIFEST}); build one "
                         f"with `fastkd cache build CONFIG cache.dir={directory}`") from None
    except (OSError, ValueError) as error:
        raise CacheError(f"cache.dir: {path} is unreadable ({error})") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CacheError(f"cache.dir: {path} is not a fastkd teacher cache of format version "
                         f"{VERSION} (found {manifest.get('format')!r} v{manifest.get('version')})")
    return manifest


class ShardReader:
    """Read-only memory maps of one cache's shards, opened on first use."""

    def __init__(self, directory: str | Path, manifest: dict):
        self.directory = Path(directory)
        self.shard_size = manifest["shard_size"]
        self.files = {(e["epoch"], e["shard"]): e["file"] for e in manifest["shards"]}
        self.maps: dict[tuple[int, int], np.ndarray] = {}

    def _map(self, epoch: int, shard: int) -> np.ndarray:
        key = (epoch, shard)
        if key not in self.maps:
            if len(self.maps) > 256:    # a long run touches every shard: keep the open set small
                self.maps.clear()
            self.maps[key] = np.load(self.directory / self.files[key], mmap_mode="r")
        return self.maps[key]

    def gather(self, epoch: int, sample_ids: np.ndarray) -> np.ndarray:
        """The records of `sample_ids` (any order) of planned epoch `epoch`, as one array."""
        sample_ids = np.asarray(sample_ids, dtype=np.int64)
        shards, rows = np.divmod(sample_ids, self.shard_size)
        first = self._map(epoch, int(shards[0]))
        if (shards == shards[0]).all():
            return first[rows]
        out = np.empty(len(sample_ids), dtype=first.dtype)
        for shard in np.unique(shards):
            where = shards == shard
            out[where] = self._map(epoch, int(shard))[rows[where]]
        return out
