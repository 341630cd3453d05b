"""Fused OFA adaptive target enhancement (`fastkd.losses.ofa_loss`) on the row skeleton of
`row_loss.py`.

The non-target weights `q_k^ε = exp(ε(t_k − L(t)))` need the teacher's logsumexp, which is only
known at the end of the row; the forward therefore accumulates `Σ exp(ε(t_k − m)) · log-prob`
against a running teacher max m and rescales once at the end. Six floats per row are saved;
the backward re-reads the logits once.
"""
from __future__ import annotations

import triton
import triton.language as tl

from fastkd.kernels.online_softmax import (clamp_passes_gradient, empty_logsumexp,
                                           empty_weighted_sum, expm1, load_row_block,
                                           load_teacher_block, log1p, log_softmax_at,
                                           online_logsumexp, online_weighted_sum,
                                           replace_tail_at_topk, scale_logits,
                                           with_infinite_terms)
from fastkd.kernels.row_loss import RowLoss, logit_at, teacher_logit_at, topk_teacher_logsumexp


@triton.jit
def _ofa_row(student, teacher, y, num_classes, temperature, hyper, TOPK: tl.constexpr,
             BLOCK: tl.constexpr):
    """loss_b = −(1/B) Σ_k w_k log p_k,  p = σ(s), q = σ(t), s, t = z_s/T, z_t/T

        w_y = (1 + q_y)^ε − 1 = expm1(ε log1p(q_y)),   w_k = q_k^ε (k ≠ y)
        Σ_{k≠y} w_k log p_k = exp(ε(m_w − L(t))) · (c − w·log z_s),
        c = Σ_{k≠y} exp(ε(t_k − m_w)) (s_k − m_s),  w = Σ_{k≠y} exp(ε(t_k − m_w))   (online)
    A zero weight contributes 0 even where log p = −inf (fastkd.losses._soft_ce_rows).
    Statistics: max, log-sum of s and of t; w_y; Σ_k w_k.
    """
    eps, _ = hyper
    student_row, student_col_stride = student
    teacher_row, teacher_col_stride, values, indices, valid, tail, _ = teacher
    m_t, z_t = empty_logsumexp()
    if TOPK:
        m_t, log_z_t = topk_teacher_logsumexp(teacher, num_classes, temperature)
    tail = scale_logits(tail, temperature)
    m_s, z_s = empty_logsumexp()
    c, w, n_inf, m_w = empty_weighted_sum()
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
    q_y = tl.exp(log_softmax_at(teacher_logit_at(teacher, y, temperature, TOPK), m_t, log_z_t))
    weight_y = expm1(eps * log1p(q_y))
    other_scale = tl.exp(eps * log_softmax_at(m_w, m_t, log_z_t))
    c = with_infinite_terms(c, n_inf, float("-inf"))
    other_sum = other_scale * (c - w * log_z_s)
    log_p_y = log_softmax_at(logit_at(student, y, temperature), m_s, log_z_s)
    target_sum = tl.where(weight_y != 0, weight_y * log_p_y, 0.0)
    return -(target_sum + other_sum), (m_s, log_z_s, m_t, log_z_t, weight_y,
                                       weight_y + other_scale * w)


@triton.jit
def _ofa_gradient(z, t, is_target, stats, hyper, scale, temperature):
    """∂loss/∂z_s,k = g/(B·T) · (p_k · Σ_j w_j − w_k); 0 where z_s/T was clamped."""
    m_s, log_z_s, m_t, log_z_t, weight_y, weight_sum = stats
    eps, _ = hyper
    weight = tl.where(is_target, weight_y, tl.exp(eps * log_softmax_at(t, m_t, log_z_t)))
    p = tl.exp(log_softmax_at(scale_logits(z, temperature), m_s, log_z_s))
    grad = scale * (p * weight_sum - weight)
    return tl.where(clamp_passes_gradient(z, temperature), grad, 0.0)


OFA = RowLoss(_ofa_row, _ofa_gradient, num_stats=6,
              loss_scale=lambda batch, temperature: (1.0, float(batch)),
              grad_scale=lambda batch, temperature: (1.0, batch * temperature))
