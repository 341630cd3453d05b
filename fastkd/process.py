"""What one training process sets up for itself: its random generators and its SIGTERM.

Both are the process's own, whatever the world size: `seed_everything` seeds Python, numpy
and torch (the engine adds the rank for training), and `StopRequest` turns SIGTERM into a flag
the training loop acts on.
"""
from __future__ import annotations

import random
import signal
import threading

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Python, numpy and torch (CPU and every GPU) generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class StopRequest:
    """SIGTERM (cluster preemption) sets a flag; the loop reads it at its next logging step,
    writes a checkpoint and stops. The handler does nothing else: saving from inside a signal handler
    could interrupt an optimizer step half-way."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
