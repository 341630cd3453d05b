"""Fused decoupled KD (`fastkd.losses.dkd_loss`): one forward and one backward kernel.

Forward: one pass over each row accumulates the non-target softmax statistics of both sides
and NCKD; the target logits are loaded once; TCKD follows from the logsumexps. It saves six
floats per row; backward re-reads the logits once and writes the gradient (as in `kd.py`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastkd.kernels.online_softmax import (NO_MAX, clamp_passes_gradient, load_row_block,
                                           add_to_logsumexp, load_teacher_block,
                                           load_topk_teacher, log_softmax_at, online_logsumexp,
                                           online_weighted_sum, replace_tail_at_topk,
                                           restore_teacher, row_launch_config, scale_logits,
                                           teacher_kernel_args, teacher_tensors,
                                           topk_target_logit, with_infinite_terms)
from fastkd.losses import TopKLogits

_NUM_STATS = tl.constexpr(6)  # per row: max, log-sum of s and of t over k ≠ y; p_y, q_y


@triton.jit
def _kl_term(log_p, log_q):
    """p·(log p − log q) with 0·log 0 = 0 (fastkd.losses._kl_rows)."""
    p = tl.exp(log_p)
    return tl.where(p > 0, p * (log_p - log_q), 0.0)


@triton.jit
def _dkd_forward_kernel(
    student_ptr, student_row_stride, student_col_stride,
    teacher_ptr, teacher_row_stride, teacher_col_stride,
    index_ptr, index_row_stride, index_col_stride, lse_ptr, lse_stride, num_topk,
    target_ptr, target_stride, loss_ptr, stats_ptr, num_classes, temperature, alpha, beta,
    loss_scale,
    TOPK: tl.constexpr, BLOCK: tl.constexpr, BLOCK_TOPK: tl.constexpr,
):
    """loss_b = T²/B · (α·TCKD + β·NCKD),  s = z_s/T, t = z_t/T, y the target, L = lse

        TCKD = KL([q_y, 1 − q_y] ‖ [p_y, 1 − p_y]),  log p_y = s_y − L(s),
               log(1 − p_y) = L(s_{≠y}) − L(s),  L(s) = log(exp s_y + exp L(s_{≠y}))
        NCKD = KL(σ(t_{≠y}) ‖ σ(s_{≠y})) = d / z_t − log z_t + log z_s   (as in kd.py,
               over the non-target classes only)
    """
    row = tl.program_id(0).to(tl.int64)
    student_row = student_ptr + row * student_row_stride
    teacher_row = teacher_ptr + row * teacher_row_stride
    y = tl.load(target_ptr + row * target_stride).to(tl.int64)
    s_y = scale_logits(tl.load(student_row + y * student_col_stride).to(tl.float32), temperature)
    tail = 0.0
    if TOPK:
        values, indices, valid, tail = load_topk_teacher(
            teacher_row, teacher_col_stride, index_ptr + row * index_row_stride,
            index_col_stride, tl.load(lse_ptr + row * lse_stride), num_topk, num_classes,
            BLOCK_TOPK)
        t_y = scale_logits(topk_target_logit(values, indices, valid, tail, y), temperature)
        tail = scale_logits(tail, temperature)
    else:
        t_y = scale_logits(tl.load(teacher_row + y * teacher_col_stride).to(tl.float32),
                           temperature)
    m_s = NO_MAX
    z_s = 0.0
    m_t = NO_MAX
    z_t = 0.0
    d = 0.0
    n_inf = 0.0
    for start in range(0, num_classes, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        non_target = (cols < num_classes) & (cols != y)
        s = scale_logits(load_row_block(student_row, cols, student_col_stride, non_target),
                         temperature)
        t = load_teacher_block(teacher_row, cols, teacher_col_stride, non_target, tail,
                               temperature, TOPK)
        m_s_new, z_s = online_logsumexp(m_s, z_s, s, 1.0)
        m_t_new = tl.maximum(m_t, tl.max(t, 0))
        d, z_t, n_inf = online_weighted_sum(d, z_t, n_inf, m_t, m_t_new,
                                            (m_t_new - m_t) - (m_s_new - m_s), t,
                                            (t - m_t_new) - (s - m_s_new), 1.0, 1.0)
        m_s = m_s_new
        m_t = m_t_new
    if TOPK:  # replace the tail logit by the true one at the non-target top-k classes
        d, z_t, n_inf, m_t = replace_tail_at_topk(d, z_t, n_inf, m_t, student_row,
                                                  student_col_stride, values, indices,
                                                  valid & (indices != y), tail, m_s,
                                                  temperature, 1.0, True)
    d = with_infinite_terms(d, n_inf, float("inf"))
    log_z_s = tl.log(z_s)
    log_z_t = tl.log(z_t)
    nckd = d / z_t - log_z_t + log_z_s
    m_s_all, z_s_all = add_to_logsumexp(m_s, z_s, s_y)
    m_t_all, z_t_all = add_to_logsumexp(m_t, z_t, t_y)
    log_p_y = log_softmax_at(s_y, m_s_all, tl.log(z_s_all))
    log_q_y = log_softmax_at(t_y, m_t_all, tl.log(z_t_all))
    log_p_other = (m_s - m_s_all) + (log_z_s - tl.log(z_s_all))
    log_q_other = (m_t - m_t_all) + (log_z_t - tl.log(z_t_all))
    tckd = _kl_term(log_q_y, log_p_y) + _kl_term(log_q_other, log_p_other)
    tl.store(loss_ptr + row, loss_scale * (alpha * tckd + beta * nckd))
    stats = stats_ptr + row * _NUM_STATS
    tl.store(stats, m_s)
    tl.store(stats + 1, log_z_s)
    tl.store(stats + 2, m_t)
    tl.store(stats + 3, log_z_t)
    tl.store(stats + 4, tl.exp(log_p_y))
    tl.store(stats + 5, tl.exp(log_q_y))


@triton.jit
def _dkd_gradient(z, t, is_target, p_y, q_y, m_s, log_z_s, m_t, log_z_t, alpha, beta, scale,
                  temperature):
    """∂loss/∂z_s,k = g·T/B · { α(p_y − q_y)                        k = y
                              { α p̂_k (q_y − p_y) + β (p̂_k − q̂_k)    k ≠ y
    p̂, q̂ = softmax over the non-target classes (p_k = p̂_k (1 − p_y)); 0 where clamped."""
    p_hat = tl.exp(log_softmax_at(scale_logits(z, temperature), m_s, log_z_s))
    q_hat = tl.exp(log_softmax_at(t, m_t, log_z_t))
    other = alpha * p_hat * (q_y - p_y) + beta * (p_hat - q_hat)
    grad = scale * tl.where(is_target, alpha * (p_y - q_y), other)
    return tl.where(clamp_passes_gradient(z, temperature), grad, 0.0)


@triton.jit
def _dkd_backward_kernel(
    student_ptr, student_row_stride, student_col_stride,
    teacher_ptr, teacher_row_stride, teacher_col_stride,
    index_ptr, index_row_stride, index_col_stride, lse_ptr, lse_stride, num_topk,
    target_ptr, target_stride, stats_ptr, grad_output_ptr, grad_ptr, num_classes, temperature,
    alpha, beta, grad_scale,
    TOPK: tl.constexpr, BLOCK: tl.constexpr, BLOCK_TOPK: tl.constexpr,
):
    """The gradient of `_dkd_forward_kernel`'s loss from its saved row statistics (see
    `_dkd_gradient`); top-k columns rewritten after a barrier as in `kd.py`."""
    row = tl.program_id(0).to(tl.int64)
    student_row = student_ptr + row * student_row_stride
    teacher_row = teacher_ptr + row * teacher_row_stride
    grad_row = grad_ptr + row * num_classes
    scale = tl.load(grad_output_ptr) * grad_scale
    y = tl.load(target_ptr + row * target_stride).to(tl.int64)
    stats = stats_ptr + row * _NUM_STATS
    m_s = tl.load(stats)
    log_z_s = tl.load(stats + 1)
    m_t = tl.load(stats + 2)
    log_z_t = tl.load(stats + 3)
    p_y = tl.load(stats + 4)
    q_y = tl.load(stats + 5)
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
        grad = _dkd_gradient(z, t, cols == y, p_y, q_y, m_s, log_z_s, m_t, log_z_t, alpha,
                             beta, scale, temperature)
        tl.store(grad_row + cols, grad.to(grad_ptr.dtype.element_ty), mask=mask)
    if TOPK:
        tl.debug_barrier()
        z = load_row_block(student_row, indices, student_col_stride, valid)
        grad = _dkd_gradient(z, scale_logits(values, temperature), indices == y, p_y, q_y, m_s,
                             log_z_s, m_t, log_z_t, alpha, beta, scale, temperature)
        tl.store(grad_row + indices, grad.to(grad_ptr.dtype.element_ty), mask=valid)


def dkd_forward(student_logits: Tensor, teacher_logits: Tensor | TopKLogits, target: Tensor,
                alpha: float, beta: float, temperature: float) -> tuple[Tensor, Tensor]:
    """The loss (fp32 scalar) and the per-row statistics the backward needs."""
    batch, num_classes = student_logits.shape
    block, num_warps = row_launch_config(num_classes)
    teacher_args, topk, block_topk = teacher_kernel_args(teacher_logits)
    row_losses = student_logits.new_empty(batch, dtype=torch.float32)
    stats = student_logits.new_empty((batch, _NUM_STATS), dtype=torch.float32)
    _dkd_forward_kernel[(batch,)](
        student_logits, student_logits.stride(0), student_logits.stride(1), *teacher_args,
        target, target.stride(0), row_losses, stats, num_classes, temperature, alpha, beta,
        temperature * temperature / batch,
        TOPK=topk, BLOCK=block, BLOCK_TOPK=block_topk, num_warps=num_warps)
    return row_losses.sum(), stats


def dkd_backward(grad_output: Tensor, student_logits: Tensor,
                 teacher_logits: Tensor | TopKLogits, target: Tensor, stats: Tensor,
                 alpha: float, beta: float, temperature: float) -> Tensor:
    """∂loss/∂student_logits, in the student's dtype, contiguous."""
    batch, num_classes = student_logits.shape
    block, num_warps = row_launch_config(num_classes)
    teacher_args, topk, block_topk = teacher_kernel_args(teacher_logits)
    grad = torch.empty((batch, num_classes), dtype=student_logits.dtype,
                       device=student_logits.device)
    _dkd_backward_kernel[(batch,)](
        student_logits, student_logits.stride(0), student_logits.stride(1), *teacher_args,
        target, target.stride(0), stats, grad_output, grad, num_classes, temperature, alpha,
        beta, temperature / batch,
        TOPK=topk, BLOCK=block, BLOCK_TOPK=block_topk, num_warps=num_warps)
    return grad


class DKDFunction(torch.autograd.Function):
    """Fused `dkd_loss(student_logits, teacher_logits, target, alpha, beta, temperature)`;
    gradient to the student only. `target`: integer class ids (B,)."""

    @staticmethod
    def forward(ctx, student_logits: Tensor, teacher_logits: Tensor | TopKLogits,
                target: Tensor, alpha: float, beta: float, temperature: float) -> Tensor:
        hyper = (float(alpha), float(beta), float(temperature))
        loss, stats = dkd_forward(student_logits, teacher_logits, target, *hyper)
        ctx.save_for_backward(student_logits, target, stats, *teacher_tensors(teacher_logits))
        ctx.hyper = hyper
        return loss

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        student_logits, target, stats, *teacher = ctx.saved_tensors
        grad = dkd_backward(grad_output, student_logits, restore_teacher(tuple(teacher)), target,
                            stats, *ctx.hyper)
        return grad, None, None, None, None, None
