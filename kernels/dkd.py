"""Fused decoupled KD (`fastkd.losses.dkd_loss`) on the row skeleton of `row_loss.py`.

Forward: one pass over each row accumulates the non-target softmax statistics of both sides
and NCKD; the target logits are loaded once; TCKD follows from the logsumexps. It saves six
floats per row; backward re-reads the logits once and writes the gradient.
"""
from __future__ import annotations

import triton
import triton.language as tl

from fastkd.kernels.online_softmax import (add_to_logsumexp, clamp_passes_gradient,
                                           log_softmax_at, scale_logits)
from fastkd.kernels.row_loss import RowLoss, kl_row_sums, logit_at, teacher_logit_at


@triton.jit
def _kl_term(log_p, log_q):
    """p·(log p − log q) with 0·log 0 = 0 (fastkd.losses._kl_rows)."""
    p = tl.exp(log_p)
    return tl.where(p > 0, p * (log_p - log_q), 0.0)


@triton.jit
def _dkd_row(student, teacher, y, num_classes, temperature, hyper, TOPK: tl.constexpr,
             BLOCK: tl.constexpr):
    """loss_b = T²/B · (α·TCKD + β·NCKD),  s = z_s/T, t = z_t/T, y the target, L = lse

        TCKD = KL([q_y, 1 − q_y] ‖ [p_y, 1 − p_y]),  log p_y = s_y − L(s),
               log(1 − p_y) = L(s_{≠y}) − L(s),  L(s) = log(exp s_y + exp L(s_{≠y}))
        NCKD = KL(σ(t_{≠y}) ‖ σ(s_{≠y})) = d / z_t − log z_t + log z_s   (as in kd.py,
               over the non-target classes only)
    Statistics: max and log-sum of s and of t over k ≠ y; p_y, q_y.
    """
    alpha, beta = hyper
    m_s, z_s, m_t, z_t, d = kl_row_sums(student, teacher, y, num_classes, temperature, TOPK,
                                        BLOCK)
    s_y = logit_at(student, y, temperature)
    t_y = teacher_logit_at(teacher, y, temperature, TOPK)
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
    return alpha * tckd + beta * nckd, (m_s, log_z_s, m_t, log_z_t, tl.exp(log_p_y),
                                        tl.exp(log_q_y))


@triton.jit
def _dkd_gradient(z, t, is_target, stats, hyper, scale, temperature):
    """∂loss/∂z_s,k = g·T/B · { α(p_y − q_y)                        k = y
                              { α p̂_k (q_y − p_y) + β (p̂_k − q̂_k)    k ≠ y
    p̂, q̂ = softmax over the non-target classes (p_k = p̂_k (1 − p_y)); 0 where clamped."""
    m_s, log_z_s, m_t, log_z_t, p_y, q_y = stats
    alpha, beta = hyper
    p_hat = tl.exp(log_softmax_at(scale_logits(z, temperature), m_s, log_z_s))
    q_hat = tl.exp(log_softmax_at(t, m_t, log_z_t))
    other = alpha * p_hat * (q_y - p_y) + beta * (p_hat - q_hat)
    grad = scale * tl.where(is_target, alpha * (p_y - q_y), other)
    return tl.where(clamp_passes_gradient(z, temperature), grad, 0.0)


DKD = RowLoss(_dkd_row, _dkd_gradient, num_stats=6,
              loss_scale=lambda batch, temperature: (temperature * temperature / batch, 1.0),
              grad_scale=lambda batch, temperature: (temperature / batch, 1.0))
