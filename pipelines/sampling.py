"""Sample order and sharding: which samples rank `r` reads in epoch `e`, batch by batch.

The epoch order is a permutation that is a pure function of (seed, epoch), the same for every
world size. Rank `r` of `W` takes every W-th position of it (r, r+W, r+2W, ...), so the union
of the ranks' b-th batches is one contiguous chunk of the global order: a run on 8 GPUs and
a run on 1 GPU with 8x the batch see the same global batches.

Without `drop_last` every rank gets ceil(N / W) positions; the positions past N wrap around to
the start of the order (real images, so a train step stays well defined) and carry index -1,
which evaluation must exclude. The last batch of a rank may be partial. With `drop_last` each
rank gets N // W positions (no padding) and only full batches.

Seven samples, two ranks, batch 2, no shuffle (order 0..6):

    rank 0: [0, 2] [4, 6]        rank 1: [1, 3] [5, -1 (reads 0)]
    drop_last: rank 0: [0, 2]    rank 1: [1, 3]     (4, 5, 6 dropped this epoch)
"""
from __future__ import annotations

import math
from typing import Iterator, NamedTuple

import numpy as np

from .counter_rng import STREAM_ORDER, hash_keys


def epoch_order(seed: int, epoch: int, num_samples: int) -> np.ndarray:
    """A permutation of range(num_samples), a pure function of (seed, epoch).

    Sorting by a per-index hash avoids any dependence on numpy's Generator algorithms, which
    may change between numpy versions.
    """
    keys = hash_keys(seed, STREAM_ORDER, epoch, np.arange(num_samples))
    return np.argsort(keys, kind="stable")


class RankBatch(NamedTuple):
    """One batch of one rank: `sample_ids` to read (always real), `indices` to report (-1 = pad)."""
    sample_ids: np.ndarray
    indices: np.ndarray


class ShardPlan:
    """Per-rank batches of every epoch; `len()` is the number of batches per epoch."""

    def __init__(self, num_samples: int, batch_size: int, *, seed: int, shuffle: bool,
                 rank: int = 0, world_size: int = 1, drop_last: bool = False):
        if num_samples <= 0:
            raise ValueError("cannot shard an empty dataset")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if batch_size <= 0:
            raise ValueError(f"batch size must be positive, got {batch_size}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed, self.shuffle = seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.drop_last = drop_last
        if drop_last:
            self.samples_per_rank = num_samples // world_size
            self.num_batches = self.samples_per_rank // batch_size
        else:
            self.samples_per_rank = math.ceil(num_samples / world_size)
            self.num_batches = math.ceil(self.samples_per_rank / batch_size)

    def __len__(self) -> int:
        return self.num_batches

    def rank_samples(self, epoch: int) -> RankBatch:
        """All positions of this rank in `epoch`, before cutting into batches."""
        n = self.num_samples
        order = epoch_order(self.seed, epoch, n) if self.shuffle else np.arange(n)
        positions = self.rank + self.world_size * np.arange(self.samples_per_rank)
        sample_ids = order[positions % n]
        indices = np.where(positions < n, sample_ids, -1)
        return RankBatch(sample_ids.astype(np.int64), indices.astype(np.int64))

    def batches(self, epoch: int, start_batch: int = 0) -> Iterator[RankBatch]:
        """This rank's batches of `epoch`, skipping the first `start_batch` (exact resume)."""
        everything = self.rank_samples(epoch)
        for b in range(start_batch, self.num_batches):
            cut = slice(b * self.batch_size, (b + 1) * self.batch_size)
            yield RankBatch(everything.sample_ids[cut], everything.indices[cut])
