"""Fused KL-form KD (`fastkd.losses.kd_loss`) on the row skeleton of `row_loss.py`.

Forward reads each row once (online softmax of both sides) and keeps the row loss and four
row statistics (max and log-sum of each softmax); backward re-reads the logits once and writes
the gradient from those statistics.
"""
from __future__ import annotations

import triton
import triton.language as tl

from fastkd.kernels.online_softmax import clamp_passes_gradient, log_softmax_at, scale_logits
from fastkd.kernels.row_loss import RowLoss, kl_row_sums


@triton.jit
def _kd_row(student, teacher, y, num_classes, temperature, hyper, TOPK: tl.constexpr,
            BLOCK: tl.constexpr):
    """loss_b = T²/B · KL(q ‖ p),  p = σ(z_s/T), q = σ(z_t/T)

        KL = Σ_k q_k [(t_k − m_t) − (s_k − m_s)] − log z_t + log z_s
           = d / z_t − log z_t + log z_s,   s = z_s/T, t = z_t/T, z = Σ exp(· − m)
    d accumulates e_k·[(t_k − m_t) − (s_k − m_s)], e_k = exp(t_k − m_t), online (`kl_row_sums`
    with no class left out: y = −1). Statistics: m_s, log z_s, m_t, log z_t.
    """
    m_s, z_s, m_t, z_t, d = kl_row_sums(student, teacher, y, num_classes, temperature, TOPK,
                                        BLOCK)
    kl = d / z_t - tl.log(z_t) + tl.log(z_s)
    return kl, (m_s, tl.log(z_s), m_t, tl.log(z_t))


@triton.jit
def _kd_gradient(z, t, is_target, stats, hyper, scale, temperature):
    """∂loss/∂z_s,k = g·T/B · (p_k − q_k); 0 where z_s/T was clamped."""
    m_s, log_z_s, m_t, log_z_t = stats
    p = tl.exp(log_softmax_at(scale_logits(z, temperature), m_s, log_z_s))
    grad = scale * (p - tl.exp(log_softmax_at(t, m_t, log_z_t)))
    return tl.where(clamp_passes_gradient(z, temperature), grad, 0.0)


KD = RowLoss(_kd_row, _kd_gradient, num_stats=4,
             loss_scale=lambda batch, temperature: (temperature * temperature / batch, 1.0),
             grad_scale=lambda batch, temperature: (temperature / batch, 1.0))
