"""Fused normalized KD (`fastkd.losses.nkd_loss`): one forward and one backward kernel.

NKD mixes two temperatures: the target term is taken at T = 1 over all classes, the
non-target term at T over the classes without the target. One pass over each row keeps both
sets of running statistics; seven floats per row are saved for the backward pass, which re-reads
the logits once (as in `kd.py`).
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
                                           teacher_tensors, topk_logsumexp, topk_target_logit,
                                           with_infinite_terms)
from fastkd.losses import TopKLogits

_NUM_STATS = tl.constexpr(7)  # max, log-sum of z_s; of s, t over k ≠ y; σ(z_t)_y


@triton.jit
def _nkd_forward_kernel(
    student_ptr, student_row_stride, student_col_stride,
    teacher_ptr, teacher_row_stride, teacher_col_stride,
    index_ptr, index_row_stride, index_col_stride, lse_ptr, lse_stride, num_topk,
    target_ptr, target_stride, loss_ptr, stats_ptr, num_classes, temperature, gamma, batch,
    TOPK: tl.constexpr, BLOCK: tl.constexpr, BLOCK_TOPK: tl.constexpr,
):
    """loss_b = (1/B) · [ −q1_y · log p1_y + γ T² · CE(σ(t_{≠y}), σ(s_{≠y})) ]

        p1, q1 = σ(z_s), σ(z_t) at T = 1 (q1_y detached);  s, t = z_s/T, z_t/T
        CE = −Σ_{k≠y} q̂_k log p̂_k = log z_s − c / z_t,
        c = Σ_{k≠y} exp(t_k − m_t)(s_k − m_s), accumulated online (zero weights add 0).
    """
    row = tl.program_id(0).to(tl.int64)
    student_row = student_ptr + row * student_row_stride
    teacher_row = teacher_ptr + row * teacher_row_stride
    y = tl.load(target_ptr + row * target_stride).to(tl.int64)
    s1_y = scale_logits(tl.load(student_row + y * student_col_stride).to(tl.float32), 1.0)
    m_t1 = NO_MAX
    z_t1 = 0.0
    tail = 0.0
    if TOPK:
        values, indices, valid, tail = load_topk_teacher(
            teacher_row, teacher_col_stride, index_ptr + row * index_row_stride,
            index_col_stride, tl.load(lse_ptr + row * lse_stride), num_topk, num_classes,
            BLOCK_TOPK)
        t1_y = scale_logits(topk_target_logit(values, indices, valid, tail, y), 1.0)
        m_t1, log_z_t1 = topk_logsumexp(scale_logits(values, 1.0), scale_logits(tail, 1.0),
                                        num_classes - num_topk)
        tail = scale_logits(tail, temperature)
    else:
        t1_y = scale_logits(tl.load(teacher_row + y * teacher_col_stride).to(tl.float32), 1.0)
    m_s1 = NO_MAX
    z_s1 = 0.0
    m_s = NO_MAX
    z_s = 0.0
    m_t = NO_MAX
    z_t = 0.0
    c = 0.0
    n_inf = 0.0
    for start in range(0, num_classes, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < num_classes
        non_target = mask & (cols != y)
        z = load_row_block(student_row, cols, student_col_stride, mask)
        m_s1, z_s1 = online_logsumexp(m_s1, z_s1, scale_logits(z, 1.0), 1.0)
        s = tl.where(non_target, scale_logits(z, temperature), float("-inf"))
        if TOPK:
            t = tl.where(non_target, tail, float("-inf"))
        else:
            z_teacher = load_row_block(teacher_row, cols, teacher_col_stride, mask)
            m_t1, z_t1 = online_logsumexp(m_t1, z_t1, scale_logits(z_teacher, 1.0), 1.0)
            t = tl.where(non_target, scale_logits(z_teacher, temperature), float("-inf"))
        m_s_new, z_s = online_logsumexp(m_s, z_s, s, 1.0)
        m_t_new = tl.maximum(m_t, tl.max(t, 0))
        c, z_t, n_inf = online_weighted_sum(c, z_t, n_inf, m_t, m_t_new, m_s_new - m_s, t,
                                            s - m_s_new, 1.0, 1.0)
        m_s = m_s_new
        m_t = m_t_new
    if TOPK:  # replace the tail logit by the true one at the non-target top-k classes
        c, z_t, n_inf, m_t = replace_tail_at_topk(c, z_t, n_inf, m_t, student_row,
                                                  student_col_stride, values, indices,
                                                  valid & (indices != y), tail, m_s,
                                                  temperature, 1.0, False)
    else:
        log_z_t1 = tl.log(z_t1)
    log_z_s1 = tl.log(z_s1)
    q1_y = tl.exp(log_softmax_at(t1_y, m_t1, log_z_t1))
    # a zero teacher weight adds 0 even against log p1_y = −inf (fastkd.losses._soft_ce_rows)
    target_term = tl.where(q1_y != 0, -q1_y * log_softmax_at(s1_y, m_s1, log_z_s1), 0.0)
    c = with_infinite_terms(c, n_inf, float("-inf"))
    log_z_s = tl.log(z_s)
    non_target_term = log_z_s - c / z_t
    tl.store(loss_ptr + row,
             (target_term + gamma * temperature * temperature * non_target_term) / batch)
    stats = stats_ptr + row * _NUM_STATS
    tl.store(stats, m_s1)
    tl.store(stats + 1, log_z_s1)
    tl.store(stats + 2, m_s)
    tl.store(stats + 3, log_z_s)
    tl.store(stats + 4, m_t)
    tl.store(stats + 5, tl.log(z_t))
    tl.store(stats + 6, q1_y)


@triton.jit
def _nkd_gradient(z, t, is_target, m_s1, log_z_s1, m_s, log_z_s, m_t, log_z_t, q1_y, gamma,
                  scale, temperature):
    """∂loss/∂z_s,k = g/B · [ q1_y (p1_k − [k = y]) + [k ≠ y] γT (p̂_k − q̂_k) ]
    p1 = σ(z_s) (T = 1), p̂, q̂ = non-target softmax at T; each term 0 where its clamp cut z_s."""
    p1 = tl.exp(log_softmax_at(scale_logits(z, 1.0), m_s1, log_z_s1))
    target_part = q1_y * (p1 - is_target.to(tl.float32))
    target_part = tl.where(clamp_passes_gradient(z, 1.0), target_part, 0.0)
    p_hat = tl.exp(log_softmax_at(scale_logits(z, temperature), m_s, log_z_s))
    other_part = gamma * temperature * (p_hat - tl.exp(log_softmax_at(t, m_t, log_z_t)))
    other_part = tl.where(clamp_passes_gradient(z, temperature) & ~is_target, other_part, 0.0)
    return scale * (target_part + other_part)


@triton.jit
def _nkd_backward_kernel(
    student_ptr, student_row_stride, student_col_stride,
    teacher_ptr, teacher_row_stride, teacher_col_stride,
    index_ptr, index_row_stride, index_col_stride, lse_ptr, lse_stride, num_topk,
    target_ptr, target_stride, stats_ptr, grad_output_ptr, grad_ptr, num_classes, temperature,
    gamma, batch,
    TOPK: tl.constexpr, BLOCK: tl.constexpr, BLOCK_TOPK: tl.constexpr,
):
    """The gradient of `_nkd_forward_kernel`'s loss from its saved row statistics (see
    `_nkd_gradient`); top-k columns rewritten after a barrier as in `kd.py`."""
    row = tl.program_id(0).to(tl.int64)
    student_row = student_ptr + row * student_row_stride
    teacher_row = teacher_ptr + row * teacher_row_stride
    grad_row = grad_ptr + row * num_classes
    scale = tl.load(grad_output_ptr) / batch
    y = tl.load(target_ptr + row * target_stride).to(tl.int64)
    stats = stats_ptr + row * _NUM_STATS
    m_s1 = tl.load(stats)
    log_z_s1 = tl.load(stats + 1)
    m_s = tl.load(stats + 2)
    log_z_s = tl.load(stats + 3)
    m_t = tl.load(stats + 4)
    log_z_t = tl.load(stats + 5)
    q1_y = tl.load(stats + 6)
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
        grad = _nkd_gradient(z, t, cols == y, m_s1, log_z_s1, m_s, log_z_s, m_t, log_z_t, q1_y,
                             gamma, scale, temperature)
        tl.store(grad_row + cols, grad.to(grad_ptr.dtype.element_ty), mask=mask)
    if TOPK:
        tl.debug_barrier()
        z = load_row_block(student_row, indices, student_col_stride, valid)
        grad = _nkd_gradient(z, scale_logits(values, temperature), indices == y, m_s1, log_z_s1,
                             m_s, log_z_s, m_t, log_z_t, q1_y, gamma, scale, temperature)
        tl.store(grad_row + indices, grad.to(grad_ptr.dtype.element_ty), mask=valid)


def nkd_forward(student_logits: Tensor, teacher_logits: Tensor | TopKLogits, target: Tensor,
                temperature: float, gamma: float) -> tuple[Tensor, Tensor]:
    """The loss (fp32 scalar) and the per-row statistics the backward needs."""
    batch, num_classes = student_logits.shape
    block, num_warps = row_launch_config(num_classes)
    teacher_args, topk, block_topk = teacher_kernel_args(teacher_logits)
    row_losses = student_logits.new_empty(batch, dtype=torch.float32)
    stats = student_logits.new_empty((batch, _NUM_STATS), dtype=torch.float32)
    _nkd_forward_kernel[(batch,)](
        student_logits, student_logits.stride(0), student_logits.stride(1), *teacher_args,
        target, target.stride(0), row_losses, stats, num_classes, temperature, gamma,
        float(batch), TOPK=topk, BLOCK=block, BLOCK_TOPK=block_topk, num_warps=num_warps)
    return row_losses.sum(), stats


def nkd_backward(grad_output: Tensor, student_logits: Tensor,
                 teacher_logits: Tensor | TopKLogits, target: Tensor, stats: Tensor,
                 temperature: float, gamma: float) -> Tensor:
    """∂loss/∂student_logits, in the student's dtype, contiguous."""
    batch, num_classes = student_logits.shape
    block, num_warps = row_launch_config(num_classes)
    teacher_args, topk, block_topk = teacher_kernel_args(teacher_logits)
    grad = torch.empty((batch, num_classes), dtype=student_logits.dtype,
                       device=student_logits.device)
    _nkd_backward_kernel[(batch,)](
        student_logits, student_logits.stride(0), student_logits.stride(1), *teacher_args,
        target, target.stride(0), stats, grad_output, grad, num_classes, temperature, gamma,
        float(batch), TOPK=topk, BLOCK=block, BLOCK_TOPK=block_topk, num_warps=num_warps)
    return grad


class NKDFunction(torch.autograd.Function):
    """Fused `nkd_loss(student_logits, teacher_logits, target, temperature, gamma)`; gradient
    to the student only. `target`: integer class ids (B,)."""

    @staticmethod
    def forward(ctx, student_logits: Tensor, teacher_logits: Tensor | TopKLogits,
                target: Tensor, temperature: float, gamma: float) -> Tensor:
        hyper = (float(temperature), float(gamma))
        loss, stats = nkd_forward(student_logits, teacher_logits, target, *hyper)
        ctx.save_for_backward(student_logits, target, stats, *teacher_tensors(teacher_logits))
        ctx.hyper = hyper
        return loss

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        student_logits, target, stats, *teacher = ctx.saved_tensors
        grad = nkd_backward(grad_output, student_logits, restore_teacher(tuple(teacher)), target,
                            stats, *ctx.hyper)
        return grad, None, None, None, None
