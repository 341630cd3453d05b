"""Counter-based random numbers: uniforms as a pure function of (seed, stream, epoch, index, draw).

A stateful RNG gives sample `i` a different number depending on how many numbers were drawn
before it, i.e. on batch size, worker count and order. Hashing the coordinates instead makes
every random decision of the input pipeline replayable from its coordinates alone: a resumed
run, a run on another world size and the teacher cache all see the same crops.

The hash is SplitMix64's finalizer (Steele et al., "Fast splittable pseudorandom number
generators", 2014), applied to a chained combination of the coordinates; vectorized over numpy
uint64 arrays, whose arithmetic wraps modulo 2**64 as the algorithm needs.
"""
from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)

# Streams keep the different uses of one seed independent of each other.
STREAM_ORDER = 1
STREAM_CROP = 2
STREAM_MIXUP = 3


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finalizer on a uint64 array (wrapping arithmetic)."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MUL1
        z = (z ^ (z >> np.uint64(27))) * _MUL2
        return z ^ (z >> np.uint64(31))


def hash_keys(seed: int, stream: int, epoch: int, indices: np.ndarray) -> np.ndarray:
    """One 64-bit key per index, distinct for every (seed, stream, epoch)."""
    base = splitmix64(np.uint64(seed & 0xFFFFFFFFFFFFFFFF))
    base = splitmix64(base ^ np.uint64(stream))
    base = splitmix64(base ^ np.uint64(epoch & 0xFFFFFFFFFFFFFFFF))
    idx = np.asarray(indices, dtype=np.int64).astype(np.uint64)
    return splitmix64(base ^ idx)


def uniforms(seed: int, stream: int, epoch: int, indices: np.ndarray, n_draws: int) -> np.ndarray:
    """Float64 uniforms in [0, 1), shape (len(indices), n_draws).

    Draw `d` of index `i` depends on nothing but (seed, stream, epoch, i, d).
    """
    keys = hash_keys(seed, stream, epoch, indices)[:, None]
    draws = np.arange(n_draws, dtype=np.uint64)[None, :]
    with np.errstate(over="ignore"):
        bits = splitmix64(keys + draws * _GOLDEN)
    # The top 53 bits give an exactly representable double in [0, 1).
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
