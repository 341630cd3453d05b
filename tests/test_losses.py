"""fastkd.losses against independent formulations (float64, official-style or loops).

Each public loss is run on fp32/bf16/fp16 inputs; its reference sees the same rounded values in
float64, so values differ only by fp32-vs-fp64 arithmetic, while gradients come back in the input
dtype and get that dtype's tolerance. Then identities between the losses (DKD's decomposition,
OFA at ε = 1, KL vs soft-CE, NKD and WSLD edge cases, the DCT's DC term).
"""
import math
import os
import sys
import types

import numpy as np
import pytest
import scipy.fft
import scipy.special
import scipy.stats
import torch
import torch.nn.functional as F

import fastkd.losses as losses
from fastkd.losses import (
    TopKLogits, bkd_loss, correlation_loss, dist_loss, dkd_loss, feature_mimic_loss,
    freq_decoupled_loss, hcl_loss, kd_loss, mse_sum_loss, nkd_loss, ofa_loss, rkd_loss,
    soft_ce_kd_loss, topk_from_logits, topk_teacher_logits, wsld_loss,
)

SHAPES = [(4, 10), (3, 37), (5, 2), (8, 100)]            # B×K; an odd K and a 2-class case
TEMPERATURES = [0.5, 1.0, 4.0]
# dtype → (value rtol, value atol), (grad rtol, grad atol); grads come back in the input dtype
TOLERANCES = {
    torch.float32: ((1e-5, 1e-5), (1e-4, 1e-6)),
    torch.bfloat16: ((1e-5, 1e-5), (1e-2, 1e-6)),
    torch.float16: ((1e-5, 1e-5), (2e-3, 1e-6)),
}
DTYPES = list(TOLERANCES)
INF = float("inf")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def _make(shape, dtype, scale=3.0):
    """A random tensor in `dtype` (requires grad) and a float64 copy of its rounded values."""
    low = (torch.randn(shape) * scale).to(dtype).requires_grad_()
    return low, low.detach().double().requires_grad_()


def _check(ours_fn, ref_fn, lows, highs, dtype, grad_of=(0,)):
    """Value and gradient of `ours_fn(*lows)` against `ref_fn(*highs)`."""
    (v_rtol, v_atol), (g_rtol, g_atol) = TOLERANCES[dtype]
    ours, ref = ours_fn(*lows), ref_fn(*highs)
    assert ours.dim() == 0 and ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), ref.detach(), rtol=v_rtol, atol=v_atol)
    for i in grad_of:
        (g_ours,) = torch.autograd.grad(ours, lows[i], retain_graph=True)
        (g_ref,) = torch.autograd.grad(ref, highs[i], retain_graph=True)
        assert g_ours.dtype == dtype
        torch.testing.assert_close(g_ours.double(), g_ref, rtol=g_rtol, atol=g_atol)


def _logit_pair(shape, dtype):
    (zs, zs64), (zt, zt64) = _make(shape, dtype), _make(shape, dtype)
    target = torch.randint(0, shape[1], (shape[0],))
    return zs, zs64, zt, zt64, target


# --------------------------------------------------------------------------------------------
# independent float64 formulations (official-style: softmax, log(softmax), -1000 masks, loops)
# --------------------------------------------------------------------------------------------

def ref_kd(zs, zt, T):
    """mdistiller kd_loss: kl_div(log_softmax, softmax).sum(1).mean() · T²."""
    return F.kl_div(F.log_softmax(zs / T, 1), F.softmax(zt / T, 1), reduction="none").sum(1).mean() * T**2


def ref_soft_ce(zs, zt, T):
    """cls_KD KDLoss without α: −Σ softmax_t · log(softmax_s), batch mean, T²."""
    return -(F.softmax(zt / T, 1) * torch.log(F.softmax(zs / T, 1))).sum(1).mean() * T**2


def ref_dkd(zs, zt, y, alpha, beta, T):
    """mdistiller dkd_loss, literally: masked sums, log of probabilities, −1000 trick, sum / B."""
    gt = F.one_hot(y, zs.shape[1]).double()
    other = 1 - gt
    ps, pt = F.softmax(zs / T, 1), F.softmax(zt / T, 1)
    bs = torch.stack([(ps * gt).sum(1), (ps * other).sum(1)], 1)
    bt = torch.stack([(pt * gt).sum(1), (pt * other).sum(1)], 1)
    tckd = F.kl_div(torch.log(bs), bt, reduction="sum") * T**2 / len(y)
    nckd = F.kl_div(F.log_softmax(zs / T - 1000 * gt, 1), F.softmax(zt / T - 1000 * gt, 1),
                    reduction="sum") * T**2 / len(y)
    return alpha * tckd + beta * nckd


def ref_nkd(zs, zt, y, T, gamma):
    """NKD as in the paper: target term + renormalised non-target probabilities p_k / (1 − p_y)."""
    idx = y[:, None]
    ps1, pt1 = F.softmax(zs, 1), F.softmax(zt, 1)
    target_term = -(pt1.gather(1, idx).detach() * torch.log(ps1.gather(1, idx))).mean()
    qs, qt = F.softmax(zs / T, 1), F.softmax(zt / T, 1)
    non = torch.ones_like(qs, dtype=torch.bool).scatter(1, idx, False)
    qs_hat = (qs / (1 - qs.gather(1, idx)))[non].view(len(y), -1)
    qt_hat = (qt / (1 - qt.gather(1, idx)))[non].view(len(y), -1)
    return target_term - gamma * T**2 * (qt_hat * torch.log(qs_hat)).sum(1).mean()


def ref_ofa(zs, zt, y, eps, T):
    """OFAKD ofa_loss, literally: ((p_t + e_y)^ε − e_y) · −log(softmax_s), sum over classes, mean."""
    gt = F.one_hot(y, zs.shape[1]).double()
    weight = (F.softmax(zt / T, 1) + gt) ** eps - gt
    return (-weight * torch.log(F.softmax(zs / T, 1))).sum(1).mean()


def ref_wsld(zs, zt, y, T, alpha):
    """cls_KD WSLDLoss, literally (focal weight from detached T=1 cross-entropies)."""
    soft = -(F.softmax(zt / T, 1) * F.log_softmax(zs / T, 1)).sum(1)
    onehot = F.one_hot(y, zs.shape[1]).double()
    ce_s = -(onehot * F.log_softmax(zs.detach(), 1)).sum(1)
    ce_t = -(onehot * F.log_softmax(zt.detach(), 1)).sum(1)
    w = 1 - torch.exp(-torch.maximum(ce_s / (ce_t + 1e-7), torch.zeros_like(ce_s)))
    return alpha * T**2 * (w * soft).mean()


def _pearson_loop(a, b):
    """Pearson with the DIST eps, one explicit sum per term."""
    da, db = a - a.sum() / len(a), b - b.sum() / len(b)
    return (da * db).sum() / (torch.sqrt((da * da).sum()) * torch.sqrt((db * db).sum()) + 1e-8)


def ref_dist(zs, zt, beta, gamma, tau):
    ys, yt = F.softmax(zs / tau, 1), F.softmax(zt / tau, 1)
    inter = 1 - sum(_pearson_loop(ys[b], yt[b]) for b in range(len(ys))) / len(ys)
    intra = 1 - sum(_pearson_loop(ys[:, k], yt[:, k]) for k in range(ys.shape[1])) / ys.shape[1]
    return tau**2 * (beta * inter + gamma * intra)


def ref_bkd(zs, zt):
    """−[t log σ(x) + (1 − t) log(1 − σ(x))] with t = softmax(z_t) over the classes, element
    mean: Hao840/OFAKD `distillers/kd.py` line 47 (`BKD.forward`),
    `F.binary_cross_entropy_with_logits(logits_student, logits_teacher.softmax(1))`."""
    t, p = F.softmax(zt, 1), torch.sigmoid(zs)
    return -(t * torch.log(p) + (1 - t) * torch.log(1 - p)).mean()


def _huber(a, b):
    d = (a - b).abs()
    return torch.where(d < 1, 0.5 * d * d, d - 0.5).mean()


def ref_rkd(es, et, wd, wa, eps, squared):
    """RKD with loops over every pair and triplet."""
    def distances(e):
        n = len(e)
        d = [[torch.zeros((), dtype=e.dtype) if i == j else
              (((e[i] - e[j]) ** 2).sum().clamp_min(eps)) ** (1.0 if squared else 0.5)
              for j in range(n)] for i in range(n)]
        d = torch.stack([torch.stack(row) for row in d])
        return d / (d.sum() / (n * n - n))

    def angles(e):
        n = len(e)
        out = []
        for i in range(n):
            for j in range(n):
                for k in range(n):
                    u, v = e[j] - e[i], e[k] - e[i]
                    u = u / torch.clamp(u.norm(), min=1e-12)
                    v = v / torch.clamp(v.norm(), min=1e-12)
                    out.append((u * v).sum())
        return torch.stack(out)

    et = et.detach()
    return wd * _huber(distances(es), distances(et)) + wa * _huber(angles(es), angles(et))


def ref_correlation(es, et, scale):
    delta = (es - et).abs()
    return scale * sum((delta[b] * delta[b + 1]).sum() for b in range(len(es) - 1)) / (len(es) - 1)


def _unit(x, dim):
    return x / torch.sqrt((x * x).sum(dim, keepdim=True)).clamp_min(1e-12)


def ref_feature_mimic(s, t):
    return ((_unit(s, 1) - _unit(t, 1)) ** 2).sum() / len(s)


def ref_freq(s, t, dc_w, ac_w, dim):
    """Broadcast DC maps (not the compact HW·/C· form), normalised, summed, / B."""
    if dim == "spatial":
        dc_s, dc_t = s.mean((2, 3), keepdim=True).expand_as(s), t.mean((2, 3), keepdim=True).expand_as(t)
        n = lambda x: _unit(x, 1)  # noqa: E731 - along channels at each position
    else:
        dc_s, dc_t = s.mean(1, keepdim=True).expand_as(s), t.mean(1, keepdim=True).expand_as(t)
        n = lambda x: _unit(x.flatten(2), 2)  # noqa: E731 - each channel's HW map
    dc = ((n(dc_s) - n(dc_t)) ** 2).sum() / len(s)
    ac = ((n(s - dc_s) - n(t - dc_t)) ** 2).sum() / len(s)
    return dc_w * dc + ac_w * ac


def _pool_loop(x, level):
    """Adaptive average pooling by its definition: bin i spans [⌊iH/l⌋, ⌈(i+1)H/l⌉)."""
    h, w = x.shape[2:]
    rows = []
    for i in range(level):
        r0, r1 = (i * h) // level, -((-(i + 1) * h) // level)
        cols = []
        for j in range(level):
            c0, c1 = (j * w) // level, -((-(j + 1) * w) // level)
            cols.append(x[:, :, r0:r1, c0:c1].mean((2, 3)))
        rows.append(torch.stack(cols, -1))
    return torch.stack(rows, -2)


def ref_hcl(s, t, weights_by_level):
    """Σ w_l MSE_l / Σ w_l with the level weights written out (level 0 = full resolution)."""
    total = weights_by_level[0] * ((s - t) ** 2).mean()
    for level, w in weights_by_level.items():
        if level:
            total = total + w * ((_pool_loop(s, level) - _pool_loop(t, level)) ** 2).mean()
    return total / sum(weights_by_level.values())


# --------------------------------------------------------------------------------------------
# logit losses vs references
# --------------------------------------------------------------------------------------------

# name -> (ours, reference, which of (student, teacher) to check gradients of); both called
# as f(z_s, z_t, target, T)
LOGIT_LOSSES = {
    "kd": (lambda a, b, y, T: kd_loss(a, b, T), lambda a, b, y, T: ref_kd(a, b, T), (0, 1)),
    "soft_ce": (lambda a, b, y, T: soft_ce_kd_loss(a, b, T),
                lambda a, b, y, T: ref_soft_ce(a, b, T), (0, 1)),
    # student gradients only: the official masking gives kl_div an exact-0 target, whose
    # gradient w.r.t. that target is NaN in the reference (mdistiller's teacher has no grad)
    "dkd": (lambda a, b, y, T: dkd_loss(a, b, y, 1.0, 8.0, T),
            lambda a, b, y, T: ref_dkd(a, b, y, 1.0, 8.0, T), (0,)),
    "dkd-weights": (lambda a, b, y, T: dkd_loss(a, b, y, 0.7, 2.0, T),
                    lambda a, b, y, T: ref_dkd(a, b, y, 0.7, 2.0, T), (0,)),
    "nkd": (lambda a, b, y, T: nkd_loss(a, b, y, T, 1.5),
            lambda a, b, y, T: ref_nkd(a, b, y, T, 1.5), (0, 1)),
    **{f"ofa-eps{eps}": (lambda a, b, y, T, eps=eps: ofa_loss(a, b, y, eps, T),
                         lambda a, b, y, T, eps=eps: ref_ofa(a, b, y, eps, T), (0, 1))
       for eps in (1.0, 1.5, 2.0)},
    "wsld": (lambda a, b, y, T: wsld_loss(a, b, y, T, 2.5),
             lambda a, b, y, T: ref_wsld(a, b, y, T, 2.5), (0, 1)),
    "dist": (lambda a, b, y, T: dist_loss(a, b, 1.0, 2.0, T),
             lambda a, b, y, T: ref_dist(a, b, 1.0, 2.0, T), (0, 1)),
}


@pytest.mark.parametrize("name", LOGIT_LOSSES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", TEMPERATURES)
def test_logit_loss_matches_reference(name, shape, dtype, T):
    ours, reference, grad_of = LOGIT_LOSSES[name]
    zs, zs64, zt, zt64, y = _logit_pair(shape, dtype)
    _check(lambda a, b: ours(a, b, y, T), lambda a, b: reference(a, b, y, T), [zs, zt],
           [zs64, zt64], dtype, grad_of=grad_of)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bkd(shape, dtype):
    zs, zs64, zt, zt64, _ = _logit_pair(shape, dtype)
    _check(bkd_loss, ref_bkd, [zs, zt], [zs64, zt64], dtype, grad_of=(0, 1))


# --------------------------------------------------------------------------------------------
# embedding and feature losses vs references
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(5, 8), (3, 2), (6, 33)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("squared", [False, True])
def test_rkd(shape, dtype, squared):
    (es, es64), (et, et64) = _make(shape, dtype, 1.0), _make((shape[0], 7), dtype, 1.0)
    _check(lambda a, b: rkd_loss(a, b, 25.0, 50.0, 1e-12, squared),
           lambda a, b: ref_rkd(a, b, 25.0, 50.0, 1e-12, squared), [es, et], [es64, et64], dtype)
    teacher_grad = torch.autograd.grad(rkd_loss(es, et), et, allow_unused=True)[0]
    assert teacher_grad is None  # the teacher side is computed under no_grad in OFAKD


@pytest.mark.parametrize("shape", [(5, 128), (2, 3), (7, 17)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_correlation(shape, dtype):
    (es, es64), (et, et64) = _make(shape, dtype, 1.0), _make(shape, dtype, 1.0)
    _check(lambda a, b: correlation_loss(a, b, 0.02), lambda a, b: ref_correlation(a, b, 0.02),
           [es, et], [es64, et64], dtype, grad_of=(0, 1))


MAP_SHAPES = [(2, 6, 7, 7), (3, 5, 4, 4), (2, 3, 5, 3), (1, 16, 1, 1)]


@pytest.mark.parametrize("shape", MAP_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_feature_mimic_and_mse_sum(shape, dtype):
    (s, s64), (t, t64) = _make(shape, dtype, 1.0), _make(shape, dtype, 1.0)
    _check(feature_mimic_loss, ref_feature_mimic, [s, t], [s64, t64], dtype, grad_of=(0, 1))
    _check(mse_sum_loss, lambda a, b: sum(((a[i] - b[i]) ** 2).sum() for i in range(len(a))) / len(a),
           [s, t], [s64, t64], dtype, grad_of=(0, 1))


@pytest.mark.parametrize("shape", MAP_SHAPES[:3])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", ["spatial", "channel"])
@pytest.mark.parametrize("weights", [(0.03, 0.065), (0.0, 0.06), (1.0, 0.0)])
def test_freq_decoupled(shape, dtype, dim, weights):
    (s, s64), (t, t64) = _make(shape, dtype, 1.0), _make(shape, dtype, 1.0)
    _check(lambda a, b: freq_decoupled_loss(a, b, *weights, dim=dim),
           lambda a, b: ref_freq(a, b, *weights, dim), [s, t], [s64, t64], dtype, grad_of=(0, 1))


def test_freq_decoupled_rejects_unknown_dim():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="spatial"):
        freq_decoupled_loss(x, x, 1.0, 1.0, dim="time")


def test_freq_zero_weight_skips_term_and_tensor_weight_is_used():
    s, t = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)
    dc_only = freq_decoupled_loss(s, t, 1.0, 0.0)
    ac_only = freq_decoupled_loss(s, t, 0.0, 1.0)
    torch.testing.assert_close(freq_decoupled_loss(s, t, 2.0, 3.0), 2 * dc_only + 3 * ac_only)
    torch.testing.assert_close(freq_decoupled_loss(s, t, torch.tensor(2.0), 3.0), 2 * dc_only + 3 * ac_only)
    assert freq_decoupled_loss(s, t, 0.0, 0.0).item() == 0.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size, weights", [
    (7, {0: 1.0, 4: 0.5, 2: 0.25, 1: 0.125}),   # all levels used, normaliser 1.875
    (4, {0: 1.0, 2: 0.5, 1: 0.25}),             # level 4 skipped, normaliser 1.75
    (2, {0: 1.0, 1: 0.5}),
    (1, {0: 1.0}),
])
def test_hcl(dtype, size, weights):
    assert sum(weights.values()) == {7: 1.875, 4: 1.75, 2: 1.5, 1: 1.0}[size]
    shape = (2, 3, size, size)
    (s, s64), (t, t64) = _make(shape, dtype, 1.0), _make(shape, dtype, 1.0)
    _check(hcl_loss, lambda a, b: ref_hcl(a, b, weights), [s, t], [s64, t64], dtype, grad_of=(0, 1))


def test_hcl_tokens_are_laid_out_as_a_grid():
    s, t = torch.randn(2, 5, 7, 7), torch.randn(2, 5, 7, 7)
    tokens = lambda x: x.flatten(2).transpose(1, 2)  # noqa: E731 - B×C×H×W → B×HW×C raster order
    torch.testing.assert_close(hcl_loss(tokens(s), tokens(t)), hcl_loss(s, t))
    with pytest.raises(ValueError, match="square"):
        hcl_loss(torch.randn(2, 50, 4), torch.randn(2, 50, 4))


# --------------------------------------------------------------------------------------------
# invariants
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("T", TEMPERATURES)
@pytest.mark.parametrize("shape", SHAPES)
def test_dkd_decomposition_identity(T, shape):
    """KD = DKD with α = 1 and per-sample β = 1 − p_t,y (ours and mdistiller's −1000 masking)."""
    zs, zs64, zt, zt64, y = _logit_pair(shape, torch.float32)
    beta = 1 - F.softmax(zt64.detach() / T, 1).gather(1, y[:, None]).squeeze(1)
    rows = range(shape[0])
    ours = sum(dkd_loss(zs[b:b + 1], zt[b:b + 1], y[b:b + 1], 1.0, beta[b].item(), T) for b in rows)
    torch.testing.assert_close(ours / shape[0], kd_loss(zs, zt, T), rtol=1e-5, atol=1e-6)
    mdistiller = sum(ref_dkd(zs64[b:b + 1], zt64[b:b + 1], y[b:b + 1], 1.0, beta[b], T) for b in rows)
    torch.testing.assert_close(mdistiller / shape[0], ref_kd(zs64, zt64, T), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("T", TEMPERATURES)
@pytest.mark.parametrize("shape", SHAPES)
def test_ofa_eps_one_is_soft_ce_without_t_squared(T, shape):
    zs, _, zt, _, y = _logit_pair(shape, torch.float32)
    torch.testing.assert_close(ofa_loss(zs, zt, y, 1.0, T), soft_ce_kd_loss(zs, zt, T) / T**2,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("T", TEMPERATURES)
@pytest.mark.parametrize("shape", SHAPES)
def test_kl_and_soft_ce_differ_by_teacher_entropy(T, shape):
    zs, _, zt, _, _ = _logit_pair(shape, torch.float32)
    p_t = scipy.special.softmax(zt.detach().double().numpy() / T, axis=1)
    entropy = scipy.stats.entropy(p_t, axis=1).mean()
    gap = (soft_ce_kd_loss(zs, zt, T) - kd_loss(zs, zt, T)).item()
    assert gap == pytest.approx(T**2 * entropy, rel=1e-4, abs=1e-4)


def test_ofa_eps_two_weights_example():
    """p_t = (0.7, 0.2, 0.1), target 0, ε = 2 → weights (1.89, 0.04, 0.01).

    The loss is −Σ w_k log p_s,k, linear in w: three student rows give three equations.
    """
    teacher = torch.log(torch.tensor([[0.7, 0.2, 0.1]], dtype=torch.float64)).float()
    students = torch.randn(3, 3)
    losses_ = torch.stack([ofa_loss(z[None], teacher, torch.tensor([0]), 2.0) for z in students])
    log_p_s = -F.log_softmax(students.double(), 1)
    weights = torch.linalg.solve(log_p_s, losses_.double())
    torch.testing.assert_close(weights, torch.tensor([1.89, 0.04, 0.01], dtype=torch.float64),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("T", TEMPERATURES)
def test_nkd_non_target_softmax_is_renormalised(T):
    z, y = torch.randn(6, 11) * 3, torch.randint(0, 11, (6,))
    is_target = F.one_hot(y, 11).bool()
    q = losses._log_softmax(z, T, is_target).exp()
    p = F.softmax(z.double() / T, 1)
    expected = torch.where(is_target, 0.0, p / (1 - p.gather(1, y[:, None])))
    torch.testing.assert_close(q.double(), expected, rtol=1e-5, atol=1e-7)


def test_nkd_gamma_one_t_one_matches_paper_form():
    zs, zs64, zt, zt64, y = _logit_pair((7, 13), torch.float32)
    torch.testing.assert_close(nkd_loss(zs, zt, y, 1.0, 1.0).double(),
                               ref_nkd(zs64, zt64, y, 1.0, 1.0), rtol=1e-5, atol=1e-6)


def test_nkd_zero_teacher_target_weight_adds_zero():
    """q_y = 0 (teacher −inf at the target) against log p_y = −inf (student −inf there): the
    target term is 0, not 0·(−inf) = NaN; the loss is the non-target term alone."""
    zs = (torch.randn(3, 9) * 3).requires_grad_()
    zt, y = torch.randn(3, 9) * 3, torch.tensor([2, 5, 0])
    zs_masked, zt_masked = zs.detach().clone(), zt.clone()
    zs_masked[0, 2] = zt_masked[0, 2] = -INF
    zs_masked[1, 5] = -INF  # student only: the teacher still weighs it, the term is +inf
    zs_masked.requires_grad_()
    loss = nkd_loss(zs_masked[[0, 2]], zt_masked[[0, 2]], y[[0, 2]], 2.0, 1.5)
    (grad,) = torch.autograd.grad(loss, zs_masked)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    non_target_only = nkd_loss(zs_masked[:1], zt_masked[:1], y[:1], 2.0, 1.5)
    expected = 1.5 * 4.0 * losses._soft_ce_rows(
        losses._log_softmax(zt_masked[:1], 2.0, F.one_hot(y[:1], 9).bool()).exp(),
        losses._log_softmax(zs_masked[:1].detach(), 2.0, F.one_hot(y[:1], 9).bool())).mean()
    torch.testing.assert_close(non_target_only, expected)
    assert nkd_loss(zs_masked[1:2], zt_masked[1:2], y[1:2], 2.0, 1.5) == INF


def test_wsld_zero_weight_adds_zero():
    """A student certain of the target (ce_s = 0, so w = 0) adds 0, even with ℓ = +inf (a −inf
    student logit where the teacher has mass)."""
    zs = torch.tensor([[40.0, -INF, 0.0, 1.0], [0.5, 1.0, 0.0, 2.0]], requires_grad=True)
    zt = torch.tensor([[1.0, 2.0, 0.0, 1.0], [0.0, 1.0, 2.0, 0.5]])
    y = torch.tensor([0, 3])
    loss = wsld_loss(zs, zt, y, 2.0, 2.5)
    (grad,) = torch.autograd.grad(loss, zs)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss, wsld_loss(zs[1:], zt[1:], y[1:], 2.0, 2.5) / 2)


@pytest.mark.parametrize("shape", [(2, 3, 5, 5), (1, 4, 7, 3)])
def test_dc_only_inverse_dct_is_the_mean_and_loss_matches(shape):
    """Unnormalised DCT-II (scipy type 2, norm=None): keeping coefficient 0 only gives the mean."""
    x = np.random.default_rng(0).standard_normal(shape)

    def keep_dc(a, axes, keep):
        coef = scipy.fft.dctn(a, type=2, norm=None, axes=axes)
        mask = np.zeros_like(coef, dtype=bool)
        mask[tuple(slice(0, 1) if ax in axes else slice(None) for ax in range(a.ndim))] = True
        return scipy.fft.idctn(np.where(mask == keep, coef, 0.0), type=2, norm=None, axes=axes)

    np.testing.assert_allclose(keep_dc(x, (2, 3), True), np.broadcast_to(x.mean((2, 3), keepdims=True), shape), atol=1e-12)
    np.testing.assert_allclose(keep_dc(x, (2, 3), False), x - x.mean((2, 3), keepdims=True), atol=1e-12)
    np.testing.assert_allclose(keep_dc(x, (1,), True), np.broadcast_to(x.mean(1, keepdims=True), shape), atol=1e-12)

    # the loss built from scipy's DC/AC parts equals freq_decoupled_loss
    t = np.random.default_rng(1).standard_normal(shape)
    unit = lambda a, ax: a / np.maximum(np.sqrt((a * a).sum(ax, keepdims=True)), 1e-12)  # noqa: E731
    for dim, axes, norm in [("spatial", (2, 3), lambda a: unit(a, 1)),
                            ("channel", (1,), lambda a: unit(a.reshape(*a.shape[:2], -1), 2))]:
        dc = ((norm(keep_dc(x, axes, True)) - norm(keep_dc(t, axes, True))) ** 2).sum() / shape[0]
        ac = ((norm(keep_dc(x, axes, False)) - norm(keep_dc(t, axes, False))) ** 2).sum() / shape[0]
        ours = freq_decoupled_loss(torch.from_numpy(x).float(), torch.from_numpy(t).float(), 0.3, 0.7, dim)
        assert ours.item() == pytest.approx(0.3 * dc + 0.7 * ac, rel=1e-5)


# --------------------------------------------------------------------------------------------
# extreme logits
# --------------------------------------------------------------------------------------------

def _extreme_rows():
    teacher = torch.tensor([[1e4, -1e4, 0.0, 1.0, 2.0],
                            [-INF, 0.0, 1.0, -INF, 2.0],
                            [INF, 0.0, 1.0, 2.0, 3.0]])
    student = torch.tensor([[-1e4, 1e4, 0.0, 1.0, 2.0],
                            [-INF, 1.0, 0.0, 2.0, 0.5],
                            [1.0, 0.0, -1.0, 2.0, 0.0]], requires_grad=True)
    return student, teacher, torch.tensor([0, 2, 0])


# every loss of a teacher's logits, as f(z_s, z_t, target), for the checks below
TEACHER_LOGIT_LOSSES = {
    "kd": lambda s, t, y: kd_loss(s, t, 2.0),
    "soft_ce": lambda s, t, y: soft_ce_kd_loss(s, t, 2.0),
    "dkd": lambda s, t, y: dkd_loss(s, t, y, 1.0, 8.0, 4.0),
    "nkd": lambda s, t, y: nkd_loss(s, t, y, 2.0, 1.5),
    "ofa": lambda s, t, y: ofa_loss(s, t, y, 1.5, 2.0),
    "wsld": lambda s, t, y: wsld_loss(s, t, y, 2.0, 2.5),
    "dist": lambda s, t, y: dist_loss(s, t, 1.0, 2.0, 2.0),
    "bkd": lambda s, t, y: bkd_loss(s, t),
}


@pytest.mark.parametrize("name, fn", TEACHER_LOGIT_LOSSES.items())
def test_extreme_logits_stay_finite(name, fn):
    student, teacher, y = _extreme_rows()
    loss = fn(student, teacher, y)
    (grad,) = torch.autograd.grad(loss, student)
    assert torch.isfinite(loss), name
    assert torch.isfinite(grad).all(), name


def test_extreme_logits_take_the_softmax_limit():
    """A +inf teacher logit is a one-hot teacher: KD = −T² log σ(z_s/T)_c; a class that is −inf
    for both student and teacher drops out."""
    student, teacher, _ = _extreme_rows()
    T = 2.0
    expected = -T**2 * F.log_softmax(student[2:].detach().double() / T, 1)[0, 0]
    assert kd_loss(student[2:], teacher[2:], T).item() == pytest.approx(expected.item(), rel=1e-5)
    keep = [1, 2, 3, 4]  # row 1 without class 0, −inf on both sides
    assert kd_loss(student[1:2], teacher[1:2], T).item() == pytest.approx(
        kd_loss(student[1:2, keep], teacher[1:2, keep], T).item(), rel=1e-6)


# --------------------------------------------------------------------------------------------
# top-k cached teacher
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 5, 36])
def test_topk_tail_mass_is_exact_at_t1(k):
    logits = torch.randn(4, 37) * 3
    rebuilt = topk_teacher_logits(topk_from_logits(logits, k), 37)
    p_full = F.softmax(logits.double(), 1)
    p_rebuilt = F.softmax(rebuilt.double(), 1)
    top = logits.topk(k, 1).indices
    is_top = torch.zeros_like(logits, dtype=torch.bool).scatter(1, top, True)
    torch.testing.assert_close(p_rebuilt.gather(1, top), p_full.gather(1, top), rtol=1e-5, atol=1e-7)
    tail_mass = torch.where(is_top, 0.0, p_rebuilt).sum(1)
    # exact up to the fp32 rounding of the shared tail logit and of 1 − Σ
    torch.testing.assert_close(tail_mass, 1 - p_full.gather(1, top).sum(1), rtol=1e-5, atol=1e-6)
    for T in (1.0, 4.0):  # the tail is one shared logit, so any temperature spreads it evenly
        tail = F.softmax(rebuilt / T, 1)[~is_top].view(4, 37 - k)
        torch.testing.assert_close(tail, tail[:, :1].expand_as(tail))


def test_topk_with_k_equal_to_num_classes_is_the_full_softmax():
    logits = torch.randn(3, 10) * 3
    rebuilt = topk_teacher_logits(topk_from_logits(logits, 10), 10)
    torch.testing.assert_close(F.softmax(rebuilt, 1), F.softmax(logits, 1))


def test_topk_non_positive_remainder_gives_an_empty_tail_not_nan():
    values = torch.tensor([[3.0, 1.0], [2.0, 2.0]])
    lse = values.logsumexp(1)
    for stored_lse in (lse, lse - 1e-3):  # remainder exactly 0, and negative by rounding
        rebuilt = topk_teacher_logits(TopKLogits(values, torch.tensor([[0, 1], [2, 3]]), stored_lse), 6)
        assert torch.isfinite(rebuilt).all()
        p = F.softmax(rebuilt, 1)
        assert p[0, 2:].sum() < 1e-6 and p[1, [0, 1, 4, 5]].sum() < 1e-6


def test_topk_from_logits_keeps_dtype_and_stores_full_logsumexp():
    logits = (torch.randn(3, 20) * 3).bfloat16()
    cached = topk_from_logits(logits, 4)
    assert cached.values.dtype == torch.bfloat16 and cached.indices.dtype == torch.int64
    assert cached.logsumexp.dtype == torch.float32
    torch.testing.assert_close(cached.values, logits.topk(4, 1).values)
    torch.testing.assert_close(cached.logsumexp.double(), logits.double().logsumexp(1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name, fn", TEACHER_LOGIT_LOSSES.items())
def test_losses_accept_topk_teacher(name, fn):
    zs, zt, y = torch.randn(4, 37, requires_grad=True), torch.randn(4, 37) * 3, torch.randint(0, 37, (4,))
    cached = topk_from_logits(zt, 5)
    from_cache = fn(zs, cached, y)
    from_tensor = fn(zs, topk_teacher_logits(cached, 37), y)
    assert torch.equal(from_cache, from_tensor), name
    assert torch.equal(*(torch.autograd.grad(v, zs)[0] for v in (from_cache, from_tensor)))


# --------------------------------------------------------------------------------------------
# kernel dispatch hook
# --------------------------------------------------------------------------------------------

def test_dispatch_uses_eager_for_cpu_and_when_forced(monkeypatch):
    monkeypatch.delenv("FASTKD_KERNELS", raising=False)
    assert losses._fused("kd", torch.zeros(2, 3)) is None
    fake_cuda = types.SimpleNamespace(is_cuda=True)
    kernel = object()
    too_big = types.SimpleNamespace(is_cuda=True, big=True)
    fake_kernels = types.SimpleNamespace(FUSED={"kd": kernel},
                                         supports=lambda name, x: not getattr(x, "big", False))
    monkeypatch.setitem(sys.modules, "fastkd.kernels", fake_kernels)
    assert losses._fused("kd", fake_cuda) is kernel
    assert losses._fused("kd", too_big) is None  # a shape the kernel refuses falls back to eager
    assert losses._fused("dkd", fake_cuda) is None  # nothing registered under that name
    monkeypatch.setenv("FASTKD_KERNELS", "Eager")
    assert losses._fused("kd", fake_cuda) is None


@pytest.mark.parametrize("name, call, expected_args", [
    ("kd", lambda: kd_loss("s", "t", 3.0), ("s", "t", 3.0)),
    ("dkd", lambda: dkd_loss("s", "t", "y"), ("s", "t", "y", 1.0, 8.0, 4.0)),
    ("nkd", lambda: nkd_loss("s", "t", "y", gamma=2.0), ("s", "t", "y", 1.0, 2.0)),
    ("ofa", lambda: ofa_loss("s", "t", "y", eps=1.5), ("s", "t", "y", 1.5, 1.0)),
    ("feature_mimic", lambda: feature_mimic_loss("s", "t"), ("s", "t")),
    ("freq_decoupled", lambda: freq_decoupled_loss("s", "t", 0.1, 0.2), ("s", "t", 0.1, 0.2, "spatial")),
])
def test_dispatch_passes_positional_args_in_signature_order(monkeypatch, name, call, expected_args):
    calls = []

    def fake_fused(kernel_name, x):
        return lambda *args: calls.append((kernel_name, args)) or "fused result"

    monkeypatch.setattr(losses, "_fused", fake_fused)
    assert call() == "fused result"
    assert calls == [(name, expected_args)]


@pytest.mark.gpu
def test_forced_eager_on_cuda_matches_cpu(monkeypatch):
    monkeypatch.setenv("FASTKD_KERNELS", "eager")
    zs, zt, y = torch.randn(4, 37), torch.randn(4, 37), torch.randint(0, 37, (4,))
    for fn in (lambda *a: kd_loss(*a[:2], 2.0), dkd_loss, nkd_loss, ofa_loss):
        cpu = fn(zs, zt, y)
        gpu = fn(zs.cuda(), zt.cuda(), y.cuda())
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-6)


def test_rkd_loss_keeps_fp32_under_bf16_autocast():
    """The distance term cancels catastrophically in bf16; the loss must ignore autocast."""
    student, teacher = torch.randn(8, 64) * 30 + 100, torch.randn(8, 64) * 30 + 100
    reference = losses.rkd_loss(student, teacher)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        under_autocast = losses.rkd_loss(student, teacher)
    torch.testing.assert_close(under_autocast, reference, rtol=1e-5, atol=1e-6)


def test_eager_only_forces_and_restores_the_dispatch_setting(monkeypatch):
    monkeypatch.setenv("FASTKD_KERNELS", "auto")
    with losses.eager_only():
        assert os.environ["FASTKD_KERNELS"] == "eager"
    assert os.environ["FASTKD_KERNELS"] == "auto"
    monkeypatch.delenv("FASTKD_KERNELS")
    with losses.eager_only():
        pass
    assert "FASTKD_KERNELS" not in os.environ


# --------------------------------------------------------------------------------------------
# losses of single methods: USKD, CRD, CAKD, SRRL
# --------------------------------------------------------------------------------------------

def test_zipf_labels_use_one_based_ranks_and_sum_to_one():
    scores = torch.tensor([[0.1, 0.5, 0.3, 0.2]])         # ranks: class 1, 2, 3, 0 → 1, 2, 3, 4
    labels = losses._zipf_non_target_labels(scores, torch.tensor([[1]]))
    # class 1 (rank 1) removed; classes 0, 2, 3 keep 1/4, 1/2, 1/3, renormalised by 13/12
    torch.testing.assert_close(labels, torch.tensor([[3 / 13, 6 / 13, 4 / 13]]))
    scores = torch.randn(6, 50)
    two_targets = torch.stack([torch.arange(6), torch.arange(6) + 10], dim=1)
    for targets in (torch.randint(0, 50, (6, 1)), two_targets):
        labels = losses._zipf_non_target_labels(scores, targets)
        assert labels.shape == (6, 50 - targets.shape[1])
        torch.testing.assert_close(labels.sum(1), torch.ones(6))
        assert torch.all(labels > 0)


def uskd_by_the_spec(z, w, labels, alpha, beta, mu, rank_on_log_probs):
    """cls_KD `USKDLoss` restated one sample at a time (independent of fastkd.losses)."""
    batch_size, k = z.shape
    if labels.dim() == 2:   # the two largest label values (topk: same tie-break as fastkd.losses)
        values, classes = labels.topk(2, dim=1)
        targets, values = classes.tolist(), values.tolist()
    else:
        targets = [[labels[b].item()] for b in range(batch_size)]
        values = [[1.0] for _ in range(batch_size)]
    p = torch.softmax(z, 1)
    squared = torch.tensor([[p[b, c].item() ** 2 for c in targets[b]] for b in range(batch_size)])
    column_mean = squared.mean(0)
    total_t = total_non = total_weak = 0.0
    for b in range(batch_size):
        for j, c in enumerate(targets[b]):
            weight = 0.0 if values[b][j] == 0 else squared[b, j] + values[b][j] - column_mean[j]
            total_t += -weight * math.log(p[b, c])
        q = (0.9 * labels[b] if labels.dim() == 2 else 0.9 * F.one_hot(labels[b], k)) + 0.1 / k
        total_weak += -(mu * q * torch.log_softmax(w[b], 0)).sum()
        pw = torch.softmax(w[b], 0)
        student = torch.log(p[b]) if rank_on_log_probs else p[b]
        score = (pw / (1 - sum(pw[c] for c in targets[b]) + 1e-6)
                 + student / (1 - sum(student[c] for c in targets[b]) + 1e-6))
        ranked = sorted(range(k), key=lambda c: -score[c].item())
        zipf = {c: 1.0 / (position + 1) for position, c in enumerate(ranked)}
        others = [c for c in range(k) if c not in targets[b]]
        norm = sum(zipf[c] for c in others)
        log_q = torch.log_softmax(z[b, others], 0)
        total_non += -sum(zipf[c] / norm * log_q[i] for i, c in enumerate(others))
    return (alpha * total_t / batch_size + beta * total_non / batch_size, total_weak / batch_size)


@pytest.mark.parametrize("rank_on_log_probs", [True, False])
@pytest.mark.parametrize("soft", [False, True])
def test_uskd_losses_match_the_specification(soft, rank_on_log_probs):
    z, w = 2 * torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    if soft:
        labels = torch.softmax(3 * torch.randn(5, 7), 1)
        labels[0] = F.one_hot(torch.tensor(3), 7).float()  # second value 0: its target weight is 0
    else:
        labels = torch.randint(0, 7, (5,))
    loss_t, loss_non, loss_weak = losses.uskd_losses(z, w, labels, mu=0.3,
                                                     rank_on_log_probs=rank_on_log_probs)
    kd, weak = uskd_by_the_spec(z, w, labels, 0.7, 0.2, 0.3, rank_on_log_probs)
    torch.testing.assert_close((0.7 * loss_t + 0.2 * loss_non).double(),
                               torch.as_tensor(kd).double())
    torch.testing.assert_close(loss_weak.double(), torch.as_tensor(weak).double())


def test_uskd_rank_flag_changes_the_non_target_labels():
    torch.manual_seed(3)
    z, w, labels = 3 * torch.randn(8, 20), 3 * torch.randn(8, 20), torch.randint(0, 20, (8,))
    shipped = losses.uskd_losses(z, w, labels, mu=0.005, rank_on_log_probs=True)
    intended = losses.uskd_losses(z, w, labels, mu=0.005, rank_on_log_probs=False)
    torch.testing.assert_close(shipped[0], intended[0])
    assert not torch.isclose(shipped[1], intended[1])


def ref_nce(scores, num_samples, valid):
    """OFAKD `ContrastLoss` written per sample: log D1 of the positive, log D0 of each negative."""
    batch, columns = scores.shape
    noise = (columns - 1) / num_samples
    total = 0.0
    for b in range(batch):
        if not valid[b]:
            continue
        total = total + torch.log(scores[b, 0] / (scores[b, 0] + noise + 1e-7))
        for j in range(1, columns):
            total = total + torch.log(noise / (scores[b, j] + noise + 1e-7))
    return -total / batch


@pytest.mark.parametrize("num_samples", [50, 1000])
def test_nce_loss(num_samples):
    low = (torch.rand(4, 9) * 2 + 1e-3).requires_grad_()
    high = low.detach().double().requires_grad_()
    valid = torch.tensor([True, True, False, True])
    _check(lambda s: losses.nce_loss(s, num_samples, valid),
           lambda s: ref_nce(s, num_samples, valid), [low], [high], torch.float32)
    _check(lambda s: losses.nce_loss(s, num_samples), lambda s: ref_nce(s, num_samples, [True] * 4),
           [low], [high], torch.float32)


def _mean_square_loop(a, b):
    """Σ over every element of (a − b)², / the element count, one row at a time."""
    return sum(((a[i] - b[i]) ** 2).sum() for i in range(len(a))) / a.numel()


@pytest.mark.parametrize("dtype", DTYPES)
def test_cakd_loss_sums(dtype):
    pairs = [_make(shape, dtype, 1.0) for shape in [(2, 6, 6)] * 4 + [(2, 10)] * 2 + [(2, 8)] * 2
             + [(2, 6, 8)] * 2]
    lows, highs = [low for low, _ in pairs], [high for _, high in pairs]
    _check(lambda *x: losses.cakd_pca_loss(*x, 0.3, 0.07),
           lambda sqk, tqk, svv, tvv: 0.3 * _mean_square_loop(sqk, tqk)
           + 0.07 * _mean_square_loop(svv, tvv), lows[:4], highs[:4], dtype, grad_of=(0, 2))
    _check(lambda *x: losses.cakd_gl_loss(*x, 1.5, 0.5, 0.05),
           lambda zs, zt, cs, ct, ps, pt: 1.5 * _mean_square_loop(zs, zt)
           + 0.5 * _mean_square_loop(cs, ct) + 0.05 * _mean_square_loop(ps, pt),
           lows[4:], highs[4:], dtype, grad_of=(0, 2, 4))


@pytest.mark.parametrize("dtype", DTYPES)
def test_srrl_losses(dtype):
    (fs, fs64), (ft, ft64) = _make((3, 16), dtype, 1.0), _make((3, 16), dtype, 1.0)
    (zs, zs64), (zt, zt64) = _make((3, 10), dtype), _make((3, 10), dtype)
    for term, student in ((0, 0), (1, 2)):   # L_fm reads the features, L_sr the logits
        _check(lambda *x: losses.srrl_losses(*x)[term],
               lambda a, b, c, d: _mean_square_loop(*((a, b), (c, d))[term]),
               [fs, ft, zs, zt], [fs64, ft64, zs64, zt64], dtype, grad_of=(student,))
