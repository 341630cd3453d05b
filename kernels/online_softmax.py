"""Online row-softmax statistics shared by the fused logit losses (kd, dkd, nkd, ofa).

One program reads one row of student (and teacher) logits once, in masked column blocks. Each
block updates a running max `m` and `z = Σ exp(x − m)`, rescaled whenever the max grows, so
`logsumexp = m + log z` comes out of the same pass that accumulates the loss. Rows keep (and
save for the backward) the pair (m, log z), never their sum: `log σ(x) = (x − m) − log z`
takes the difference first, as eager log_softmax does, and stays exact for logits near ±1e4.

A loss term is a weighted sum `c = Σ_k exp(ε(a_k − m_a)) · (v_k − ref)`: weights from one
distribution (the teacher), values from the student (a log-ratio or a logit) taken relative to a
running reference `ref` built from running maxima, so each element enters as a difference, as in
eager `log_softmax`. Moving to a new max / reference is exact algebra, `c ← f·c − Δref·f·w`.

Top-k cached teachers (`fastkd.losses.topk_teacher_logits`): the row is accumulated as if every
teacher logit were the shared tail logit r; the k top-k entries are then corrected, their
r-contribution removed (sign −1) and their true value added (sign +1). No B×K teacher is ever
materialised; the correction touches k gathered student logits. Infinite values (a −inf student
logit under a live teacher weight) are counted apart, so a correction never computes inf − inf.

Conventions follow `fastkd.losses`: logits are divided by T in fp32, +inf is clamped to its
`LOGIT_CEILING`, −inf is a class of probability 0, and a zero weight contributes 0 even against
a −inf log-probability.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastkd import loss_conventions

LOGIT_CEILING = tl.constexpr(loss_conventions.LOGIT_CEILING)
NO_MAX = tl.constexpr(-1e38)  # running-max start: finite, so that (m_new − m_old) stays finite
FP32_TINY = tl.constexpr(torch.finfo(torch.float32).tiny)
MAX_BLOCK = 4096  # columns per block: 2–4 fp32 row blocks live in registers per program


def row_launch_config(num_columns: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a row loop over `num_columns` classes."""
    block = min(max(triton.next_power_of_2(num_columns), 16), MAX_BLOCK)
    return block, min(max(block // 256, 1), 8)


@triton.jit
def load_row_block(row_ptr, cols, col_stride, mask):
    """A block of one row as fp32; −inf (probability 0) where masked. The column offset is
    int64: a transposed B×K input has col_stride = B, and K·B may pass 2³¹."""
    offsets = cols.to(tl.int64) * col_stride
    return tl.load(row_ptr + offsets, mask=mask, other=float("-inf")).to(tl.float32)


@triton.jit
def scale_logits(z, temperature):
    """z/T in fp32 with +inf clamped to the ceiling (fastkd.losses._log_softmax); a correctly
    rounded division, as torch's (the GPU's default `/` is approximate)."""
    return tl.minimum(tl.div_rn(z, temperature), LOGIT_CEILING)


@triton.jit
def clamp_passes_gradient(z, temperature):
    """Where `clamp(z/T, max=ceiling)` lets a gradient through (torch: z/T ≤ ceiling)."""
    return tl.div_rn(z, temperature) <= LOGIT_CEILING


@triton.jit
def empty_logsumexp():
    """The (m, z) state of `online_logsumexp` before any column."""
    return tl.full((), NO_MAX, tl.float32), tl.zeros((), tl.float32)


@triton.jit
def empty_weighted_sum():
    """The (c, w, n_inf, m_a) state of `online_weighted_sum` before any column."""
    m_a, w = empty_logsumexp()
    return tl.zeros((), tl.float32), w, tl.zeros((), tl.float32), m_a


@triton.jit
def online_logsumexp(m, z, x, sign):
    """(m, z) with z = Σ exp(x − m), after adding sign × the block x (−inf entries add 0)."""
    m_new = tl.maximum(m, tl.max(x, 0))
    return m_new, z * tl.exp(m - m_new) + sign * tl.sum(tl.exp(x - m_new), 0)


@triton.jit
def online_weighted_sum(c, w, n_inf, m_a, m_a_new, ref_shift, a, d, eps, sign):
    """Running `c = Σ e_k d_k`, `w = Σ e_k`, `e_k = exp(ε (a_k − m_a))`, `d_k = v_k − ref`.

    The state is first moved to the new weight max `m_a_new` and to a reference moved by
    `ref_shift`; then sign × the block is added, its `d` given against the new reference
    (computed by the caller as differences of running maxima, e.g. (t − m_t) − (s − m_s), so
    that a clamped +inf logit does not swallow the other terms). A term with e_k = 0 adds
    nothing; a term with an infinite d adds sign × 1 to `n_inf` instead of ±inf to `c` (see
    `with_infinite_terms`).
    """
    factor = tl.exp(eps * (m_a - m_a_new))
    w = w * factor
    c = c * factor - ref_shift * w
    e = tl.exp(eps * (a - m_a_new))
    live = e > 0
    finite = tl.abs(d) < float("inf")
    w += sign * tl.sum(e, 0)
    c += sign * tl.sum(tl.where(live & finite, e * d, 0.0), 0)
    n_inf += sign * tl.sum(tl.where(live & (tl.abs(d) == float("inf")), 1.0, 0.0), 0)
    return c, w, n_inf


@triton.jit
def with_infinite_terms(c, n_inf, infinity):
    """`c` with its counted infinite terms put back: `infinity` (±inf) if any is left."""
    return tl.where(n_inf > 0.5, infinity, c)


@triton.jit
def add_to_logsumexp(m, z, x):
    """(m, z) of a running logsumexp after adding one scalar logit x."""
    m_new = tl.maximum(m, x)
    return m_new, z * tl.exp(m - m_new) + tl.exp(x - m_new)


@triton.jit
def log_softmax_at(x, m, log_z):
    """log σ(x) from the row's (max, log Σ exp(· − max)): the difference x − m comes first, as
    in eager log_softmax, so logits near ±1e4 keep their precision (m + log z would round)."""
    return (x - m) - log_z


@triton.jit
def expm1(x):
    """exp(x) − 1 without cancellation near 0 (Taylor to x⁶ for |x| < 0.1, error < 1e-10)."""
    series = x * (1.0 + x * (0.5 + x * (1.0 / 6 + x * (1.0 / 24 + x * (1.0 / 120 + x / 720)))))
    return tl.where(tl.abs(x) < 0.1, series, tl.exp(x) - 1.0)


@triton.jit
def log1p(x):
    """log(1 + x) without cancellation near 0 (Taylor to x⁸ for |x| < 0.1, error < 1e-9)."""
    series = x * (1.0 - x * (0.5 - x * (1.0 / 3 - x * (0.25 - x * (0.2 - x * (1.0 / 6 - x * (
        1.0 / 7 - x * 0.125)))))))
    return tl.where(tl.abs(x) < 0.1, series, tl.log(1.0 + x))


@triton.jit
def load_topk_teacher(values_row_ptr, value_col_stride, index_row_ptr, index_col_stride, lse,
                      num_topk, num_classes, BLOCK_TOPK: tl.constexpr):
    """A cached teacher row: top-k logits v (fp32, −inf padded), class ids, validity, and the
    tail logit r of `fastkd.losses.topk_teacher_logits`, all at T = 1:

        r = lse + log(max(−expm1(logsumexp(v − lse)), tiny)) − log(K − k);  −inf when k = K.
    """
    j = tl.arange(0, BLOCK_TOPK)
    valid = j < num_topk
    values = load_row_block(values_row_ptr, j, value_col_stride, valid)
    indices = tl.load(index_row_ptr + j * index_col_stride, mask=valid, other=0).to(tl.int64)
    shifted = values - lse
    top_max = tl.max(shifted, 0)
    top_max = tl.where(top_max == float("-inf"), 0.0, top_max)
    top_mass_log = top_max + tl.log(tl.sum(tl.exp(shifted - top_max), 0))
    remainder = tl.maximum(-expm1(top_mass_log), FP32_TINY)
    tail_classes = (num_classes - num_topk).to(tl.float32)
    tail = lse + tl.log(remainder) - tl.log(tail_classes)
    return values, indices, valid, tl.where(num_classes > num_topk, tail, float("-inf"))


@triton.jit
def topk_target_logit(values, indices, valid, tail, target):
    """The reconstructed teacher logit of class `target`: its top-k value, else the tail r."""
    hit = valid & (indices == target)
    hit_value = tl.max(tl.where(hit, values, float("-inf")), 0)
    return tl.where(tl.sum(hit.to(tl.int32), 0) > 0, hit_value, tail)


@triton.jit
def topk_logsumexp(values, tail, num_tail):
    """(max, log Σ exp(· − max)) of a reconstructed teacher row: the k values plus `num_tail`
    copies of `tail`."""
    m = tl.maximum(tl.max(values, 0), tail)
    m = tl.where(m == float("-inf"), 0.0, m)
    z = tl.sum(tl.exp(values - m), 0) + num_tail.to(tl.float32) * tl.exp(tail - m)
    return m, tl.log(z)


@triton.jit
def replace_tail_at_topk(c, w, n_inf, m_a, student_row, student_col_stride, values, indices,
                         top, tail, m_s, temperature, eps, LOG_RATIO: tl.constexpr):
    """The top-k correction of a row's running weighted sum (`online_weighted_sum`), after the
    row loop accumulated every teacher logit as the tail r/T (`tail`): at the classes `top`
    (top-k ids `indices`), remove the tail's term (sign −1) and add the true value's (+1).
    Returns (c, w, n_inf, m_a) moved to the new weight max.

    The values d are taken against the row's final student max m_s: LOG_RATIO, a KL sum,
    d = (t_k − m_a) − (s_k − m_s), whose reference moves with m_a; else d = s_k − m_s.
    """
    s_top = scale_logits(load_row_block(student_row, indices, student_col_stride, top),
                         temperature)
    s_rel = s_top - m_s
    t_tail = tl.where(top, tail, float("-inf"))
    if LOG_RATIO:
        d = (t_tail - m_a) - s_rel
    else:
        d = s_rel
    c, w, n_inf = online_weighted_sum(c, w, n_inf, m_a, m_a, 0.0, t_tail, d, eps, -1.0)
    t_top = tl.where(top, scale_logits(values, temperature), float("-inf"))
    m_a_new = tl.maximum(m_a, tl.max(t_top, 0))
    if LOG_RATIO:
        c, w, n_inf = online_weighted_sum(c, w, n_inf, m_a, m_a_new, m_a_new - m_a, t_top,
                                          (t_top - m_a_new) - s_rel, eps, 1.0)
    else:
        c, w, n_inf = online_weighted_sum(c, w, n_inf, m_a, m_a_new, 0.0, t_top, s_rel, eps,
                                          1.0)
    return c, w, n_inf, m_a_new


@triton.jit
def load_teacher_block(teacher_row_ptr, cols, col_stride, mask, tail, temperature,
                       TOPK: tl.constexpr):
    """Teacher logits z_t/T of a column block: loaded, or (top-k) the tail logit r/T everywhere;
    the top-k columns are corrected after the row loop."""
    if TOPK:
        block = tl.where(mask, tail, float("-inf"))
    else:
        block = scale_logits(load_row_block(teacher_row_ptr, cols, col_stride, mask), temperature)
    return block
