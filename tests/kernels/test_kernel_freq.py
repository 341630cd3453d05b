"""Fused feature-map losses (`kernels/freq.py`) against `fastkd.losses.feature_mimic_loss` and
`freq_decoupled_loss`: forward and backward, by shape, mode, weights, dtype and layout."""
from __future__ import annotations

import pytest
import torch

from fastkd import losses
from fastkd.kernels import FUSED

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(2, 24, 7, 7), (3, 5, 3, 5), (2, 40, 14, 14), (1, 3, 64, 64)]
DIMS = ["spatial", "channel"]


def _map(shape, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, device=DEVICE).to(dtype)


@pytest.mark.parametrize("shape", SHAPES)
def test_feature_mimic_matches_eager(check_fused, shape):
    """(3, 5, 3, 5): odd sizes; (2, 40, 14, 14): three channel tiles; 64×64: one channel a tile."""
    check_fused(FUSED["feature_mimic"], losses.feature_mimic_loss, _map(shape), (_map(shape),))


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("shape", SHAPES)
def test_freq_decoupled_matches_eager(check_fused, shape, dim):
    check_fused(FUSED["freq_decoupled"], losses.freq_decoupled_loss, _map(shape),
                (_map(shape), 0.3, 0.7, dim))


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("weights", [(0, 0.7), (0.3, 0), (0.0, 1.0)])
def test_zero_weights(check_fused, dim, weights):
    """A Python-0 weight skips its term (in the kernel too); 0.0 is also a Python 0."""
    shape = (2, 24, 7, 7)
    check_fused(FUSED["freq_decoupled"], losses.freq_decoupled_loss, _map(shape),
                (_map(shape), *weights, dim))


def test_both_weights_zero_is_zero():
    loss = FUSED["freq_decoupled"](_map((2, 4, 3, 3)), _map((2, 4, 3, 3)), 0, 0, "spatial")
    assert loss.dtype == torch.float32 and loss.item() == 0.0


@pytest.mark.parametrize("dim", DIMS)
def test_tensor_weights_get_gradients(loss_and_grad, dim):
    """Tensor weights stay on the device (no host sync) and receive gradients, as in eager."""
    shape = (2, 8, 5, 5)
    student, teacher = _map(shape), _map(shape)
    grads = []
    for loss_fn in (FUSED["freq_decoupled"], losses.freq_decoupled_loss):
        weights = [torch.tensor(w, device=DEVICE, requires_grad=True) for w in (0.3, 0.7)]
        loss, student_grad = loss_and_grad(loss_fn, student, (teacher, *weights, dim))
        grads.append((loss, student_grad, *(w.grad for w in weights)))
    for fused, eager in zip(*grads):
        torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", ["direct", *DIMS])
def test_low_precision(check_fused, dtype, dim):
    shape = (2, 24, 7, 7)
    student, teacher = _map(shape, dtype), _map(shape, dtype)
    if dim == "direct":
        check_fused(FUSED["feature_mimic"], losses.feature_mimic_loss, student, (teacher,))
    else:
        check_fused(FUSED["freq_decoupled"], losses.freq_decoupled_loss, student,
                    (teacher, 0.3, 0.7, dim))


@pytest.mark.parametrize("dim", DIMS)
def test_channels_last_and_sliced_maps(check_fused, dim):
    """Student channels_last (channel stride 1), teacher a channel slice of a larger map."""
    student = _map((2, 24, 7, 7)).to(memory_format=torch.channels_last)
    teacher = _map((2, 30, 7, 7))[:, 3:27]
    check_fused(FUSED["freq_decoupled"], losses.freq_decoupled_loss, student,
                (teacher, 0.3, 0.7, dim))
    check_fused(FUSED["feature_mimic"], losses.feature_mimic_loss, student, (teacher,))


def test_gradient_keeps_the_student_layout(loss_and_grad):
    student = _map((2, 24, 7, 7)).to(memory_format=torch.channels_last)
    _, grad = loss_and_grad(FUSED["feature_mimic"], student, (_map((2, 24, 7, 7)),))
    assert grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dim", DIMS)
def test_degenerate_maps_use_the_eps_branch(check_fused, dim):
    """Constant maps: every AC vector is 0, so F.normalize divides by its eps (1e-12) and the
    gradient takes the 2/N·(u − v) branch; one zero sample makes the DC vectors 0 too."""
    shape = (2, 6, 4, 4)
    student = torch.ones(shape, device=DEVICE) * torch.arange(1, 7, device=DEVICE)[:, None, None]
    student[1] = 0
    check_fused(FUSED["freq_decoupled"], losses.freq_decoupled_loss, student,
                (_map(shape), 0.3, 0.7, dim))
    check_fused(FUSED["feature_mimic"], losses.feature_mimic_loss, student, (_map(shape),))


def test_maps_too_large_for_one_tile_are_refused():
    with pytest.raises(ValueError, match="H·W"):
        FUSED["feature_mimic"](_map((1, 2, 65, 65)), _map((1, 2, 65, 65)))


def test_unknown_dim_is_refused():
    with pytest.raises(ValueError, match="dim"):
        FUSED["freq_decoupled"](_map((1, 2, 3, 3)), _map((1, 2, 3, 3)), 1.0, 1.0, "time")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(256, 768, 7, 7), (256, 384, 14, 14)])
def test_full_size_gpu(check_fused, shape, dtype):
    student, teacher = _map(shape, dtype), _map(shape, dtype)
    check_fused(FUSED["feature_mimic"], losses.feature_mimic_loss, student, (teacher,))
    for dim in DIMS:
        check_fused(FUSED["freq_decoupled"], losses.freq_decoupled_loss, student,
                    (teacher, 0.03, 0.065, dim))
