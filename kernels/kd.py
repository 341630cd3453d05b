"""Fused KL-form KD (`fastkd.losses.kd_loss`): one forward and one backward kernel.

Forward reads each row once (online softmax of both sides) and writes the row loss and four
row statistics (max and log-sum of each softmax). Backward re-reads the logits once and writes
the gradient from those statistics. Why not save the gradient in the forward: it needs the
finished softmaxes, so the forward would read each row twice, and the B×K gradient would stay
allocated until backward, which still reads and rescales it: 6–7 row-sized transfers against 5
(forward reads z_s, z_t; backward reads them again and writes the gradient). The same choice
holds for dkd.py, nkd.py and ofa.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastkd.kernels.online_softmax import (NO_MAX, clamp_passes_gradient, load_row_block,
                                           load_teacher_block, load_topk_teacher, log_softmax_at,
                                           online_logsumexp, online_weighted_sum,
                                           replace_tail_at_topk, restore_teacher,
                                           row_launch_config, scale_logits, teacher_kernel_args,
                                           teacher_tensors, with_infinite_terms)
from fastkd.losses import TopKLogits

_NUM_STATS = tl.constexpr(4)  # per row: max and log-sum of z_s/T, the same of z_t/T


@triton.jit
def _kd_forward_kernel(
    student_ptr, student_row_stride, student_col_stride,
    teacher_ptr, teacher_row_stride, teacher_col_stride,
    index_ptr, index_row_stride, index_col_stride, lse_ptr, lse_stride, num_topk,
    loss_ptr, stats_ptr, num_classes, temperature, loss_scale,
    TOPK: tl.constexpr, BLOCK: tl.constexpr, BLOCK_TOPK: tl.constexpr,
):
    """loss_b = T²/B · KL(q ‖ p),  p = σ(z_s/T), q = σ(z_t/T)

        KL = Σ_k q_k [(t_k − m_t) − (s_k − m_s)] − log z_t + log z_s
           = d / z_t − log z_t + log z_s,   s = z_s/T, t = z_t/T, z = Σ exp(· − m)
    d accumulates e_k·[(t_k − m_t) − (s_k − m_s)], e_k = exp(t_k − m_t), online.
    """
    row = tl.program_id(0).to(tl.int64)
    student_row = student_ptr + row * student_row_stride
    teacher_row = teacher_ptr + row * teacher_row_stride
    tail = 0.0
    if TOPK:
        values, indices, valid, tail = load_topk_teacher(
            teacher_row, teacher_col_stride, index_ptr + row * index_row_stride,
            index_col_stride, tl.load(lse_ptr + row * lse_stride), num_topk, num_classes,
            BLOCK_TOPK)
        tail = scale_logits(tail, temperature)
    m_s = NO_MAX
    z_s = 0.0
    m_t = NO_MAX
    z_t = 0.0
    d = 0.0
    n_inf = 0.0
    for start in range(0, num_classes, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < num_classes
        s = scale_logits(load_row_block(student_row, cols, student_col_stride, mask), temperature)
        t = load_teacher_block(teacher_row, cols, teacher_col_stride, mask, tail, temperature, TOPK)
        m_s_new, z_s = online_logsumexp(m_s, z_s, s, 1.0)
        m_t_new = tl.maximum(m_t, tl.max(t, 0))
        d, z_t, n_inf = online_weighted_sum(d, z_t, n_inf, m_t, m_t_new,
                                            (m_t_new - m_t) - (m_s_new - m_s), t,
                                            (t - m_t_new) - (s - m_s_new), 1.0, 1.0)
        m_s = m_s_new
        m_t = m_t_new
    if TOPK:  # replace the tail logit by the true one at the k top-k classes
        d, z_t, n_inf, m_t = replace_tail_at_topk(d, z_t, n_inf, m_t, student_row,
                                                  student_col_stride, values, indices, valid,
                                                  tail, m_s, temperature, 1.0, True)
    d = with_infinite_terms(d, n_inf, float("inf"))
    kl = d / z_t - tl.log(z_t) + tl.log(z_s)
    tl.store(loss_ptr + row, kl * loss_scale)
    stats = stats_ptr + row * _NUM_STATS
    tl.store(stats, m_s)
    tl.store(stats + 1, tl.log(z_s))
    tl.store(stats + 2, m_t)
    tl.store(stats + 3, tl.log(z_t))


@triton.jit
def _kd_gradient(z, t, m_s, log_z_s, m_t, log_z_t, scale, temperature):
    """∂loss/∂z_s,k = g·T/B · (p_k − q_k); 0 where z_s/T was clamped."""
    p = tl.exp(log_softmax_at(scale_logits(z, temperature), m_s, log_z_s))
    grad = scale * (p - tl.exp(log_softmax_at(t, m_t, log_z_t)))
    return tl.where(clamp_passes_gradient(z, temperature), grad, 0.0)


@triton.jit
def _kd_backward_kernel(
    student_ptr, student_row_stride, student_col_stride,
    teacher_ptr, teacher_row_stride, teacher_col_stride,
    index_ptr, index_row_stride, index_col_stride, lse_ptr, lse_stride, num_topk,
    stats_ptr, grad_output_ptr, grad_ptr, num_classes, temperature, grad_scale,
    TOPK: tl.constexpr, BLOCK: tl.constexpr, BLOCK_TOPK: tl.constexpr,
):
    """grad_b,k = g · T/B · (σ(z_s/T)_k − σ(z_t/T)_k), from the saved row statistics.

    Top-k: every column is first written with the tail teacher logit, then (after a barrier,
    so the two stores to a top-k column are ordered) the k top-k columns are rewritten.
    """
    row = tl.program_id(0).to(tl.int64)
    student_row = student_ptr + row * student_row_stride
    teacher_row = teacher_ptr + row * teacher_row_stride
    grad_row = grad_ptr + row * num_classes
    scale = tl.load(grad_output_ptr) * grad_scale
    stats = stats_ptr + row * _NUM_STATS
    m_s = tl.load(stats)
    log_z_s = tl.load(stats + 1)
    m_t = tl.load(stats + 2)
    log_z_t = tl.load(stats + 3)
    tail = 0.0
    if TOPK:
        values, indices, valid, tail = load_topk_teacher(
            teacher_row, teacher_col_stride, index_ptr + row * index_row_stride,
            index_col_stride, tl.load(lse_ptr + row * lse_stride), num_topk, num_classes,
            BLOCK_TOPK)
        tail = scale_logits(tail, temperature)
    for start in range(0, num_classes, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < num_classes
        z = load_row_block(student_row, cols, student_col_stride, mask)
        t = load_teacher_block(teacher_row, cols, teacher_col_stride, mask, tail, temperature, TOPK)
        grad = _kd_gradient(z, t, m_s, log_z_s, m_t, log_z_t, scale, temperature)
        tl.store(grad_row + cols, grad.to(grad_ptr.dtype.element_ty), mask=mask)
    if TOPK:
        tl.debug_barrier()
        z = load_row_block(student_row, indices, student_col_stride, valid)
        grad = _kd_gradient(z, scale_logits(values, temperature), m_s, log_z_s, m_t, log_z_t,
                            scale, temperature)
        tl.store(grad_row + indices, grad.to(grad_ptr.dtype.element_ty), mask=valid)


def kd_forward(student_logits: Tensor, teacher_logits: Tensor | TopKLogits,
               temperature: float) -> tuple[Tensor, Tensor]:
    """The loss (fp32 scalar) and the per-row statistics the backward needs."""
    batch, num_classes = student_logits.shape
    block, num_warps = row_launch_config(num_classes)
    teacher_args, topk, block_topk = teacher_kernel_args(teacher_logits)
    row_losses = student_logits.new_empty(batch, dtype=torch.float32)
    stats = student_logits.new_empty((batch, _NUM_STATS), dtype=torch.float32)
    _kd_forward_kernel[(batch,)](
        student_logits, student_logits.stride(0), student_logits.stride(1), *teacher_args,
        row_losses, stats, num_classes, temperature, temperature * temperature / batch,
        TOPK=topk, BLOCK=block, BLOCK_TOPK=block_topk, num_warps=num_warps)
    return row_losses.sum(), stats


def kd_backward(grad_output: Tensor, student_logits: Tensor, teacher_logits: Tensor | TopKLogits,
                stats: Tensor, temperature: float) -> Tensor:
    """∂loss/∂student_logits, in the student's dtype, contiguous."""
    batch, num_classes = student_logits.shape
    block, num_warps = row_launch_config(num_classes)
    teacher_args, topk, block_topk = teacher_kernel_args(teacher_logits)
    grad = torch.empty((batch, num_classes), dtype=student_logits.dtype,
                       device=student_logits.device)
    _kd_backward_kernel[(batch,)](
        student_logits, student_logits.stride(0), student_logits.stride(1), *teacher_args,
        stats, grad_output, grad, num_classes, temperature, temperature / batch,
        TOPK=topk, BLOCK=block, BLOCK_TOPK=block_topk, num_warps=num_warps)
    return grad


class KDFunction(torch.autograd.Function):
    """Fused `kd_loss(student_logits, teacher_logits, temperature)`; gradient to the student
    only (the teacher, dense or `TopKLogits`, is a detached target)."""

    @staticmethod
    def forward(ctx, student_logits: Tensor, teacher_logits: Tensor | TopKLogits,
                temperature: float) -> Tensor:
        temperature = float(temperature)
        loss, stats = kd_forward(student_logits, teacher_logits, temperature)
        ctx.save_for_backward(student_logits, stats, *teacher_tensors(teacher_logits))
        ctx.temperature = temperature
        return loss

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        student_logits, stats, *teacher = ctx.saved_tensors
        grad = kd_backward(grad_output, student_logits, restore_teacher(tuple(teacher)), stats,
                           ctx.temperature)
        return grad, None, None
