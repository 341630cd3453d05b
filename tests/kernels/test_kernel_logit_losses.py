"""Fused logit losses (`kernels/kd.py`, `dkd.py`, `nkd.py`, `ofa.py`) against their eager
references in `fastkd.losses`: forward and backward, by shape, dtype, temperature, top-k
teacher, extreme logits and memory layout."""
from __future__ import annotations

import pytest
import torch

from fastkd import losses
from fastkd.kernels import FUSED

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# name -> (eager loss, the arguments after (student, teacher, [target]) at temperature T)
LOSSES = {
    "kd": (losses.kd_loss, lambda T: (T,)),
    "dkd": (losses.dkd_loss, lambda T: (1.0, 8.0, T)),
    "nkd": (losses.nkd_loss, lambda T: (T, 1.5)),
    "ofa": (losses.ofa_loss, lambda T: (1.5, T)),
}
NAMES = list(LOSSES)


def _logits(batch: int, classes: int, dtype=torch.float32, scale: float = 3.0) -> torch.Tensor:
    return (torch.randn(batch, classes, device=DEVICE) * scale).to(dtype)


def _targets(batch: int, classes: int) -> torch.Tensor:
    return torch.randint(0, classes, (batch,), device=DEVICE)


def _args(name: str, teacher, target: torch.Tensor, temperature: float) -> tuple:
    eager, hyper = LOSSES[name]
    with_target = (teacher,) if name == "kd" else (teacher, target)
    return with_target + hyper(temperature)


def _check(check_fused, name, student, teacher, target, temperature, **kwargs):
    return check_fused(FUSED[name], LOSSES[name][0], student,
                       _args(name, teacher, target, temperature), **kwargs)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("shape", [(4, 10), (3, 37), (2, 1000), (2, 5000)])
def test_matches_eager_fp32(check_fused, name, shape, temperature):
    """K = 37 is odd; K = 5000 spans two 4096-column blocks, the second one partial."""
    _check(check_fused, name, _logits(*shape), _logits(*shape), _targets(*shape), temperature)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 37), (2, 1000)])
def test_matches_eager_low_precision(check_fused, name, shape, dtype):
    _check(check_fused, name, _logits(*shape, dtype), _logits(*shape, dtype), _targets(*shape),
           2.0)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("k", [1, 5, 37])
def test_topk_teacher(check_fused, name, k):
    """k = K leaves no tail; row 0's target is a top-k class, the others' may not be."""
    teacher = _logits(3, 37)
    topk = losses.topk_from_logits(teacher, k)
    target = _targets(3, 37)
    target[0] = topk.indices[0, k // 2]
    _check(check_fused, name, _logits(3, 37), topk, target, 2.0)


@pytest.mark.parametrize("name", NAMES)
def test_topk_teacher_many_classes_low_precision(check_fused, name):
    teacher = _logits(2, 5000, torch.bfloat16)
    topk = losses.topk_from_logits(teacher, 20)
    _check(check_fused, name, _logits(2, 5000, torch.bfloat16), topk, _targets(2, 5000), 1.0)


def _extreme_rows(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masked classes (−inf on both sides, or on the teacher only, the target among them),
    +inf logits (clamped to 1e30 by the reference) and ±1e4 logits; every loss stays finite."""
    student, teacher, target = _logits(4, 37), _logits(4, 37), _targets(4, 37)
    student[0, :5] = teacher[0, :5] = float("-inf")
    teacher[1, 10:20] = float("-inf")
    target[1] = 12
    student[2, 7] = teacher[2, 8] = float("inf")
    target[2] = 8
    student[3, ::3] = 1e4
    student[3, 1::5] = -1e4
    teacher[3, 3], teacher[3, 4] = 1e4, -1e4
    target[3] = 3
    return student.to(dtype), teacher.to(dtype), target


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_extreme_logits_stay_finite(check_fused, name, dtype, temperature):
    student, teacher, target = _extreme_rows(dtype)
    loss, expected = _check(check_fused, name, student, teacher, target, temperature)
    assert torch.isfinite(expected) and torch.isfinite(loss)


@pytest.mark.parametrize("name", NAMES)
def test_extreme_logits_topk_teacher(check_fused, name):
    student, teacher, target = _extreme_rows(torch.float32)
    teacher[2, 8] = 1e4  # a cache never holds +inf: its logsumexp would be inf
    topk = losses.topk_from_logits(teacher, 6)
    student[1][topk.indices[1, :2]] = 1e4
    _check(check_fused, name, student, topk, target, 2.0)


@pytest.mark.parametrize("name", NAMES)
def test_student_ruling_out_a_teacher_class(check_fused, name):
    """A −inf student logit where the teacher has mass: eager gives +inf (kd, dkd, ofa, nkd's
    non-target term); the kernel must agree, and give no NaN gradient where eager has none."""
    student, teacher, target = _logits(2, 37), _logits(2, 37), _targets(2, 37)
    student[1, (target[1] + 1) % 37] = float("-inf")
    loss, expected = _check(check_fused, name, student, teacher, target, 1.0)
    assert loss == expected == float("inf")


@pytest.mark.parametrize("name", NAMES)
def test_non_contiguous_inputs(check_fused, name):
    """A transposed student (column stride 3), a column-sliced teacher (row stride 50), a
    strided target."""
    teacher = _logits(3, 50)[:, 5:42]
    target = _targets(6, 37)[::2]
    _check(check_fused, name, _logits(37, 3), teacher, target, 2.0, view=lambda x: x.t())


@pytest.mark.parametrize("name", NAMES)
def test_gradient_reaches_the_student_only(name):
    student, teacher = _logits(2, 37).requires_grad_(), _logits(2, 37).requires_grad_()
    FUSED[name](*(student,) + _args(name, teacher, _targets(2, 37), 1.0)).backward()
    assert student.grad is not None and teacher.grad is None


@pytest.mark.gpu
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(256, 1000), (1024, 1000), (256, 21843)])
def test_full_size_gpu(check_fused, name, shape, dtype):
    student, teacher, target = _logits(*shape, dtype), _logits(*shape, dtype), _targets(*shape)
    _check(check_fused, name, student, teacher, target, 4.0)
    _check(check_fused, name, student, losses.topk_from_logits(teacher, 10), target, 1.0)


def test_nkd_zero_teacher_target_weight_adds_zero(check_fused):
    """q_y = 0 (teacher −inf at the target) against log p_y = −inf (student −inf there): the
    target term adds 0, as in eager, not 0·(−inf) = NaN."""
    student, teacher, target = _logits(3, 37), _logits(3, 37), _targets(3, 37)
    target[0], target[2] = 4, 30
    student[0, 4] = teacher[0, 4] = float("-inf")
    teacher[2, 25:35] = float("-inf")
    student[2, 30] = float("-inf")
    loss, expected = _check(check_fused, "nkd", student, teacher, target, 2.0)
    assert torch.isfinite(expected) and torch.isfinite(loss)
    topk = losses.topk_from_logits(teacher, 5)  # the rebuilt tail is finite: q_y > 0, no guard
    _check(check_fused, "nkd", student, topk, target, 2.0)


@pytest.mark.gpu
@pytest.mark.parametrize("name", NAMES)
def test_transposed_student_past_int32_offsets_gpu(name):
    """A transposed B×K student (column stride B) with B·K > 2³¹: column offsets need int64.
    Checked on the last rows against eager on those rows alone (row losses are independent);
    one cached teacher row, broadcast over the batch, keeps the teacher small."""
    classes, batch = 21843, 2**31 // 21843 + 2
    storage = torch.randn(classes, batch, device=DEVICE, dtype=torch.bfloat16).requires_grad_()
    one_row = losses.topk_from_logits(_logits(1, classes, torch.bfloat16), 10)
    teacher = losses.TopKLogits(*(x.expand(batch, *x.shape[1:]) for x in one_row))
    target = _targets(batch, classes)
    FUSED[name](*(storage.t(),) + _args(name, teacher, target, 2.0)).backward()
    last = storage.detach().t()[-2:].float().requires_grad_()
    last_teacher = losses.TopKLogits(*(x[-2:] for x in teacher))
    expected = LOSSES[name][0](last, *_args(name, last_teacher, target[-2:], 2.0))
    (expected_grad,) = torch.autograd.grad(expected * 2 / batch, last)
    torch.testing.assert_close(storage.grad.t()[-2:].float(), expected_grad, rtol=2e-2,
                               atol=1e-6 * expected_grad.abs().max().item())
