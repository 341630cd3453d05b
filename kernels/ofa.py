"""Fused OFA adaptive target enhancement (`fastkd.losses.ofa_loss`): one forward and one
backward kernel.

The non-target weights `q_k^ε = exp(ε(t_k − L(t)))` need the teacher's logsumexp, which is only
known at the end of the row; the forward therefore accumulates `Σ exp(ε(t_k − m)) · log-prob`
against a running teacher max m and rescales once at the end. Six floats per row are saved;
the backward re-reads the logits once (as in `kd.py`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastkd.kernels.online_softmax import (NO_MAX, clamp_passes_gradient, expm1, load_row_block,
                                           load_teacher_block, load_topk_teacher, log1p,
                                           log_softmax_at, online_logsumexp, online_weighted_sum,
                                           replace_tail_at_topk, restore_teacher,
                                           row_launch_config, scale_logits,
                                           teacher_kernel_args, teacher_tensors, topk_logsumexp,
                                           topk_target_logit, with_infinite_terms)
from fastkd.losses import TopKLogits

_NUM_STATS = tl.constexpr(6)  # per row: max, log-sum of s and of t; w_y; Σ_k w_k


@triton.jit
def _ofa_forward_kernel(
    student_ptr, student_row_stride, student_col_stride,
    teacher_ptr, teacher_row_stride, teacher_col_stride,
    index_ptr, index_row_stride, index_col_stride, lse_ptr, lse_stride, num_topk,
    target_ptr, target_stride, loss_ptr, stats_ptr, num_classes, eps, temperature, batch,
    TOPK: tl.constexpr, BLOCK: tl.constexpr, BLOCK_TOPK: tl.constexpr,
):
    """loss_b = −(1/B) Σ_k w_k log p_k,  p = σ(s), q = σ(t), s, t = z_s/T, z_t/T

        w_y = (1 + q_y)^ε − 1 = expm1(ε log1p(q_y)),   w_k = q_k^ε (k ≠ y)
        Σ_{k≠y} w_k log p_k = exp(ε(m_w − L(t))) · (c − w·log z_s),
        c = Σ_{k≠y} exp(ε(t_k − m_w)) (s_k − m_s),  w = Σ_{k≠y} exp(ε(t_k − m_w))   (online)
    A zero weight contributes 0 even where log p = −inf (fastkd.losses._soft_ce_rows).
    """
    row = tl.program_id(0).to(tl.int64)
    student_row = student_ptr + row * student_row_stride
    teacher_row = teacher_ptr + row * teacher_row_stride
    y = tl.load(target_ptr + row * target_stride).to(tl.int64)
    s_y = scale_logits(tl.load(student_row + y * student_col_stride).to(tl.float32), temperature)
    m_t = NO_MAX
    z_t = 0.0
    tail = 0.0
    if TOPK:
        values, indices, valid, tail = load_topk_teacher(
            teacher_row, teacher_col_stride, index_ptr + row * index_row_stride,
            index_col_stride, tl.load(lse_ptr + row * lse_stride), num_topk, num_classes,
            BLOCK_TOPK)
        t_y = scale_logits(topk_target_logit(values, indices, valid, tail, y), temperature)
        tail = scale_logits(tail, temperature)
        m_t, log_z_t = topk_logsumexp(scale_logits(values, temperature), tail,
                                      num_classes - num_topk)
    else:
        t_y = scale_logits(tl.load(teacher_row + y * teacher_col_stride).to(tl.float32),
                           temperature)
    m_s = NO_MAX
    z_s = 0.0
    m_w = NO_MAX
    w = 0.0
    c = 0.0
    n_inf = 0.0
    for start in range(0, num_classes, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < num_classes
        s = scale_logits(load_row_block(student_row, cols, student_col_stride, mask), temperature)
        t = load_teacher_block(teacher_row, cols, teacher_col_stride, mask, tail, temperature, TOPK)
        if not TOPK:
            m_t, z_t = online_logsumexp(m_t, z_t, t, 1.0)
        t_other = tl.where(cols != y, t, float("-inf"))
        m_s_new, z_s = online_logsumexp(m_s, z_s, s, 1.0)
        m_w_new = tl.maximum(m_w, tl.max(t_other, 0))
        c, w, n_inf = online_weighted_sum(c, w, n_inf, m_w, m_w_new, m_s_new - m_s, t_other,
                                          s - m_s_new, eps, 1.0)
        m_s = m_s_new
        m_w = m_w_new
    if TOPK:  # replace the tail logit by the true one at the non-target top-k classes
        c, w, n_inf, m_w = replace_tail_at_topk(c, w, n_inf, m_w, student_row, student_col_stride,
                                                values, indices, valid & (indices != y), tail,
                                                m_s, temperature, eps, False)
    else:
        log_z_t = tl.log(z_t)
    log_z_s = tl.log(z_s)
    weight_y = expm1(eps * log1p(tl.exp(log_softmax_at(t_y, m_t, log_z_t))))
    other_scale = tl.exp(eps * log_softmax_at(m_w, m_t, log_z_t))
    c = with_infinite_terms(c, n_inf, float("-inf"))
    other_sum = other_scale * (c - w * log_z_s)
    target_sum = tl.where(weight_y != 0, weight_y * log_softmax_at(s_y, m_s, log_z_s), 0.0)
    tl.store(loss_ptr + row, -(target_sum + other_sum) / batch)
    stats = stats_ptr + row * _NUM_STATS
    tl.store(stats, m_s)
    tl.store(stats + 1, log_z_s)
    tl.store(stats + 2, m_t)
    tl.store(stats + 3, log_z_t)
    tl.store(stats + 4, weight_y)
    tl.store(stats + 5, weight_y + other_scale * w)


@triton.jit
def _ofa_gradient(z, t, is_target, m_s, log_z_s, m_t, log_z_t, weight_y, weight_sum, eps, scale,
                  temperature):
    """∂loss/∂z_s,k = g/(B·T) · (p_k · Σ_j w_j − w_k); 0 where z_s/T was clamped."""
    weight = tl.where(is_target, weight_y, tl.exp(eps * log_softmax_at(t, m_t, log_z_t)))
    p = tl.exp(log_softmax_at(scale_logits(z, temperature), m_s, log_z_s))
    grad = scale * (p * weight_sum - weight)
    return tl.where(clamp_passes_gradient(z, temperature), grad, 0.0)


@triton.jit
def _ofa_backward_kernel(
    student_ptr, student_row_stride, student_col_stride,
    teacher_ptr, teacher_row_stride, teacher_col_stride,
    index_ptr, index_row_stride, index_col_stride, lse_ptr, lse_stride, num_topk,
    target_ptr, target_stride, stats_ptr, grad_output_ptr, grad_ptr, num_classes, eps,
    temperature, batch,
    TOPK: tl.constexpr, BLOCK: tl.constexpr, BLOCK_TOPK: tl.constexpr,
):
    """The gradient of `_ofa_forward_kernel`'s loss from its saved row statistics (see
    `_ofa_gradient`); top-k columns rewritten after a barrier as in `kd.py`."""
    row = tl.program_id(0).to(tl.int64)
    student_row = student_ptr + row * student_row_stride
    teacher_row = teacher_ptr + row * teacher_row_stride
    grad_row = grad_ptr + row * num_classes
    scale = tl.load(grad_output_ptr) / (batch * temperature)
    y = tl.load(target_ptr + row * target_stride).to(tl.int64)
    stats = stats_ptr + row * _NUM_STATS
    m_s = tl.load(stats)
    log_z_s = tl.load(stats + 1)
    m_t = tl.load(stats + 2)
    log_z_t = tl.load(stats + 3)
    weight_y = tl.load(stats + 4)
    weight_sum = tl.load(stats + 5)
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
        grad = _ofa_gradient(z, t, cols == y, m_s, log_z_s, m_t, log_z_t, weight_y, weight_sum,
                             eps, scale, temperature)
        tl.store(grad_row + cols, grad.to(grad_ptr.dtype.element_ty), mask=mask)
    if TOPK:
        tl.debug_barrier()
        z = load_row_block(student_row, indices, student_col_stride, valid)
        grad = _ofa_gradient(z, scale_logits(values, temperature), indices == y, m_s, log_z_s,
                             m_t, log_z_t, weight_y, weight_sum, eps, scale, temperature)
        tl.store(grad_row + indices, grad.to(grad_ptr.dtype.element_ty), mask=valid)


def ofa_forward(student_logits: Tensor, teacher_logits: Tensor | TopKLogits, target: Tensor,
                eps: float, temperature: float) -> tuple[Tensor, Tensor]:
    """The loss (fp32 scalar) and the per-row statistics the backward needs."""
    batch, num_classes = student_logits.shape
    block, num_warps = row_launch_config(num_classes)
    teacher_args, topk, block_topk = teacher_kernel_args(teacher_logits)
    row_losses = student_logits.new_empty(batch, dtype=torch.float32)
    stats = student_logits.new_empty((batch, _NUM_STATS), dtype=torch.float32)
    _ofa_forward_kernel[(batch,)](
        student_logits, student_logits.stride(0), student_logits.stride(1), *teacher_args,
        target, target.stride(0), row_losses, stats, num_classes, eps, temperature,
        float(batch), TOPK=topk, BLOCK=block, BLOCK_TOPK=block_topk, num_warps=num_warps)
    return row_losses.sum(), stats


def ofa_backward(grad_output: Tensor, student_logits: Tensor,
                 teacher_logits: Tensor | TopKLogits, target: Tensor, stats: Tensor, eps: float,
                 temperature: float) -> Tensor:
    """∂loss/∂student_logits, in the student's dtype, contiguous."""
    batch, num_classes = student_logits.shape
    block, num_warps = row_launch_config(num_classes)
    teacher_args, topk, block_topk = teacher_kernel_args(teacher_logits)
    grad = torch.empty((batch, num_classes), dtype=student_logits.dtype,
                       device=student_logits.device)
    _ofa_backward_kernel[(batch,)](
        student_logits, student_logits.stride(0), student_logits.stride(1), *teacher_args,
        target, target.stride(0), stats, grad_output, grad, num_classes, eps, temperature,
        float(batch), TOPK=topk, BLOCK=block, BLOCK_TOPK=block_topk, num_warps=num_warps)
    return grad


class OFAFunction(torch.autograd.Function):
    """Fused `ofa_loss(student_logits, teacher_logits, target, eps, temperature)`; gradient to
    the student only. `target`: integer class ids (B,)."""

    @staticmethod
    def forward(ctx, student_logits: Tensor, teacher_logits: Tensor | TopKLogits,
                target: Tensor, eps: float, temperature: float) -> Tensor:
        hyper = (float(eps), float(temperature))
        loss, stats = ofa_forward(student_logits, teacher_logits, target, *hyper)
        ctx.save_for_backward(student_logits, target, stats, *teacher_tensors(teacher_logits))
        ctx.hyper = hyper
        return loss

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        student_logits, target, stats, *teacher = ctx.saved_tensors
        grad = ofa_backward(grad_output, student_logits, restore_teacher(tuple(teacher)), target,
                            stats, *ctx.hyper)
        return grad, None, None, None, None
