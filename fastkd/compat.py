"""The private torch and timm APIs fastkd uses, in one place, each behind a guard.

Each shim names the private attribute it reaches and checks that it is there: a release that
drops or renames one either takes the public fallback given here or fails with a message that
names the installed version, instead of an AttributeError deep in a run. Checked on torch 2.4
to 2.14 and timm 1.0; tests/test_compat.py checks each shim on the installed versions.
"""
from __future__ import annotations

import timm
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

_DDP_IGNORE = "_set_params_and_buffers_to_ignore_for_model"


def _missing(package: str, version: str, name: str, purpose: str) -> RuntimeError:
    return RuntimeError(f"fastkd uses {name} ({purpose}), which {package} {version} lacks; "
                        f"install a {package} version fastkd supports (setup.py)")


def ddp_ignore(module: nn.Module, names: list[str]) -> None:
    """A `DistributedDataParallel` built on `module` afterwards neither broadcasts nor
    all-reduces these parameters and buffers (dotted names): torch's private
    `DistributedDataParallel._set_params_and_buffers_to_ignore_for_model` (torch ≥ 1.8)."""
    setter = getattr(DistributedDataParallel, _DDP_IGNORE, None)
    if setter is None:
        raise _missing("torch", torch.__version__, f"DistributedDataParallel.{_DDP_IGNORE}",
                       "DDP leaves the method's own buffers alone")
    setter(module, names)


def ddp_ignored(module: nn.Module) -> set[str]:
    """The names `ddp_ignore` gave `module` (torch keeps them in the private attribute
    `_ddp_params_and_buffers_to_ignore`, which its DDP reads); empty if none were given."""
    return set(getattr(module, "_ddp_params_and_buffers_to_ignore", ()))


PUBLIC_NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
    nn.LazyBatchNorm1d, nn.LazyBatchNorm2d, nn.LazyBatchNorm3d,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
    nn.LazyInstanceNorm1d, nn.LazyInstanceNorm2d, nn.LazyInstanceNorm3d,
)
"""The batch and instance norms of torch.nn: the layers that keep running statistics."""

NORM_LAYERS: tuple[type[nn.Module], ...] = (
    (nn.modules.batchnorm._NormBase,) if hasattr(nn.modules.batchnorm, "_NormBase")
    else PUBLIC_NORM_LAYERS)
"""For `isinstance`: torch's private common base of `PUBLIC_NORM_LAYERS` (which also covers
subclasses defined elsewhere), or those classes themselves on a torch without it."""


def _ema_rounding_generator(ema: nn.Module) -> torch.Generator | None:
    """timm `ModelEmaV3`'s private generator for stochastic bf16 rounding (`_sr_generator`);
    None for a timm whose EMA has no stochastic rounding."""
    generator = getattr(ema, "_sr_generator", None)
    if generator is None and hasattr(ema, "stochastic_rounding"):
        raise _missing("timm", timm.__version__, "ModelEmaV3._sr_generator",
                       "checkpoints carry the EMA's stochastic-rounding state")
    return generator


def ema_rounding_state(ema: nn.Module) -> Tensor | None:
    """The state of the EMA's stochastic-rounding generator, for a checkpoint (None: none)."""
    generator = _ema_rounding_generator(ema)
    return generator.get_state() if generator is not None else None


def restore_ema_rounding_state(ema: nn.Module, state: Tensor | None) -> None:
    """Inverse of `ema_rounding_state`; a None state (saved without one) leaves it as is."""
    generator = _ema_rounding_generator(ema)
    if generator is not None and state is not None:
        generator.set_state(state)
