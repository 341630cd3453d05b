"""The CPU thread budget of one process: its loader threads and torch's intra-op threads.

torch's OpenMP threads, left to spin while they wait for each other, collapse when the
loader's threads (DALI's CPU threads or DataLoader workers) or another process take one of
their cores: on a 2-core machine a 3-epoch run of the demo's student went from 421 img/s to
137 img/s beside its own loader threads, and to 71 img/s with one other busy process. Two
remedies were measured there (`bench/results/cpu-2026-11-28.md`): passive OpenMP waits
(`OMP_WAIT_POLICY=PASSIVE`, which `import fastkd` sets before torch loads) with torch on
every core, 421 img/s quiet and 228 img/s loaded; and a strict split loader + torch ≤ cores
without it, 200 and 292 img/s. fastkd uses the first when the passive policy is in effect
and the split otherwise. The cores are those this process may use (`os.sched_getaffinity`),
shared by the processes torchrun starts on the node.

`train.cpu_threads` overrides the choice: that many torch threads, and `data.num_workers`
loader threads as written. The choice is written to env.json and the run's start line.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch

from fastkd import OMP_PASSIVE


@dataclass(frozen=True)
class ThreadBudget:
    cores: int            # usable by this process
    loader: int           # DALI threads / DataLoader workers
    torch: int            # torch intra-op threads
    rule: str             # how it was chosen

    def describe(self) -> str:
        return f"{self.torch} torch + {self.loader} loader threads on {self.cores} core(s)"

    def record(self) -> dict:
        return asdict(self)


def usable_cores() -> int:
    """Cores this process may run on, shared with the other local ranks of a torchrun job."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, (cores or 1) // max(1, local))


def plan_threads(num_workers: int | None, cpu_threads: int | None, *, on_gpu: bool,
                 cores: int | None = None, passive: bool | None = None) -> ThreadBudget:
    """The split. On a CPU the loader gets at most half the cores (decoding is lighter than
    the models' compute); on a GPU torch needs one thread and the loader the rest, so by
    default a GPU run's DALI pipeline gets every core but one. `num_workers` (None: the whole
    share) caps the loader's part."""
    cores = cores or usable_cores()
    share = max(1, cores - 1 if on_gpu else cores // 2)
    if cpu_threads is not None:
        return ThreadBudget(cores, share if num_workers is None else num_workers, cpu_threads,
                            "train.cpu_threads")
    passive = OMP_PASSIVE if passive is None else passive
    if passive:      # waiting threads sleep: torch may use every core beside the loader
        loader = share if num_workers is None else num_workers
        return ThreadBudget(cores, loader, cores, "auto: passive OpenMP waits, torch on all cores")
    loader = share if num_workers is None else min(num_workers, share)   # 0: no workers
    return ThreadBudget(cores, loader, max(1, cores - loader), "auto: loader + torch <= cores")


def apply_threads(budget: ThreadBudget) -> None:
    torch.set_num_threads(budget.torch)
