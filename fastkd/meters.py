"""The training meters: loss sums kept on the device, host clocks, and the progress display.

`LossSums` accumulates the loss terms and step counts without a host read until `means` (a
logging step); `Throughput` times samples and loader waits on the host; `Progress` shows a
tqdm bar on a terminal or one line per logging step, and writes every line to the run's log.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fastkd.distributed import World, all_reduce_
from fastkd.rundir import LOG_FILE, RunDir


# ------------------------------------------------------------------------------- meters


class LossSums:
    """Device-side sums of the loss terms over the steps that were not skipped, and the counts
    of both kinds of steps; nothing is read to the host until `means`."""

    def __init__(self):
        self.sums: dict[str, Tensor] = {}
        self.counts: Tensor | None = None      # [steps counted, steps skipped], on the device
        self.steps = 0                         # host copies, set by `means`
        self.skipped = 0

    def add(self, terms: dict[str, Tensor], ok: Tensor) -> None:
        """One step's terms; `ok` (device 0/1) says whether the step counted. A skipped step's
        terms are not finite, so they are masked out, not multiplied by 0."""
        counted = ok > 0
        self._accumulate({name: torch.where(counted, value.detach().float(), 0.0)
                          for name, value in terms.items()})
        self._count(torch.stack([ok, 1 - ok]).float())

    def merge_(self, other: LossSums) -> None:
        self._accumulate(other.sums)
        if other.counts is not None:
            self._count(other.counts)

    def _count(self, counts: Tensor) -> None:
        self.counts = counts.clone() if self.counts is None else self.counts.add_(counts)

    def _accumulate(self, values: dict[str, Tensor]) -> None:
        """In place (every step: no new tensor per term); a new name starts from an fp32 copy."""
        for name, value in values.items():
            if name in self.sums:
                self.sums[name].add_(value.detach())
            else:
                self.sums[name] = value.detach().to(torch.float32, copy=True)

    def means(self, world: World) -> dict[str, float]:
        """Mean of each term over the counted steps of every rank (a sync and a collective);
        also sets `steps` (all ranks) and `skipped` (this rank's, the same on every rank)."""
        if self.counts is None:
            return {}
        names = list(self.sums)
        totals = all_reduce_(torch.cat([torch.stack([self.sums[n] for n in names]), self.counts]),
                             world).tolist()
        self.steps, self.skipped = int(totals[-2]), int(totals[-1]) // world.world_size
        means = {name: total / max(self.steps, 1) for name, total in zip(names, totals)}
        means["train_loss"] = sum(means[n] for n in names)
        return means

    def state(self) -> dict[str, Tensor]:
        counts = self.counts.cpu() if self.counts is not None else torch.zeros(2)
        return {**self.sums, "_steps": counts[0].long(), "_skipped": counts[1].long()}

    @classmethod
    def from_state(cls, state: dict[str, Tensor], device: torch.device) -> LossSums:
        sums = cls()
        sums.sums = {k: v.to(device) for k, v in state.items() if not k.startswith("_")}
        if "_steps" in state:
            sums.counts = torch.tensor([float(state["_steps"]), float(state.get("_skipped", 0))],
                                       device=device)
        return sums


@dataclass
class Throughput:
    """Host-side clocks: samples, wall time and time blocked on the loader."""
    samples: int = 0
    data_wait: float = 0.0
    start: float = field(default_factory=time.perf_counter)

    def values(self, world_size: int) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return {"img_per_sec": self.samples * world_size / elapsed,
                "data_wait": self.data_wait / elapsed}


# ------------------------------------------------------------------------------- progress


def format_metrics(values: dict[str, float]) -> str:
    """`loss_gt 1.234 loss_kd 0.5 lr 1.00e-01 512 img/s data 3.1%` (known keys get units)."""
    parts = []
    for name, value in values.items():
        if name == "lr":
            parts.append(f"lr {value:.2e}")
        elif name == "img_per_sec":
            parts.append(f"{value:.0f} img/s")
        elif name == "data_wait":
            parts.append(f"data {100 * value:.1f}%")
        elif name == "epoch_seconds":
            parts.append(f"{value:.1f} s")
        elif name.endswith(("_top1", "_top5")):
            parts.append(f"{name} {value:.2f}")
        else:
            parts.append(f"{name} {value:.4g}")
    return " ".join(parts)


class Progress:
    """tqdm on a terminal (rank 0), otherwise one line every `log_interval` steps.

    The engine calls `advance` every step (cheap: no GPU read) and `report` only at the steps
    where it has read the metrics from the device.
    """

    def __init__(self, run_dir: RunDir, *, interactive: bool | None = None):
        self.run_dir = run_dir
        if interactive is None:
            interactive = run_dir.writer and sys.stderr.isatty()
        self.interactive = interactive and run_dir.writer
        self._bar = None
        self._epoch = 0
        self._total = 0

    def start_epoch(self, epoch: int, total_steps: int, done_steps: int = 0) -> None:
        self._epoch, self._total = epoch, total_steps
        if self.interactive:
            from tqdm import tqdm
            self._bar = tqdm(total=total_steps, initial=done_steps, desc=f"epoch {epoch}",
                             dynamic_ncols=True, leave=True)

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def report(self, step: int, values: dict[str, float]) -> None:
        """`values` already read to the host (loss terms, lr, img/s, data-wait fraction)."""
        if self._bar is not None:
            self._bar.set_postfix_str(format_metrics(values), refresh=False)
            with open(self.run_dir.file(LOG_FILE), "a") as handle:
                handle.write(self._line(step, values) + "\n")
        else:
            self.run_dir.log(self._line(step, values))

    def _line(self, step: int, values: dict[str, float]) -> str:
        width = len(str(self._total))
        stamp = time.strftime("%H:%M:%S")
        return f"{stamp} epoch {self._epoch} [{step:>{width}}/{self._total}] {format_metrics(values)}"

    def end_epoch(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
