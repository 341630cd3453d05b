"""Fused feature-map losses: ScaleKD feature mimicking and frequency (DC/AC) decoupling.

`fastkd.losses.feature_mimic_loss` and `freq_decoupled_loss` on B×C×H×W maps (any strides,
channels_last included). One program per sample streams its C×HW student and teacher maps in
[BLOCK_C × HW] tiles; a tile always holds whole spatial rows, so the per-channel spatial mean
(DC over space) comes out of the tile that needs it.

* direct / spatial: one pass forward, one pass backward. Per position p the forward keeps
  ‖a_s‖², ‖a_t‖², a_s·a_t over channels (a = X, or X − mean_HW(X)); the squared distance of the
  unit vectors is ‖a_s‖²/N² + ‖a_t‖²/M² − 2 a_s·a_t/(N M), N = max(‖a_s‖, 1e-12) (F.normalize).
* channel: the mean over channels needs every channel first, so the forward makes two passes
  (means, then per-channel norms over HW); the backward is one pass.

The backward recomputes a_s, a_t from the maps and small saved statistics (3 floats per
position and per sample): saving the gradient instead would cost a B×C×H×W buffer, and
the gradient needs norms that are complete only after the whole map is read.

Unit-vector gradient: for L = ‖a/N − v‖², u = a/N,
    ∂L/∂a = (2/N)(u·(u·v) − v)    if ‖a‖ > eps (N = ‖a‖),     (2/N)(u − v) otherwise,
i.e. 2/N · (a/N · κ − v) with κ = u·v or 1; removing a mean subtracts the gradient's own mean.

The autograd Function returns the two unweighted terms [DC, AC] (each Σ/B); the weights are
applied outside, so a weight may be a float or a tensor with no host synchronisation.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

_NORM_EPS = tl.constexpr(1e-12)  # F.normalize's eps
MAX_POSITIONS = 4096  # elements per [BLOCK_C, BLOCK_HW] tile; whole spatial rows always fit
_CHANNEL_TILE = 2048  # the channel-mode kernels keep more tiles live: smaller ones keep two
                      # programs per SM (≤ 128 registers per thread at 8 warps)
MODES = ("direct", "spatial", "channel")


@triton.jit
def _unit_distance(ss, tt, st):
    """From ‖a‖², ‖b‖², a·b: 1/N, 1/M, κ (the gradient coefficient) and ‖a/N − b/M‖²."""
    norm_a = tl.sqrt_rn(ss)
    inv_n = 1.0 / tl.maximum(norm_a, _NORM_EPS)
    inv_m = 1.0 / tl.maximum(tl.sqrt_rn(tt), _NORM_EPS)
    cosine = st * inv_n * inv_m
    distance = ss * inv_n * inv_n + tt * inv_m * inv_m - 2.0 * cosine
    return inv_n, inv_m, tl.where(norm_a > _NORM_EPS, cosine, 1.0), distance


@triton.jit
def _unit_gradient(a, b, inv_n, inv_m, kappa):
    """∂‖a/N − b/M‖²/∂a = 2/N · (a/N · κ − b/M)."""
    return 2.0 * inv_n * (a * inv_n * kappa - b * inv_m)


@triton.jit
def _sample_grid(height, width, BLOCK_HW: tl.constexpr):
    """This program's sample b, H·W, and the flattened positions p = h·W + w (and which exist)."""
    positions = tl.arange(0, BLOCK_HW)
    return tl.program_id(0).to(tl.int64), height * width, positions, positions < height * width


@triton.jit
def _sample_map(ptr, b_stride, c_stride, h_stride, w_stride, b, positions, width):
    """Sample b of a B×C×H×W map: (its base pointer, channel stride, position offsets)."""
    offsets = (positions // width) * h_stride + (positions % width) * w_stride
    return ptr + b * b_stride, c_stride, offsets


@triton.jit
def _channel_block(c0, channels, position_valid, BLOCK_C: tl.constexpr):
    """Channels c0 … c0 + BLOCK_C − 1, which exist, and the mask of their [BLOCK_C, HW] tile."""
    channel = c0 + tl.arange(0, BLOCK_C)
    channel_valid = channel < channels
    return channel, channel_valid, channel_valid[:, None] & position_valid[None, :]


@triton.jit
def _tile_pointers(sample_map, channel):
    base, channel_stride, offsets = sample_map
    return base + channel[:, None] * channel_stride + offsets[None, :]


@triton.jit
def _load_tiles(student, teacher, channel, mask):
    """[BLOCK_C, BLOCK_HW] fp32 tiles of the student's and the teacher's map, 0 where masked."""
    a_s = tl.load(_tile_pointers(student, channel), mask=mask, other=0.0).to(tl.float32)
    a_t = tl.load(_tile_pointers(teacher, channel), mask=mask, other=0.0).to(tl.float32)
    return a_s, a_t


@triton.jit
def _store_tile(grad, channel, mask, value):
    pointers = _tile_pointers(grad, channel)
    tl.store(pointers, value.to(pointers.dtype.element_ty), mask=mask)


@triton.jit
def _centred(a_s, a_t, mean_s, mean_t, mask):
    """The tiles minus their broadcast means, 0 where masked."""
    return tl.where(mask, a_s - mean_s, 0.0), tl.where(mask, a_t - mean_t, 0.0)


@triton.jit
def _store_triple(ptr, first, second, third, mask):
    tl.store(ptr, first, mask=mask)
    tl.store(ptr + 1, second, mask=mask)
    tl.store(ptr + 2, third, mask=mask)


@triton.jit
def _load_triple(ptr, mask):
    return (tl.load(ptr, mask=mask, other=0.0), tl.load(ptr + 1, mask=mask, other=0.0),
            tl.load(ptr + 2, mask=mask, other=0.0))


@triton.jit
def _freq_kernel(
    s_ptr, s_b_stride, s_c_stride, s_h_stride, s_w_stride,
    t_ptr, t_b_stride, t_c_stride, t_h_stride, t_w_stride,
    g_ptr, g_b_stride, g_c_stride, g_h_stride, g_w_stride,
    terms_ptr, position_stats_ptr, sample_stats_ptr, channels, height, width, inv_batch,
    BACKWARD: tl.constexpr, CHANNEL: tl.constexpr, REMOVE_MEAN: tl.constexpr,
    HAS_DC: tl.constexpr, HAS_AC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """Sample b of the feature loss (`_channel_*` if CHANNEL, else `_spatial_*`). Forward:
    terms[b] = [DC_b/B, AC_b/B] and the statistics the backward needs (the g map unused).
    BACKWARD: g = ∂(g_dc·DC + g_ac·AC)/∂X_s with terms = [g_dc, g_ac]."""
    b, hw, positions, position_valid = _sample_grid(height, width, BLOCK_HW)
    student = _sample_map(s_ptr, s_b_stride, s_c_stride, s_h_stride, s_w_stride, b, positions,
                          width)
    teacher = _sample_map(t_ptr, t_b_stride, t_c_stride, t_h_stride, t_w_stride, b, positions,
                          width)
    position_stats = position_stats_ptr + (b * hw + positions) * 3
    sample_stats = sample_stats_ptr + b * 3
    if BACKWARD:
        maps = (student, teacher, _sample_map(g_ptr, g_b_stride, g_c_stride, g_h_stride,
                                              g_w_stride, b, positions, width))
        scales = (tl.load(terms_ptr) * inv_batch, tl.load(terms_ptr + 1) * inv_batch)
        if CHANNEL:
            _channel_gradient(maps, scales, position_stats, sample_stats, position_valid,
                              channels, HAS_DC, HAS_AC, BLOCK_C, BLOCK_HW)
        else:
            _spatial_gradient(maps, scales, position_stats, sample_stats, hw, position_valid,
                              channels, REMOVE_MEAN, HAS_DC, HAS_AC, BLOCK_C, BLOCK_HW)
    else:
        if CHANNEL:
            dc, ac = _channel_terms(student, teacher, position_stats, sample_stats,
                                    position_valid, channels, HAS_DC, HAS_AC, BLOCK_C, BLOCK_HW)
        else:
            dc, ac = _spatial_terms(student, teacher, position_stats, sample_stats, hw,
                                    position_valid, channels, REMOVE_MEAN, HAS_DC, HAS_AC,
                                    BLOCK_C, BLOCK_HW)
        tl.store(terms_ptr + b * 2, dc * inv_batch)
        tl.store(terms_ptr + b * 2 + 1, ac * inv_batch)


@triton.jit
def _spatial_terms(student, teacher, position_stats, sample_stats, hw, position_valid,
                   channels, REMOVE_MEAN: tl.constexpr, HAS_DC: tl.constexpr,
                   HAS_AC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """(DC_b, AC_b) of sample b (n_c = unit vector over channels at each position, μ = mean
    over H, W):

        AC_b = Σ_p ‖n_c(a_s)_p − n_c(a_t)_p‖²,  a = X − μ (REMOVE_MEAN) or X (direct view)
        DC_b = HW · ‖unit(μ_s) − unit(μ_t)‖²
    Saved: (1/N, 1/M, κ) per position and for the DC vectors.
    """
    ss = tl.zeros([BLOCK_HW], tl.float32)
    tt = tl.zeros([BLOCK_HW], tl.float32)
    st = tl.zeros([BLOCK_HW], tl.float32)
    dc_ss = 0.0
    dc_tt = 0.0
    dc_st = 0.0
    for c0 in range(0, channels, BLOCK_C):
        channel, _, mask = _channel_block(c0, channels, position_valid, BLOCK_C)
        a_s, a_t = _load_tiles(student, teacher, channel, mask)
        if REMOVE_MEAN:
            mu_s = tl.sum(a_s, 1) / hw
            mu_t = tl.sum(a_t, 1) / hw
            a_s, a_t = _centred(a_s, a_t, mu_s[:, None], mu_t[:, None], mask)
            if HAS_DC:
                dc_ss += tl.sum(mu_s * mu_s, 0)
                dc_tt += tl.sum(mu_t * mu_t, 0)
                dc_st += tl.sum(mu_s * mu_t, 0)
        if HAS_AC:
            ss += tl.sum(a_s * a_s, 0)
            tt += tl.sum(a_t * a_t, 0)
            st += tl.sum(a_s * a_t, 0)
    ac = 0.0
    if HAS_AC:
        inv_n, inv_m, kappa, distance = _unit_distance(ss, tt, st)
        ac = tl.sum(tl.where(position_valid, distance, 0.0), 0)
        _store_triple(position_stats, inv_n, inv_m, kappa, position_valid)
    dc = 0.0
    if HAS_DC:
        inv_n_dc, inv_m_dc, kappa_dc, distance_dc = _unit_distance(dc_ss, dc_tt, dc_st)
        dc = hw * distance_dc
        _store_triple(sample_stats, inv_n_dc, inv_m_dc, kappa_dc, True)
    return dc, ac


@triton.jit
def _spatial_gradient(maps, scales, position_stats, sample_stats, hw, position_valid,
                      channels, REMOVE_MEAN: tl.constexpr, HAS_DC: tl.constexpr,
                      HAS_AC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """∂/∂X_s[c, p] = g_ac/B · (G[c, p] − mean_p G[c, ·]) + g_dc/B · D[c]
        G = ∂AC/∂a_s (`_unit_gradient` per position; no mean removed in the direct view),
        D = 2/N · (μ_s/N · κ − μ_t/M)  (∂DC/∂μ_s / HW, the same at every position)."""
    student, teacher, grad_map = maps
    dc_scale, ac_scale = scales
    if HAS_AC:
        inv_n, inv_m, kappa = _load_triple(position_stats, position_valid)
        inv_n = inv_n[None, :]
        inv_m = inv_m[None, :]
        kappa = kappa[None, :]
    if HAS_DC:
        inv_n_dc, inv_m_dc, kappa_dc = _load_triple(sample_stats, True)
    for c0 in range(0, channels, BLOCK_C):
        channel, _, mask = _channel_block(c0, channels, position_valid, BLOCK_C)
        a_s, a_t = _load_tiles(student, teacher, channel, mask)
        grad = tl.zeros([BLOCK_C, BLOCK_HW], tl.float32)
        if REMOVE_MEAN:
            mu_s = tl.sum(a_s, 1) / hw
            mu_t = tl.sum(a_t, 1) / hw
            a_s, a_t = _centred(a_s, a_t, mu_s[:, None], mu_t[:, None], mask)
            if HAS_DC:
                dc_grad = _unit_gradient(mu_s, mu_t, inv_n_dc, inv_m_dc, kappa_dc)
                grad += dc_scale * dc_grad[:, None]
        if HAS_AC:
            ac_grad = tl.where(mask, _unit_gradient(a_s, a_t, inv_n, inv_m, kappa), 0.0)
            if REMOVE_MEAN:
                ac_grad = ac_grad - (tl.sum(ac_grad, 1) / hw)[:, None]
            grad += ac_scale * ac_grad
        _store_tile(grad_map, channel, mask, grad)


@triton.jit
def _channel_terms(student, teacher, position_stats, sample_stats, position_valid, channels,
                   HAS_DC: tl.constexpr, HAS_AC: tl.constexpr, BLOCK_C: tl.constexpr,
                   BLOCK_HW: tl.constexpr):
    """(DC_b, AC_b) of sample b (ν = mean over channels at each position, n_p = unit map over
    HW):

        DC_b = C · ‖unit(ν_s) − unit(ν_t)‖²,   AC_b = Σ_c ‖n_p(a_s)_c − n_p(a_t)_c‖², a = X − ν
    Pass 1 sums ν; pass 2 the per-channel norms, AC and the column sums Σ_c G[c, p] of the AC
    gradient (the mean over channels passes them back). Saved: ν_s, ν_t, Σ_c G per position;
    (1/N, 1/M, κ) of the DC maps.
    """
    nu_s = tl.zeros([BLOCK_HW], tl.float32)
    nu_t = tl.zeros([BLOCK_HW], tl.float32)
    for c0 in range(0, channels, BLOCK_C):
        channel, _, mask = _channel_block(c0, channels, position_valid, BLOCK_C)
        a_s, a_t = _load_tiles(student, teacher, channel, mask)
        nu_s += tl.sum(a_s, 0)
        nu_t += tl.sum(a_t, 0)
    nu_s = nu_s / channels
    nu_t = nu_t / channels
    dc = 0.0
    if HAS_DC:
        inv_n_dc, inv_m_dc, kappa_dc, distance_dc = _unit_distance(
            tl.sum(nu_s * nu_s, 0), tl.sum(nu_t * nu_t, 0), tl.sum(nu_s * nu_t, 0))
        dc = channels * distance_dc
        _store_triple(sample_stats, inv_n_dc, inv_m_dc, kappa_dc, True)
    ac = 0.0
    column_sum = tl.zeros([BLOCK_HW], tl.float32)
    if HAS_AC:
        for c0 in range(0, channels, BLOCK_C):
            channel, channel_valid, mask = _channel_block(c0, channels, position_valid, BLOCK_C)
            a_s, a_t = _load_tiles(student, teacher, channel, mask)
            a_s, a_t = _centred(a_s, a_t, nu_s[None, :], nu_t[None, :], mask)
            inv_n, inv_m, kappa, distance = _unit_distance(
                tl.sum(a_s * a_s, 1), tl.sum(a_t * a_t, 1), tl.sum(a_s * a_t, 1))
            ac += tl.sum(tl.where(channel_valid, distance, 0.0), 0)
            ac_grad = _unit_gradient(a_s, a_t, inv_n[:, None], inv_m[:, None], kappa[:, None])
            column_sum += tl.sum(tl.where(mask, ac_grad, 0.0), 0)
    _store_triple(position_stats, nu_s, nu_t, column_sum, position_valid)
    return dc, ac


@triton.jit
def _channel_gradient(maps, scales, position_stats, sample_stats, position_valid, channels,
                      HAS_DC: tl.constexpr, HAS_AC: tl.constexpr, BLOCK_C: tl.constexpr,
                      BLOCK_HW: tl.constexpr):
    """∂/∂X_s[c, p] = g_ac/B · (G[c, p] − Σ_c' G[c', p] / C) + g_dc/B · D[p]
        G = ∂AC/∂a_s (`_unit_gradient` per channel, over HW), D = 2/N · (ν_s/N · κ − ν_t/M)."""
    student, teacher, grad_map = maps
    dc_scale, ac_scale = scales
    nu_s, nu_t, column_sum = _load_triple(position_stats, position_valid)
    column_mean = column_sum / channels
    dc_grad = tl.zeros([BLOCK_HW], tl.float32)
    if HAS_DC:
        inv_n_dc, inv_m_dc, kappa_dc = _load_triple(sample_stats, True)
        dc_grad = _unit_gradient(nu_s, nu_t, inv_n_dc, inv_m_dc, kappa_dc)
    for c0 in range(0, channels, BLOCK_C):
        channel, _, mask = _channel_block(c0, channels, position_valid, BLOCK_C)
        grad = tl.zeros([BLOCK_C, BLOCK_HW], tl.float32) + dc_scale * dc_grad[None, :]
        if HAS_AC:
            a_s, a_t = _load_tiles(student, teacher, channel, mask)
            a_s, a_t = _centred(a_s, a_t, nu_s[None, :], nu_t[None, :], mask)
            inv_n, inv_m, kappa, _ = _unit_distance(
                tl.sum(a_s * a_s, 1), tl.sum(a_t * a_t, 1), tl.sum(a_s * a_t, 1))
            ac_grad = _unit_gradient(a_s, a_t, inv_n[:, None], inv_m[:, None], kappa[:, None])
            grad += ac_scale * (ac_grad - column_mean[None, :])
        _store_tile(grad_map, channel, mask, grad)


def _tile_config(channels: int, positions: int, mode: str) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_HW, num_warps): whole spatial rows per tile, ≤ MAX_POSITIONS elements
    (≤ _CHANNEL_TILE in channel mode where a spatial row fits it)."""
    block_hw = max(triton.next_power_of_2(positions), 16)
    if block_hw > MAX_POSITIONS:
        raise ValueError(f"fused feature losses take H·W ≤ {MAX_POSITIONS} (got {positions}); "
                         "use FASTKD_KERNELS=eager for larger maps")
    max_tile = _CHANNEL_TILE if mode == "channel" else MAX_POSITIONS
    block_c = min(triton.next_power_of_2(channels), max(max_tile // block_hw, 1))
    return block_c, block_hw, min(max(block_c * block_hw // 256, 1), 8)


def _launch(student_map: Tensor, teacher_map: Tensor, grad: Tensor | None, terms: Tensor,
            position_stats: Tensor, sample_stats: Tensor, mode: str, has_dc: bool,
            has_ac: bool) -> None:
    """`_freq_kernel` over the samples; backward when `grad` is given (`terms` then holds
    [g_dc, g_ac]), forward otherwise (the student map stands in for the unused g map)."""
    batch, channels, height, width = student_map.shape
    block_c, block_hw, num_warps = _tile_config(channels, height * width, mode)
    g_map = grad if grad is not None else student_map
    _freq_kernel[(batch,)](
        student_map, *student_map.stride(), teacher_map, *teacher_map.stride(), g_map,
        *g_map.stride(), terms, position_stats, sample_stats, channels, height, width,
        1.0 / batch, BACKWARD=grad is not None, CHANNEL=mode == "channel",
        REMOVE_MEAN=mode == "spatial", HAS_DC=has_dc, HAS_AC=has_ac, BLOCK_C=block_c,
        BLOCK_HW=block_hw, num_warps=num_warps)


def freq_forward(student_map: Tensor, teacher_map: Tensor, mode: str, has_dc: bool,
                 has_ac: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Unweighted terms [DC, AC] (fp32, each Σ/B) and the statistics the backward needs."""
    batch, _, height, width = student_map.shape
    rows = student_map.new_empty((batch, 2), dtype=torch.float32)
    position_stats = student_map.new_empty((batch, height * width, 3), dtype=torch.float32)
    sample_stats = student_map.new_empty((batch, 3), dtype=torch.float32)
    _launch(student_map, teacher_map, None, rows, position_stats, sample_stats, mode, has_dc,
            has_ac)
    return rows.sum(dim=0), position_stats, sample_stats


def freq_backward(grad_terms: Tensor, student_map: Tensor, teacher_map: Tensor,
                  position_stats: Tensor, sample_stats: Tensor, mode: str, has_dc: bool,
                  has_ac: bool) -> Tensor:
    """∂(g_dc·DC + g_ac·AC)/∂student_map, in the student's dtype and memory layout."""
    grad = torch.empty_like(student_map)
    _launch(student_map, teacher_map, grad, grad_terms.contiguous(), position_stats,
            sample_stats, mode, has_dc, has_ac)
    return grad


class FreqTermsFunction(torch.autograd.Function):
    """[DC, AC] terms of a feature-map loss (`mode` in MODES; "direct" has AC only, the
    ScaleKD direct view); gradient to the student map only (the teacher map is a target)."""

    @staticmethod
    def forward(ctx, student_map: Tensor, teacher_map: Tensor, mode: str, has_dc: bool,
                has_ac: bool) -> Tensor:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        has_dc = has_dc and mode != "direct"
        terms, position_stats, sample_stats = freq_forward(student_map, teacher_map, mode,
                                                           has_dc, has_ac)
        ctx.save_for_backward(student_map, teacher_map, position_stats, sample_stats)
        ctx.config = (mode, has_dc, has_ac)
        return terms

    @staticmethod
    def backward(ctx, grad_terms: Tensor):
        student_map, teacher_map, position_stats, sample_stats = ctx.saved_tensors
        grad = freq_backward(grad_terms, student_map, teacher_map, position_stats, sample_stats,
                             *ctx.config)
        return grad, None, None, None, None
