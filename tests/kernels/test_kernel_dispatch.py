"""`fastkd.kernels.FUSED`: the names `fastkd.losses._fused` looks up, each a callable with the
signature of the eager loss it replaces (the dispatcher passes positional arguments)."""
from __future__ import annotations

import inspect

import pytest
import torch

from fastkd import losses
from fastkd.kernels import FUSED

EAGER = {"kd": losses.kd_loss, "dkd": losses.dkd_loss, "nkd": losses.nkd_loss,
         "ofa": losses.ofa_loss, "feature_mimic": losses.feature_mimic_loss,
         "freq_decoupled": losses.freq_decoupled_loss}


def test_fused_names_are_the_dispatched_ones():
    assert set(FUSED) == set(EAGER)


@pytest.mark.parametrize("name", sorted(EAGER))
def test_fused_signature_is_the_eager_one(name):
    fused, eager = inspect.signature(FUSED[name]), inspect.signature(EAGER[name])
    assert [(p.name, p.default, p.kind) for p in fused.parameters.values()] == \
           [(p.name, p.default, p.kind) for p in eager.parameters.values()]


@pytest.mark.gpu
def test_cuda_inputs_reach_the_kernel(monkeypatch):
    calls = []
    monkeypatch.setitem(FUSED, "kd", lambda *args: calls.append(args) or torch.zeros(()))
    monkeypatch.delenv("FASTKD_KERNELS", raising=False)
    student, teacher = torch.randn(2, 10, device="cuda"), torch.randn(2, 10, device="cuda")
    losses.kd_loss(student, teacher, 2.0)
    assert len(calls) == 1 and calls[0][2] == 2.0
    monkeypatch.setenv("FASTKD_KERNELS", "eager")
    losses.kd_loss(student, teacher, 2.0)
    assert len(calls) == 1


def test_feature_kernels_refuse_maps_over_one_tile_and_losses_fall_back():
    from fastkd.kernels import MAX_POSITIONS, supports
    assert supports("freq_decoupled", torch.empty(1, 8, 7, 7))
    assert supports("feature_mimic", torch.empty(1, 8, 64, 64)) == (64 * 64 <= MAX_POSITIONS)
    assert not supports("freq_decoupled", torch.empty(1, 8, 65, 65))
    assert supports("kd", torch.empty(2, 10))
