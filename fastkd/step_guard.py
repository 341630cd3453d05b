"""The non-finite guard, decided on the device: no host read of a device value per step.

A step whose loss terms are not all finite (on any rank) must change nothing: no weight, no
optimizer state, no EMA. Reading that verdict to the host before the update would make the CPU
wait for the forward pass every step, so the verdict stays a device tensor `ok` (1.0 or 0.0),
as `torch.amp.GradScaler` keeps its `found_inf`:

* the optimizer takes it as `found_inf` (torch's fused SGD/Adam/AdamW skip the whole update on
  the device, momentum and step counters included); an optimizer without that support (LAMB,
  LARS, apex's) reads the verdict to the host at that step, as before;
* the EMA interpolates with weight `ok · (1 − decay)` (0 on a bad step) and copies integer
  buffers only where `ok`;
* the loss sums count a step only where `ok` (`LossSums.add`).

The run-level consequences are read at `train.log_interval` steps and at epoch ends
(`StepGuard.verdict`): the longest run of consecutive bad steps since the last read, and which
terms were bad. A run then stops with `NonFiniteLoss` when that run reached
`train.max_nonfinite` — up to `log_interval` steps after the step that reached it; those steps
changed nothing, so the stop is only later, not different.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from fastkd.distributed import World, all_reduce_


class StepGuard:
    """Device-side verdicts of every step and the counters read at logging steps."""

    def __init__(self):
        self.streak: Tensor | None = None      # consecutive bad steps up to now
        self.longest: Tensor | None = None     # longest streak since the last verdict
        self.bad: Tensor | None = None         # per term: bad at least once since the last verdict

    def check(self, values: Tensor, world: World) -> Tensor:
        """`ok` (0-dim float, 1.0 when every term of every rank is finite) for the stacked loss
        terms `values`; one tiny all-reduce, no host read."""
        finite = values.detach().isfinite().reshape(values.shape[0], -1).all(dim=1).float()
        finite = all_reduce_(finite, world, op="min")
        ok = finite.min()
        if self.streak is None or self.bad.shape != finite.shape:
            self.streak = torch.zeros((), device=values.device)
            self.longest = torch.zeros((), device=values.device)
            self.bad = torch.zeros_like(finite)
        self.streak = (self.streak + 1) * (1 - ok)
        self.longest = torch.maximum(self.longest, self.streak)
        self.bad = torch.maximum(self.bad, 1 - finite)
        return ok

    def verdict(self) -> tuple[int, list[int]]:
        """(longest streak of bad steps, indices of the bad terms) since the last verdict: a
        host read, for logging steps only. Starts the next window from the current streak."""
        if self.streak is None:
            return 0, []
        longest = int(self.longest.item())
        bad = [i for i, flag in enumerate(self.bad.tolist()) if flag]
        self.longest = self.streak.clone()
        self.bad = torch.zeros_like(self.bad)
        return longest, bad


def optimizer_step(optimizer: torch.optim.Optimizer, ok: Tensor) -> None:
    """`optimizer.step()` that changes nothing when `ok` is 0: on the device for optimizers
    that take GradScaler's `found_inf` (fused torch SGD/Adam/AdamW), else by a host read."""
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer.found_inf = (1 - ok).to(torch.float32)
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif bool(ok):    # host read: this optimizer cannot skip on the device
        optimizer.step()


@torch.no_grad()
def ema_update_(ema, model: nn.Module, step: int, ok: Tensor) -> None:
    """timm `ModelEmaV3.update` (foreach, buffers included) with the interpolation weight
    multiplied by `ok`: a bad step leaves the EMA as it was. EMA tensors in bf16 use timm's
    stochastic rounding, which takes a Python weight: those read `ok` to the host."""
    pairs = list(zip(ema.module.state_dict().values(), model.state_dict().values()))
    if getattr(ema, "stochastic_rounding", False) and any(
            e.dtype == torch.bfloat16 for e, _ in pairs):
        if bool(ok):
            ema.update(model, step=step)
        return
    weight = ok * (1.0 - ema.get_decay(step))
    for ema_v, model_v in pairs:
        if ema_v.is_floating_point():
            ema_v.lerp_(model_v.to(ema_v.dtype), weight)
        else:
            ema_v.copy_(torch.where(ok > 0, model_v, ema_v))
