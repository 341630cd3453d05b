"""The dataset index: paths, labels, image sizes and class names of one split, built once.

A split is a sub-folder of the data root in ImageFolder layout (`split/<class>/<image>`), or a
file list `*.txt` relative to the root, one `relative/path label` per line. Building the index
probes every file header (`image_probe`): the image sizes feed the crop plan without decoding,
and files that no decoder could read are excluded here, listed in one warning, so that a bad
file never stops a run in the middle of an epoch.

The index is cached next to the data (`<root>/.fastkd-index/`), or in `index_dir` when given or
when the data folder is read-only, and rebuilt when the split changes: the cache key covers
every directory's mtime and the file count (folders) or the list file's mtime and size.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .image_probe import probe_image

logger = logging.getLogger(__name__)
_INDEX_VERSION = 2
_MAX_LISTED = 50   # bad files named in the warning; `fastkd data check` lists them all


class DataError(ValueError):
    """The split cannot be used at all: missing, empty, an empty class, a list leaving the root."""


@dataclass(frozen=True)
class DatasetIndex:
    """Usable samples of a split. `paths` are relative to `base` (the split folder or root)."""
    base: str
    paths: list[str]
    labels: np.ndarray        # int64 (N,)
    heights: np.ndarray       # int64 (N,), from the file header
    widths: np.ndarray        # int64 (N,)
    classes: list[str]
    bad_files: list[tuple[str, str]]   # (path relative to base, reason), excluded
    stats: np.ndarray | None = None    # int64 (N, 2): file size and mtime_ns when indexed

    def __len__(self) -> int:
        return len(self.paths)

    def full_path(self, i: int) -> str:
        return os.path.join(self.base, self.paths[i])

    def bad_files_message(self, limit: int | None = _MAX_LISTED) -> str:
        shown = self.bad_files if limit is None else self.bad_files[:limit]
        lines = [f"{len(self.bad_files)} file(s) under {self.base} cannot be decoded and are "
                 f"excluded:"]
        lines += [f"  {path}: {reason}" for path, reason in shown]
        if len(shown) < len(self.bad_files):
            lines.append(f"  ... and {len(self.bad_files) - len(shown)} more "
                         f"(`fastkd data check` lists them all)")
        return "\n".join(lines)

    def warn_bad_files(self) -> None:
        """One warning naming the excluded files and their count (nothing when clean)."""
        if self.bad_files:
            warnings.warn(self.bad_files_message(), stacklevel=3)


# ---------------------------------------------------------------- listing the split

def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _list_folder(split_dir: str) -> tuple[list[str], list[str], list[int], str]:
    """ImageFolder listing: (classes, relative paths, labels, change key)."""
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not _is_hidden(e.name))
    if not classes:
        raise DataError(f"no class folders in {split_dir} (expected {split_dir}/<class>/<image>)")
    # Class folder names are in the stamps; the split folder's own mtime is left out because
    # the cache may live inside it (split ".").
    paths, labels, stamps = [], [], []
    for label, name in enumerate(classes):
        found = 0
        for dirpath, dirnames, filenames in os.walk(os.path.join(split_dir, name), followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
            rel_dir = os.path.relpath(dirpath, split_dir)
            stamps.append(f"{rel_dir}:{os.stat(dirpath).st_mtime_ns}")
            for file in sorted(f for f in filenames if not _is_hidden(f)):
                paths.append(os.path.join(rel_dir, file))
                labels.append(label)
                found += 1
        if found == 0:
            raise DataError(f"class folder {os.path.join(split_dir, name)} is empty")
    key = f"folder|{len(paths)}|" + "|".join(stamps)
    return classes, paths, labels, key


def _list_file(root: str, list_path: str) -> tuple[list[str], list[str], list[int], str]:
    """File-list listing; every entry must stay inside `root`."""
    paths, labels = [], []
    root_abs = os.path.abspath(root)
    with open(list_path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit() or int(parts[1]) < 0:
                raise DataError(f"{list_path}:{line_no}: expected `relative/path label`, got {line!r}")
            rel, label = parts[0], int(parts[1])
            resolved = os.path.normpath(os.path.join(root_abs, rel))
            if os.path.isabs(rel) or not resolved.startswith(root_abs + os.sep):
                raise DataError(f"{list_path}:{line_no}: {rel!r} resolves outside the data root "
                                f"{root_abs}; refused")
            paths.append(os.path.relpath(resolved, root_abs))
            labels.append(label)
    if not paths:
        raise DataError(f"file list {list_path} has no entries")
    classes = [str(c) for c in range(max(labels) + 1)]
    st = os.stat(list_path)
    # The folders holding the entries change mtime when a file in them is added or removed.
    stamps = [f"{d}:{_mtime_ns(os.path.join(root_abs, d))}" for d in
              sorted({os.path.dirname(p) for p in paths})]
    return classes, paths, labels, f"list|{st.st_mtime_ns}|{st.st_size}|" + "|".join(stamps)


def _mtime_ns(path: str) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return -1


# ---------------------------------------------------------------- cache

def _cache_file(directory: str, source: str) -> Path:
    """One cache file per split source (folder or list), so one `index_dir` serves many."""
    tag = hashlib.sha1(os.path.abspath(source).encode()).hexdigest()[:12]
    return Path(directory) / f"{Path(source).name or 'root'}-{tag}.npz"


def _join(strings: list[str]) -> np.ndarray:
    return np.frombuffer("\n".join(strings).encode("utf-8"), dtype=np.uint8)


def _split(blob: np.ndarray) -> list[str]:
    text = blob.tobytes().decode("utf-8")
    return text.split("\n") if text else []


def _save(path: Path, index: DatasetIndex, key: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez(tmp, key=np.array(key), paths=_join(index.paths), labels=index.labels,
             heights=index.heights, widths=index.widths, classes=np.array(json.dumps(index.classes)),
             bad=np.array(json.dumps(index.bad_files)), stats=index.stats)
    os.replace(tmp, path)   # readers never see a half-written index


def _load(path: Path, key: str, base: str) -> DatasetIndex | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            return DatasetIndex(base, _split(z["paths"]), z["labels"], z["heights"], z["widths"],
                                json.loads(str(z["classes"])),
                                [tuple(b) for b in json.loads(str(z["bad"]))], z["stats"])
    except (OSError, KeyError, ValueError):
        return None


def _cache_dirs(data_root: str, index_dir: str | None) -> list[str]:
    if index_dir:
        return [index_dir]
    return [os.path.join(data_root, ".fastkd-index"),
            os.path.join(os.path.expanduser("~"), ".cache", "fastkd", "index")]


# ---------------------------------------------------------------- building

def _probe_all(base: str, paths: list[str], workers: int, full: bool):
    if len(paths) > 20000:
        logger.info(f"fastkd: indexing {len(paths)} files under {base} (once; cached afterwards)")
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda p: probe_image(os.path.join(base, p), full), paths,
                             chunksize=256))


def _build(base: str, classes, paths, labels, workers: int, full: bool,
           every_class_needed: bool) -> DatasetIndex:
    probes = _probe_all(base, paths, workers, full)
    stats = _stat_all(base, paths, workers)
    keep = [i for i, p in enumerate(probes) if p.problem is None]
    bad = [(paths[i], p.problem) for i, p in enumerate(probes) if p.problem is not None]
    if not keep:
        raise DataError(f"no decodable image under {base} ({len(bad)} bad file(s))")
    lab = np.asarray(labels, dtype=np.int64)[keep]
    missing = sorted(set(labels) - set(lab.tolist())) if every_class_needed else []
    if missing:
        raise DataError(f"class folder(s) {[classes[c] for c in missing]} under {base} hold no "
                        f"decodable image")
    return DatasetIndex(base, [paths[i] for i in keep], lab,
                        np.asarray([probes[i].height for i in keep], dtype=np.int64),
                        np.asarray([probes[i].width for i in keep], dtype=np.int64),
                        list(classes), bad, stats[keep])


def _stat_all(base: str, paths: list[str], workers: int) -> np.ndarray:
    """(size, mtime_ns) of every file, (-1, -1) where it cannot be read."""
    def stat(path: str) -> tuple[int, int]:
        try:
            st = os.stat(os.path.join(base, path))
            return st.st_size, st.st_mtime_ns
        except OSError:
            return -1, -1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return np.asarray(list(pool.map(stat, paths, chunksize=1024)), dtype=np.int64).reshape(-1, 2)


def _reprobe_changed(index: DatasetIndex, workers: int, full: bool) -> DatasetIndex | None:
    """The index with the files whose size or mtime changed since indexing probed again
    (dropped, and listed as bad, when they no longer decode); None when nothing changed.
    A file rewritten in place changes no directory, so the cache key alone would miss it."""
    stats = _stat_all(index.base, index.paths, workers)
    changed = np.flatnonzero((stats != index.stats).any(axis=1))
    if not len(changed):
        return None
    probes = dict(zip(changed.tolist(), _probe_all(index.base, [index.paths[i] for i in changed],
                                                   workers, full)))
    keep = np.asarray([i not in probes or probes[i].problem is None for i in range(len(index))])
    heights, widths = index.heights.copy(), index.widths.copy()
    for i, probe in probes.items():
        if probe.problem is None:
            heights[i], widths[i] = probe.height, probe.width
    bad = [(index.paths[i], f"{p.problem} (changed since indexing)") for i, p in probes.items()
           if p.problem is not None]
    logger.warning(f"fastkd: {len(changed)} file(s) under {index.base} changed since they were "
                   f"indexed; probed again, {len(bad)} dropped as unusable")
    return DatasetIndex(index.base, [p for p, k in zip(index.paths, keep) if k],
                        index.labels[keep], heights[keep], widths[keep], index.classes,
                        index.bad_files + bad, stats[keep])


def resolve_split(root: str, split: str) -> tuple[str, str | None]:
    """(base directory that paths are relative to, list file or None for a folder)."""
    if not root or not os.path.isdir(root):
        raise DataError(f"data root {root!r} is not a directory")
    target = os.path.join(root, split)
    if split.endswith(".txt"):
        if not os.path.isfile(target):
            raise DataError(f"file list {target} does not exist")
        return root, target
    if not os.path.isdir(target):
        raise DataError(f"split folder {target} does not exist")
    return target, None


def load_index(root: str, split: str, *, index_dir: str | None = None, workers: int = 8,
               full_check: bool = False, use_cache: bool = True,
               rebuild: bool = False) -> DatasetIndex:
    """The index of `root/split`, from the cache when the split has not changed since (files
    whose size or mtime changed are probed again); `rebuild` probes every file anew and
    replaces the cached index."""
    base, list_file = resolve_split(root, split)
    classes, paths, labels, key = (_list_file(root, list_file) if list_file
                                   else _list_folder(base))
    key = f"v{_INDEX_VERSION}|full={full_check}|{key}"
    source = list_file or base
    dirs = _cache_dirs(root, index_dir)
    index = None
    if use_cache and not rebuild:
        for directory in dirs:
            index = _load(_cache_file(directory, source), key, base)
            if index is not None:
                updated = _reprobe_changed(index, workers, full_check)
                if updated is None:
                    return index
                index = updated
                break
    if index is None:
        index = _build(base, classes, paths, labels, workers, full_check,
                       every_class_needed=list_file is None)
    if use_cache:
        for directory in dirs:
            try:
                _save(_cache_file(directory, source), index, key)
                break
            except OSError:
                continue   # read-only data folder: try the next place
    return index
