"""A file that breaks after indexing never stops a run: its sample is replaced, and said so.

Files can change under a long run (deleted, truncated, rewritten by another job). When one can
no longer be read or decoded at training time, the loader takes the next usable sample in
index order instead (wrapping around). The replacement depends only on the files, not on
timing or workers, so a resumed run makes the same choice and stays exact. Each replacement is
counted and named: the engine logs them at the end of the epoch and writes the count to
summary.csv (`replaced_samples`).
"""
from __future__ import annotations

import io
import os
import threading

import numpy as np
from PIL import Image

from .datasets import DataError, DatasetIndex

_TRIES = 64   # consecutive broken files before the data is declared unusable


class SampleReplacer:
    def __init__(self, index: DatasetIndex):
        self.index = index
        self._replaced: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def read_bytes(self, i: int) -> tuple[int, np.ndarray]:
        """(sample actually used, its encoded bytes) for sample `i` (DALI decodes them)."""
        return self._first_usable(i, self._bytes)

    def open_image(self, i: int, load) -> tuple[int, object, str]:
        """(sample used, `load(path)`'s result, a note naming a replacement or ''): decodes in
        full, so a truncated file is caught too (the torch loader, in its worker processes)."""
        note = []
        j, image = self._first_usable(i, lambda k: load(self.index.full_path(k)), note=note)
        return j, image, note[0] if note else ""

    def record(self, note: str) -> None:
        with self._lock:
            self._replaced.append(tuple(note.split(": ", 1)))

    def take(self) -> list[tuple[str, str]]:
        """The replacements since the last call, as (path, reason)."""
        with self._lock:
            taken, self._replaced = self._replaced, []
        return taken

    def _bytes(self, j: int) -> np.ndarray:
        data = np.fromfile(self.index.full_path(j), dtype=np.uint8)
        stats = self.index.stats
        if stats is not None and len(data) != stats[j, 0]:
            raise ValueError(f"{len(data)} bytes, {stats[j, 0]} when indexed")
        with Image.open(io.BytesIO(data.tobytes())) as img:   # the header, not the pixels
            img.size
        return data

    def _first_usable(self, i: int, use, note: list | None = None):
        n = len(self.index)
        for attempt in range(_TRIES):
            j = (i + attempt) % n
            try:
                result = use(j)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
                if attempt == 0:
                    reason = (f"{self.index.paths[i]}: {type(error).__name__}: "
                              f"{str(error)[:120]} (replaced by the next usable sample)")
                    if note is None:
                        self.record(reason)
                    else:
                        note.append(reason)
                continue
            return j, result
        first = os.path.join(self.index.base, self.index.paths[i])
        raise DataError(f"{_TRIES} files in a row from {first} on cannot be read any more; "
                        f"check the data under {self.index.base}")

    def __getstate__(self):          # DataLoader workers get a copy without the lock
        return {"index": self.index}

    def __setstate__(self, state):
        self.__init__(state["index"])
