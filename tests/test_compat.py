"""fastkd.compat: each private torch/timm API fastkd reaches works on the installed versions,
and each guard says what is missing when a release drops it."""
from __future__ import annotations

import re

import pytest
import torch
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fastkd import compat


class _WithBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 2)
        self.register_buffer("bank", torch.zeros(3))


def test_ddp_ignore_is_what_ddp_reads():
    module = _WithBuffer()
    assert compat.ddp_ignored(module) == set()
    compat.ddp_ignore(module, ["bank", "linear.bias"])
    assert compat.ddp_ignored(module) == {"bank", "linear.bias"}


def test_ddp_ignore_without_the_private_setter_names_torch(monkeypatch):
    monkeypatch.delattr(DistributedDataParallel, "_set_params_and_buffers_to_ignore_for_model")
    with pytest.raises(RuntimeError, match=re.escape(f"torch {torch.__version__}")):
        compat.ddp_ignore(_WithBuffer(), ["bank"])


def _subclasses(cls: type) -> set[type]:
    direct = set(cls.__subclasses__())
    return direct.union(*(_subclasses(sub) for sub in direct)) if direct else set()


def test_norm_layers_are_the_layers_with_running_statistics():
    for layer in (nn.BatchNorm2d(3), nn.SyncBatchNorm(3), nn.InstanceNorm2d(3),
                  nn.LazyBatchNorm1d()):
        assert isinstance(layer, compat.NORM_LAYERS)
    for layer in (nn.LayerNorm(3), nn.GroupNorm(1, 3), nn.Linear(2, 2)):
        assert not isinstance(layer, compat.NORM_LAYERS)


def test_public_norm_fallback_covers_the_private_base():
    """On a torch without `_NormBase` the public classes stand in: they are every public
    torch.nn class below it."""
    base = nn.modules.batchnorm._NormBase
    public = {cls for cls in _subclasses(base)
              if cls.__module__.startswith("torch.nn.") and not cls.__name__.startswith("_")}
    assert public == set(compat.PUBLIC_NORM_LAYERS)


def test_ema_rounding_state_round_trips():
    ema = ModelEmaV3(nn.Linear(4, 4))
    saved = compat.ema_rounding_state(ema)
    generator = ema._sr_generator
    first = torch.rand(3, generator=generator)
    compat.restore_ema_rounding_state(ema, saved)
    torch.testing.assert_close(torch.rand(3, generator=generator), first)
    compat.restore_ema_rounding_state(ema, None)   # a checkpoint without one: left as it is
    assert torch.equal(compat.ema_rounding_state(ema), generator.get_state())


def test_ema_rounding_guard():
    ema = ModelEmaV3(nn.Linear(4, 4))
    del ema._sr_generator                   # stochastic rounding, but the generator renamed
    with pytest.raises(RuntimeError, match="_sr_generator.*timm "):
        compat.ema_rounding_state(ema)
    del ema.stochastic_rounding             # an EMA without stochastic rounding: nothing to save
    assert compat.ema_rounding_state(ema) is None
    compat.restore_ema_rounding_state(ema, torch.zeros(8, dtype=torch.uint8))
