"""Shared checks for the fused-kernel tests: each fused loss against its `fastkd.losses` eager
reference, forward and backward, on the same inputs.

Without a GPU the kernels run under Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1); the interpreter takes CPU tensors as they are. Keep batches to a few rows:
each program instance costs milliseconds there.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import pytest
import torch

from fastkd.losses import eager_only

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (loss rtol, loss atol, grad rtol, grad atol) per input dtype
TOLERANCES = {
    torch.float32: (1e-5, 1e-6, 1e-5, 1e-7),
    torch.bfloat16: (1e-2, 1e-3, 1e-2, 1e-4),
    torch.float16: (1e-2, 1e-3, 1e-2, 1e-4),
}


@pytest.fixture(autouse=True)
def _quiet_interpreter():
    """The interpreter evaluates masked lanes too (−inf − (−inf) = NaN there, then discarded);
    numpy would warn about each."""
    with np.errstate(invalid="ignore", over="ignore", divide="ignore", under="ignore"):
        yield


def run_with_grad(loss_fn: Callable, leaf: torch.Tensor, args: tuple,
                  view: Callable = lambda x: x, grad_scale: float = 2.5):
    """loss_fn(view(leaf'), *args) on a fresh copy leaf' of `leaf`; backward of loss·grad_scale
    (≠ 1, so the kernels' grad_output scaling is exercised). Returns (loss, leaf'.grad)."""
    copy = leaf.detach().clone().requires_grad_()
    loss = loss_fn(view(copy), *args)
    (loss * grad_scale).backward()
    return loss.detach(), copy.grad


def assert_matches_eager(fused: Callable, eager: Callable, leaf: torch.Tensor, args: tuple,
                         view: Callable = lambda x: x, dtype: torch.dtype | None = None):
    """Fused and eager agree on the loss and the gradient (per-dtype tolerances), and the
    fused result is finite wherever eager's is."""
    rtol, atol, grad_rtol, grad_atol = TOLERANCES[dtype or leaf.dtype]
    loss, grad = run_with_grad(fused, leaf, args, view)
    with eager_only():
        expected_loss, expected_grad = run_with_grad(eager, leaf, args, view)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert grad.dtype == leaf.dtype and grad.shape == leaf.shape
    torch.testing.assert_close(loss, expected_loss, rtol=rtol, atol=atol, equal_nan=True)
    torch.testing.assert_close(grad.float(), expected_grad.float(), rtol=grad_rtol,
                               atol=grad_atol * max(expected_grad.abs().max().item(), 1.0),
                               equal_nan=True)
    assert torch.isfinite(grad)[torch.isfinite(expected_grad)].all()
    return loss, expected_loss


@pytest.fixture
def check_fused() -> Callable:
    """`assert_matches_eager`, as a fixture (conftest modules are not imported by tests)."""
    return assert_matches_eager


@pytest.fixture
def loss_and_grad() -> Callable:
    """`run_with_grad`, as a fixture."""
    return run_with_grad
