"""Fused normalized KD (`fastkd.losses.nkd_loss`) on the row skeleton of `row_loss.py`.

NKD mixes two temperatures: the target term is taken at T = 1 over all classes, the
non-target term at T over the classes without the target. One pass over each row keeps both
sets of running statistics; seven floats per row are saved for the backward pass, which re-reads
the logits once.
"""
from __future__ import annotations

import triton
import triton.language as tl

from fastkd.kernels.online_softmax import (clamp_passes_gradient, empty_logsumexp,
                                           empty_weighted_sum, load_row_block, log_softmax_at,
                                           online_logsumexp, online_weighted_sum,
                                           replace_tail_at_topk, scale_logits,
                                           with_infinite_terms)
from fastkd.kernels.row_loss import RowLoss, logit_at, teacher_logit_at, topk_teacher_logsumexp


@triton.jit
def _nkd_row(student, teacher, y, num_classes, temperature, hyper, TOPK: tl.constexpr,
             BLOCK: tl.constexpr):
    """loss_b = (1/B) · [ −q1_y · log p1_y + γ T² · CE(σ(t_{≠y}), σ(s_{≠y})) ]

        p1, q1 = σ(z_s), σ(z_t) at T = 1 (q1_y detached);  s, t = z_s/T, z_t/T
        CE = −Σ_{k≠y} q̂_k log p̂_k = log z_s − c / z_t,
        c = Σ_{k≠y} exp(t_k − m_t)(s_k − m_s), accumulated online (zero weights add 0).
    Statistics: max, log-sum of z_s; of s, t over k ≠ y; σ(z_t)_y.
    """
    gamma, _ = hyper
    student_row, student_col_stride = student
    teacher_row, teacher_col_stride, values, indices, valid, tail, _ = teacher
    m_t1, z_t1 = empty_logsumexp()
    if TOPK:
        m_t1, log_z_t1 = topk_teacher_logsumexp(teacher, num_classes, 1.0)
    tail = scale_logits(tail, temperature)
    m_s1, z_s1 = empty_logsumexp()
    m_s, z_s = empty_logsumexp()
    c, z_t, n_inf, m_t = empty_weighted_sum()
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
    q1_y = tl.exp(log_softmax_at(teacher_logit_at(teacher, y, 1.0, TOPK), m_t1, log_z_t1))
    # a zero teacher weight adds 0 even against log p1_y = −inf (fastkd.losses._soft_ce_rows)
    log_p1_y = log_softmax_at(logit_at(student, y, 1.0), m_s1, log_z_s1)
    target_term = tl.where(q1_y != 0, -q1_y * log_p1_y, 0.0)
    c = with_infinite_terms(c, n_inf, float("-inf"))
    log_z_s = tl.log(z_s)
    non_target_term = log_z_s - c / z_t
    loss = target_term + gamma * temperature * temperature * non_target_term
    return loss, (m_s1, log_z_s1, m_s, log_z_s, m_t, tl.log(z_t), q1_y)


@triton.jit
def _nkd_gradient(z, t, is_target, stats, hyper, scale, temperature):
    """∂loss/∂z_s,k = g/B · [ q1_y (p1_k − [k = y]) + [k ≠ y] γT (p̂_k − q̂_k) ]
    p1 = σ(z_s) (T = 1), p̂, q̂ = non-target softmax at T; each term 0 where its clamp cut z_s."""
    m_s1, log_z_s1, m_s, log_z_s, m_t, log_z_t, q1_y = stats
    gamma, _ = hyper
    p1 = tl.exp(log_softmax_at(scale_logits(z, 1.0), m_s1, log_z_s1))
    target_part = q1_y * (p1 - is_target.to(tl.float32))
    target_part = tl.where(clamp_passes_gradient(z, 1.0), target_part, 0.0)
    p_hat = tl.exp(log_softmax_at(scale_logits(z, temperature), m_s, log_z_s))
    other_part = gamma * temperature * (p_hat - tl.exp(log_softmax_at(t, m_t, log_z_t)))
    other_part = tl.where(clamp_passes_gradient(z, temperature) & ~is_target, other_part, 0.0)
    return scale * (target_part + other_part)


NKD = RowLoss(_nkd_row, _nkd_gradient, num_stats=7,
              loss_scale=lambda batch, temperature: (1.0, float(batch)),
              grad_scale=lambda batch, temperature: (1.0, float(batch)))
