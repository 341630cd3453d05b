"""The skeleton of the fused logit losses (kd.py, dkd.py, nkd.py, ofa.py).

Every logit loss runs as one forward and one backward launch of `_row_kernel`, one program per
row of the B×K logits. The forward reads the row once and writes the row loss and a few row statistics;
the backward re-reads the row and writes the gradient from those statistics. Why not save the
gradient in the forward: it needs the finished softmaxes, so the forward would read each row
twice, and the B×K gradient would stay allocated until backward, which still reads and rescales
it: 6–7 row-sized transfers against 5 (forward reads z_s, z_t; backward reads them again and
writes the gradient).

What every loss shares lives here: the kernel (row set-up, target, dense or top-k teacher,
statistics, and the backward's column loop and top-k rewrite), the host launcher and the
`autograd.Function`. A loss file supplies a `RowLoss`: its row formula (forward) and its
element gradient (backward), both `@triton.jit` functions with the signatures below.

    row_loss(student, teacher, y, num_classes, temperature, hyper, TOPK, BLOCK)
        -> (row loss before scaling, tuple of `num_stats` fp32 row statistics)
    gradient(z, t, is_target, stats, hyper, scale, temperature) -> ∂loss/∂z on a block

`student` is (row pointer, column stride); `teacher` is (row pointer, column stride, top-k
values, top-k indices, top-k validity, tail logit r at T = 1, k), the top-k entries being
placeholders for a dense teacher; `y` is the target class (−1 for a loss without one); `hyper`
is (hyper_a, hyper_b), the loss's own parameters; in `gradient`, `z` is the raw student block,
`t` the teacher block at T (`load_teacher_block`) and `scale` the incoming gradient times the
loss's gradient scale.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastkd.kernels.online_softmax import (empty_logsumexp, empty_weighted_sum, load_row_block,
                                           load_teacher_block, load_topk_teacher,
                                           online_logsumexp, online_weighted_sum,
                                           replace_tail_at_topk, row_launch_config, scale_logits,
                                           topk_logsumexp, topk_target_logit,
                                           with_infinite_terms)
from fastkd.loss_conventions import TopKLogits

Scale = Callable[[int, float], tuple[float, float]]  # (batch, T) -> (factor, divisor)


@dataclass(frozen=True)
class RowLoss:
    """One fused logit loss: its two formulas, how many statistics a row saves, and the
    (factor, divisor) that scale its row loss and its gradient for a batch at temperature T."""

    row_loss: triton.runtime.JITFunction
    gradient: triton.runtime.JITFunction
    num_stats: int
    loss_scale: Scale
    grad_scale: Scale


@triton.jit
def _row_kernel(
    student_ptr, student_row_stride, student_col_stride,
    teacher_ptr, teacher_row_stride, teacher_col_stride,
    index_ptr, index_row_stride, index_col_stride, lse_ptr, lse_stride, num_topk,
    target_ptr, target_stride, stats_ptr, out_ptr, grad_output_ptr, num_classes, temperature,
    hyper_a, hyper_b, factor, divisor,
    FORMULA: tl.constexpr, NUM_STATS: tl.constexpr, HAS_TARGET: tl.constexpr,
    BACKWARD: tl.constexpr, TOPK: tl.constexpr, BLOCK: tl.constexpr, BLOCK_TOPK: tl.constexpr,
):
    """Row b of a logit loss: forward, out_b = FORMULA(row b) · factor / divisor and its
    NUM_STATS statistics; BACKWARD, out_b = the row's gradient (`_store_gradient`)."""
    row = tl.program_id(0).to(tl.int64)
    student = (student_ptr + row * student_row_stride, student_col_stride)
    teacher_row = teacher_ptr + row * teacher_row_stride
    if TOPK:
        values, indices, valid, tail = load_topk_teacher(
            teacher_row, teacher_col_stride, index_ptr + row * index_row_stride,
            index_col_stride, tl.load(lse_ptr + row * lse_stride), num_topk, num_classes,
            BLOCK_TOPK)
        teacher = (teacher_row, teacher_col_stride, values, indices, valid, tail, num_topk)
    else:
        teacher = (teacher_row, teacher_col_stride, 0.0, 0, False, 0.0, 0)
    if HAS_TARGET:
        y = tl.load(target_ptr + row * target_stride).to(tl.int64)
    else:
        y = -1
    stats_row = stats_ptr + row * NUM_STATS
    hyper = (hyper_a, hyper_b)
    if BACKWARD:
        scale = tl.load(grad_output_ptr) * factor / divisor
        _store_gradient(out_ptr + row * num_classes, student, teacher, y, stats_row, num_classes,
                        temperature, hyper, scale, FORMULA, NUM_STATS, TOPK, BLOCK)
    else:
        loss, stats = FORMULA(student, teacher, y, num_classes, temperature, hyper, TOPK, BLOCK)
        tl.store(out_ptr + row, loss * factor / divisor)
        for i in tl.static_range(NUM_STATS):
            tl.store(stats_row + i, stats[i])


@triton.jit
def _store_gradient(grad_row, student, teacher, y, stats_row, num_classes, temperature, hyper,
                    scale, FORMULA: tl.constexpr, NUM_STATS: tl.constexpr, TOPK: tl.constexpr,
                    BLOCK: tl.constexpr):
    """grad_k = FORMULA(column k) from the row's saved statistics, into `grad_row`.

    Top-k: every column is first written with the tail teacher logit, then (after a barrier,
    so the two stores to a top-k column are ordered) the k top-k columns are rewritten.
    """
    student_row, student_col_stride = student
    teacher_row, teacher_col_stride, values, indices, valid, tail, _ = teacher
    tail = scale_logits(tail, temperature)
    stats = ()
    for i in tl.static_range(NUM_STATS):
        stats = stats + (tl.load(stats_row + i),)
    for start in range(0, num_classes, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < num_classes
        z = load_row_block(student_row, cols, student_col_stride, mask)
        t = load_teacher_block(teacher_row, cols, teacher_col_stride, mask, tail, temperature, TOPK)
        grad = FORMULA(z, t, cols == y, stats, hyper, scale, temperature)
        tl.store(grad_row + cols, grad.to(grad_row.dtype.element_ty), mask=mask)
    if TOPK:
        tl.debug_barrier()
        z = load_row_block(student_row, indices, student_col_stride, valid)
        grad = FORMULA(z, scale_logits(values, temperature), indices == y, stats, hyper, scale,
                       temperature)
        tl.store(grad_row + indices, grad.to(grad_row.dtype.element_ty), mask=valid)


# ----------------------------------------------------------------------------------------------
# Device helpers the formulas share
# ----------------------------------------------------------------------------------------------

@triton.jit
def logit_at(student, y, temperature):
    """The student logit of class y, over T (`scale_logits`)."""
    row, col_stride = student
    return scale_logits(tl.load(row + y * col_stride).to(tl.float32), temperature)


@triton.jit
def teacher_logit_at(teacher, y, temperature, TOPK: tl.constexpr):
    """The teacher logit of class y over T: loaded, or (top-k) its top-k value, else the tail."""
    row, col_stride, values, indices, valid, tail, _ = teacher
    if TOPK:
        logit = scale_logits(topk_target_logit(values, indices, valid, tail, y), temperature)
    else:
        logit = logit_at((row, col_stride), y, temperature)
    return logit


@triton.jit
def topk_teacher_logsumexp(teacher, num_classes, temperature):
    """(max, log Σ exp(· − max)) of a top-k teacher's reconstructed row over T."""
    _, _, values, _, _, tail, num_topk = teacher
    return topk_logsumexp(scale_logits(values, temperature), scale_logits(tail, temperature),
                          num_classes - num_topk)


@triton.jit
def kl_row_sums(student, teacher, y, num_classes, temperature, TOPK: tl.constexpr,
                BLOCK: tl.constexpr):
    """One pass over a row, class y left out (y = −1: none): (m_s, z_s, m_t, z_t, d), the
    running max and Σ exp(· − max) of s = z_s/T and of t = z_t/T, and
    d = Σ_k exp(t_k − m_t)·[(t_k − m_t) − (s_k − m_s)], so that
    KL(σ(t) ‖ σ(s)) = d / z_t − log z_t + log z_s."""
    student_row, student_col_stride = student
    teacher_row, teacher_col_stride, values, indices, valid, tail, _ = teacher
    tail = scale_logits(tail, temperature)
    m_s, z_s = empty_logsumexp()
    d, z_t, n_inf, m_t = empty_weighted_sum()
    for start in range(0, num_classes, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        kept = (cols < num_classes) & (cols != y)
        s = scale_logits(load_row_block(student_row, cols, student_col_stride, kept), temperature)
        t = load_teacher_block(teacher_row, cols, teacher_col_stride, kept, tail, temperature, TOPK)
        m_s_new, z_s = online_logsumexp(m_s, z_s, s, 1.0)
        m_t_new = tl.maximum(m_t, tl.max(t, 0))
        d, z_t, n_inf = online_weighted_sum(d, z_t, n_inf, m_t, m_t_new,
                                            (m_t_new - m_t) - (m_s_new - m_s), t,
                                            (t - m_t_new) - (s - m_s_new), 1.0, 1.0)
        m_s = m_s_new
        m_t = m_t_new
    if TOPK:  # replace the tail logit by the true one at the kept top-k classes
        d, z_t, n_inf, m_t = replace_tail_at_topk(d, z_t, n_inf, m_t, student_row,
                                                  student_col_stride, values, indices,
                                                  valid & (indices != y), tail, m_s,
                                                  temperature, 1.0, True)
    return m_s, z_s, m_t, z_t, with_infinite_terms(d, n_inf, float("inf"))


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------

def _teacher_args(teacher: Tensor | TopKLogits) -> tuple[list, bool, int]:
    """Kernel arguments for the teacher, whether it is top-k, and BLOCK_TOPK.

    Layout: (teacher or top-k values, row stride, col stride, top-k indices, row stride,
    col stride, top-k logsumexp, stride, k); a dense teacher fills the top-k slots with
    unused placeholders.
    """
    if isinstance(teacher, TopKLogits):
        values, indices, lse = teacher
        args = [values, values.stride(0), values.stride(1), indices, indices.stride(0),
                indices.stride(1), lse, lse.stride(0), values.shape[1]]
        return args, True, max(triton.next_power_of_2(values.shape[1]), 2)
    return [teacher, teacher.stride(0), teacher.stride(1), teacher, 0, 0, teacher, 0, 0], False, 2


def _launch(loss: RowLoss, student: Tensor, teacher: Tensor | TopKLogits, target: Tensor | None,
            stats: Tensor, out: Tensor, grad_output: Tensor | None, hyper: tuple) -> None:
    """The row kernel over the rows of `student`: forward when `grad_output` is None."""
    batch, num_classes = student.shape
    block, num_warps = row_launch_config(num_classes)
    teacher_args, topk, block_topk = _teacher_args(teacher)
    backward = grad_output is not None
    has_target = target is not None
    target = target if has_target else student  # placeholder, never read
    temperature, hyper_a, hyper_b = hyper
    scale = (loss.grad_scale if backward else loss.loss_scale)(batch, temperature)
    _row_kernel[(batch,)](
        student, student.stride(0), student.stride(1), *teacher_args, target,
        target.stride(0) if has_target else 0, stats, out, grad_output if backward else out,
        num_classes, temperature, hyper_a, hyper_b, *scale,
        FORMULA=loss.gradient if backward else loss.row_loss, NUM_STATS=loss.num_stats,
        HAS_TARGET=has_target, BACKWARD=backward, TOPK=topk, BLOCK=block,
        BLOCK_TOPK=block_topk, num_warps=num_warps)


def row_loss_forward(loss: RowLoss, student: Tensor, teacher: Tensor | TopKLogits,
                     target: Tensor | None, hyper: tuple) -> tuple[Tensor, Tensor]:
    """The loss (fp32 scalar) and the per-row statistics the backward needs."""
    row_losses = student.new_empty(student.shape[0], dtype=torch.float32)
    stats = student.new_empty((student.shape[0], loss.num_stats), dtype=torch.float32)
    _launch(loss, student, teacher, target, stats, row_losses, None, hyper)
    return row_losses.sum(), stats


def row_loss_backward(loss: RowLoss, grad_output: Tensor, student: Tensor,
                      teacher: Tensor | TopKLogits, target: Tensor | None, stats: Tensor,
                      hyper: tuple) -> Tensor:
    """∂loss/∂student, in the student's dtype, contiguous."""
    grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    _launch(loss, student, teacher, target, stats, grad, grad_output, hyper)
    return grad


class RowLossFunction(torch.autograd.Function):
    """A fused logit loss: `apply(loss, student_logits, teacher_logits, target, temperature,
    hyper_a, hyper_b)`, `target` integer class ids (B,) or None; gradient to the student only
    (the teacher, dense or `TopKLogits`, is a detached target)."""

    @staticmethod
    def forward(ctx, loss: RowLoss, student_logits: Tensor, teacher_logits: Tensor | TopKLogits,
                target: Tensor | None, temperature: float, hyper_a: float = 0.0,
                hyper_b: float = 0.0) -> Tensor:
        hyper = (float(temperature), float(hyper_a), float(hyper_b))
        value, stats = row_loss_forward(loss, student_logits, teacher_logits, target, hyper)
        topk = isinstance(teacher_logits, TopKLogits)
        teacher = tuple(teacher_logits) if topk else (teacher_logits,)
        ctx.save_for_backward(student_logits, target, stats, *teacher)
        ctx.loss, ctx.hyper = loss, hyper
        return value

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        student_logits, target, stats, *teacher = ctx.saved_tensors
        teacher = TopKLogits(*teacher) if len(teacher) == 3 else teacher[0]
        grad = row_loss_backward(ctx.loss, grad_output, student_logits, teacher, target, stats,
                                 ctx.hyper)
        return None, grad, None, None, None, None, None
