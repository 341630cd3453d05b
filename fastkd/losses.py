"""Every distillation formula, once: pure functions, the eager reference.

Conventions: `z_s, z_t` are B×K logits, `target` an integer class tensor (B,),
feature maps are B×C×H×W. Every function upcasts its inputs to fp32 first, computes in fp32 and
returns a scalar fp32 tensor. "batch mean" = sum over classes/elements, then mean over the batch.

Numerics. Where an official repository takes `log(softmax(·))`, this module takes
`log_softmax(·)`: the two agree except where a probability underflows to 0, where `log` gives
−inf (and `0·log 0` gives NaN). Terms with a zero weight contribute exactly 0 (`0·log 0 = 0`).
A −inf logit is a class with zero probability; a +inf logit is clamped to `_LOGIT_CEILING`
(1e30), which keeps max-subtraction finite and gives the softmax limit (a one-hot row), so
rows with ±inf or ±1e4 logits stay finite wherever the formula itself is finite.

Fused kernels. For CUDA inputs `kd_loss`, `dkd_loss`, `nkd_loss`, `ofa_loss`,
`feature_mimic_loss` and `freq_decoupled_loss` hand their positional arguments, unchanged (a
teacher may be a tensor or a `TopKLogits`), to the kernel registered in
`fastkd.kernels.FUSED` under their name; `FASTKD_KERNELS=eager` forces this reference.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from fastkd.loss_conventions import LOGIT_CEILING as _LOGIT_CEILING
from fastkd.loss_conventions import TopKLogits  # also public here (README, teacher cache)
from fastkd.loss_conventions import is_zero_weight as _is_zero_weight


# --------------------------------------------------------------------------------------------
# Kernel dispatch
# --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def eager_only():
    """Within the block every loss takes its eager reference path (as `FASTKD_KERNELS=eager`):
    what tests and benchmarks compare the fused kernels against."""
    previous = os.environ.get("FASTKD_KERNELS")
    os.environ["FASTKD_KERNELS"] = "eager"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("FASTKD_KERNELS", None)
        else:
            os.environ["FASTKD_KERNELS"] = previous


def _fused(name: str, x: Tensor) -> Callable | None:
    """The fused kernel registered under `name` for CUDA inputs; None means: use eager."""
    if not x.is_cuda or os.environ.get("FASTKD_KERNELS", "").lower() == "eager":
        return None
    from fastkd.kernels import FUSED, supports  # lazy: triton is needed only on a GPU
    return FUSED.get(name) if supports(name, x) else None


# --------------------------------------------------------------------------------------------
# Top-k cached teacher
# --------------------------------------------------------------------------------------------

def topk_from_logits(teacher_logits: Tensor, k: int) -> TopKLogits:
    """What the cache stores for a B×K teacher-logit tensor: top-k values/indices + full lse."""
    values, indices = teacher_logits.topk(k, dim=1)
    return TopKLogits(values, indices, teacher_logits.float().logsumexp(dim=1))


def topk_teacher_logits(topk: TopKLogits, num_classes: int) -> Tensor:
    """Rebuild B×K fp32 logits from a `TopKLogits`, spreading the tail mass evenly.

    The top-k classes keep their logits v; every other class gets one shared logit
    `r = lse + log(max(1 − Σ exp(v − lse), tiny)) − log(K − k)`, so that at T = 1 the softmax of
    the result gives each top-k class exactly its original probability and the K − k others
    share the remainder `1 − Σ softmax(v)` evenly (the result's logsumexp equals `lse`).
    Because the result is a set of logits, any temperature spreads the tail evenly too.
    `1 − Σ` is computed as `−expm1(logsumexp(v − lse))` (exact when the remainder is tiny); a
    remainder that rounding makes ≤ 0 is clamped to fp32's `tiny`, i.e. an (almost) empty tail,
    never NaN. With k = K every class is a top-k class and `r` is unused.
    """
    values = topk.values.float()
    lse = topk.logsumexp.float()
    batch, k = values.shape
    tail_classes = num_classes - k
    if tail_classes == 0:
        tail = lse  # placeholder, every position is overwritten below
    else:
        top_mass_log = (values - lse[:, None]).logsumexp(dim=1)
        remainder = (-torch.expm1(top_mass_log)).clamp_min(torch.finfo(torch.float32).tiny)
        tail = lse + remainder.log() - math.log(tail_classes)
    return tail[:, None].expand(batch, num_classes).scatter(1, topk.indices, values)


def _teacher_logits(teacher: Tensor | TopKLogits, num_classes: int) -> Tensor:
    """Teacher logits as a B×K tensor, whether given in full or as cached top-k."""
    if isinstance(teacher, TopKLogits):
        return topk_teacher_logits(teacher, num_classes)
    return teacher


# --------------------------------------------------------------------------------------------
# Shared pieces of the logit losses
# --------------------------------------------------------------------------------------------

def _log_softmax(logits: Tensor, temperature: float = 1.0, exclude: Tensor | None = None) -> Tensor:
    """log σ(z/T) in fp32 over dim 1; classes where `exclude` is True get probability 0.

    Excluding a class (−inf logit) is the exact form of mdistiller's/cls_KD's `z/T − 1000·g`
    masking trick; the two agree while the logits span less than ~1000·T.
    """
    z = (logits.float() / temperature).clamp(max=_LOGIT_CEILING)
    if exclude is not None:
        z = z.masked_fill(exclude, float("-inf"))
    return z.log_softmax(dim=1)


def _target_mask(target: Tensor, num_classes: int) -> Tensor:
    """B×K bool one-hot of the integer targets."""
    return F.one_hot(target.long(), num_classes).bool()


def _kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Per-row KL(p ‖ q) = Σ_k p_k (log p_k − log q_k), with 0·log 0 = 0 (no NaN, no NaN grad)."""
    p = log_p.exp()
    log_ratio = torch.where(p > 0, log_p - log_q, 0.0)
    return (p * log_ratio).sum(dim=1)


def _soft_ce_rows(weights: Tensor, log_q: Tensor) -> Tensor:
    """Per-row −Σ_k w_k log q_k, where a zero weight contributes 0 even if log q_k = −inf."""
    return -(weights * torch.where(weights != 0, log_q, 0.0)).sum(dim=1)


# --------------------------------------------------------------------------------------------
# Logit losses
# --------------------------------------------------------------------------------------------

def kd_loss(student_logits: Tensor, teacher_logits: Tensor | TopKLogits,
            temperature: float = 1.0) -> Tensor:
    """Hinton KD, KL form: `T² · (1/B) Σ_b KL(σ(z_t/T) ‖ σ(z_s/T))`, batch mean.

    Reproduces mdistiller `kd_loss` and OFAKD `kd_loss` (log-softmax student, softmax teacher).
    The teacher may be a `TopKLogits` (reconstructed by `topk_teacher_logits`).
    """
    fused = _fused("kd", student_logits)
    if fused is not None:
        return fused(student_logits, teacher_logits, temperature)
    teacher = _teacher_logits(teacher_logits, student_logits.shape[1])
    kl = _kl_rows(_log_softmax(teacher, temperature), _log_softmax(student_logits, temperature))
    return temperature ** 2 * kl.mean()


def soft_ce_kd_loss(student_logits: Tensor, teacher_logits: Tensor | TopKLogits,
                    temperature: float = 1.0) -> Tensor:
    """KD, soft-cross-entropy form: `T² · (1/B) Σ_b −Σ_k σ(z_t/T)_k log σ(z_s/T)_k`, batch mean.

    cls_KD `KDLoss` / ScaleKD / UFD-KD `KDLoss` without the α weighting (the caller weights it;
    their CE re-weighting by 1 − α is the distiller's business). Log-softmax replaces their
    `log(softmax)`. Equals `kd_loss` plus `T²·H(σ(z_t/T))`: same gradient, different value.
    The teacher may be a `TopKLogits`.
    """
    teacher = _teacher_logits(teacher_logits, student_logits.shape[1])
    log_p_t = _log_softmax(teacher, temperature)
    ce = _soft_ce_rows(log_p_t.exp(), _log_softmax(student_logits, temperature))
    return temperature ** 2 * ce.mean()


def _binary_log_probs(log_p: Tensor, target_mask: Tensor) -> Tensor:
    """B×2 log of DKD's binary distribution [p_y, Σ_{k≠y} p_k], computed in log space."""
    log_target = log_p.masked_fill(~target_mask, float("-inf")).logsumexp(dim=1)
    log_other = log_p.masked_fill(target_mask, float("-inf")).logsumexp(dim=1)
    return torch.stack([log_target, log_other], dim=1)


def dkd_loss(student_logits: Tensor, teacher_logits: Tensor | TopKLogits, target: Tensor,
             alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0) -> Tensor:
    """Decoupled KD (Zhao et al., CVPR 2022; megvii-research/mdistiller
    `mdistiller/distillers/DKD.py` `dkd_loss`): `α·TCKD + β·NCKD`, batch mean, both × T².

    `b = [p_y, 1 − p_y]` with `p = σ(z/T)`; `TCKD = T² (1/B) Σ_b KL(b_t ‖ b_s)`;
    `p̂ = σ(z/T)` over the non-target classes only; `NCKD = T² (1/B) Σ_b KL(p̂_t ‖ p̂_s)`.
    Reproduces mdistiller `dkd_loss` (also cls_KD / OFAKD DKD). Deviations, both numerical:
    `log b_s` comes from log-softmax via logsumexp instead of `log` of a masked softmax sum, and
    the target class is excluded exactly (−inf) instead of by `−1000` (identical unless logits
    span more than ~1000·T). Warm-up belongs to the distiller.
    """
    fused = _fused("dkd", student_logits)
    if fused is not None:
        return fused(student_logits, teacher_logits, target, alpha, beta, temperature)
    num_classes = student_logits.shape[1]
    teacher = _teacher_logits(teacher_logits, num_classes)
    is_target = _target_mask(target, num_classes)
    log_p_s = _log_softmax(student_logits, temperature)
    log_p_t = _log_softmax(teacher, temperature)
    tckd = _kl_rows(_binary_log_probs(log_p_t, is_target), _binary_log_probs(log_p_s, is_target))
    nckd = _kl_rows(_log_softmax(teacher, temperature, is_target),
                    _log_softmax(student_logits, temperature, is_target))
    return temperature ** 2 * (alpha * tckd.mean() + beta * nckd.mean())


def nkd_loss(student_logits: Tensor, teacher_logits: Tensor | TopKLogits, target: Tensor,
             temperature: float = 1.0, gamma: float = 1.5) -> Tensor:
    """Normalized KD (Yang et al., ICCV 2023; yzd-v/cls_KD `mmcls/models/dis_losses/nkd.py`
    `NKDLoss`): `L_target + L_non`, batch mean.

    `L_target = −(1/B) Σ_b sg[σ(z_t)_y] · log σ(z_s)_y` (T = 1, teacher detached);
    `L_non = −γ T² (1/B) Σ_b Σ_{j≠y} σ(z̃_t/T)_j log σ(z̃_s/T)_j`, z̃ = logits without the target
    column, whose softmax equals the renormalised non-target probabilities `p_j / (1 − p_y)`.
    Reproduces cls_KD `NKDLoss` (master's `−1000` masking taken exactly, log-softmax for log).
    """
    fused = _fused("nkd", student_logits)
    if fused is not None:
        return fused(student_logits, teacher_logits, target, temperature, gamma)
    num_classes = student_logits.shape[1]
    teacher = _teacher_logits(teacher_logits, num_classes)
    index = target.long()[:, None]
    log_p_s_target = _log_softmax(student_logits).gather(1, index)
    p_t_target = _log_softmax(teacher).gather(1, index).exp().detach()
    target_term = _soft_ce_rows(p_t_target, log_p_s_target).mean()  # q_y = 0 adds 0, not NaN
    is_target = _target_mask(target, num_classes)
    log_q_t = _log_softmax(teacher, temperature, is_target)
    log_q_s = _log_softmax(student_logits, temperature, is_target)
    non_target_term = gamma * temperature ** 2 * _soft_ce_rows(log_q_t.exp(), log_q_s).mean()
    return target_term + non_target_term


def ofa_loss(student_logits: Tensor, teacher_logits: Tensor | TopKLogits, target: Tensor,
             eps: float = 1.0, temperature: float = 1.0) -> Tensor:
    """OFA adaptive target enhancement (Hao et al., NeurIPS 2023; Hao840/OFAKD
    `distillers/ofa.py` `ofa_loss`), batch mean, no T².

    `w = (p_t + e_y)^ε − e_y`, `L = (1/B) Σ_b Σ_k −w_{b,k} log σ(z_s/T)_{b,k}`, `p_t = σ(z_t/T)`:
    target weight `(1 + p_t,y)^ε − 1` (computed as `expm1(ε·log1p(p_t,y))`), non-target weight
    `p_t,k^ε` (as `exp(ε·log p_t,k)`). ε = 1 is soft-CE KD without T². Reproduces OFAKD
    `ofa_loss`, with log-softmax for its `log(softmax)` (avoids its `0·(−inf)` NaN).
    """
    fused = _fused("ofa", student_logits)
    if fused is not None:
        return fused(student_logits, teacher_logits, target, eps, temperature)
    num_classes = student_logits.shape[1]
    teacher = _teacher_logits(teacher_logits, num_classes)
    log_p_t = _log_softmax(teacher, temperature)
    weights = torch.where(_target_mask(target, num_classes),
                          torch.expm1(eps * torch.log1p(log_p_t.exp())),
                          torch.exp(eps * log_p_t))
    return _soft_ce_rows(weights, _log_softmax(student_logits, temperature)).mean()


def wsld_loss(student_logits: Tensor, teacher_logits: Tensor | TopKLogits, target: Tensor,
              temperature: float = 2.0, alpha: float = 2.5) -> Tensor:
    """Weighted soft labels (Zhou et al., ICLR 2021; yzd-v/cls_KD
    `mmcls/models/dis_losses/wsld.py` `WSLDLoss`): `α T² (1/B) Σ_b w_b ℓ_b`.

    `ℓ_b = −Σ_k σ(z_t/T)_k log σ(z_s/T)_k`; `w = 1 − exp(−max(ce_s / (ce_t + 1e-7), 0))` with
    `ce = −log σ(z)_y` at T = 1 on detached logits. Reproduces cls_KD (master) `WSLDLoss`.
    The teacher may be a `TopKLogits`.
    """
    teacher_logits = _teacher_logits(teacher_logits, student_logits.shape[1])
    log_p_t = _log_softmax(teacher_logits, temperature)
    soft = _soft_ce_rows(log_p_t.exp(), _log_softmax(student_logits, temperature))
    index = target.long()[:, None]
    ce_s = -_log_softmax(student_logits.detach()).gather(1, index).squeeze(1)
    ce_t = -_log_softmax(teacher_logits.detach()).gather(1, index).squeeze(1)
    weight = 1 - torch.exp(-(ce_s / (ce_t + 1e-7)).clamp_min(0))
    # w = 0 (student certain of the target) adds 0, even where ℓ = +inf
    weighted = torch.where(weight != 0, weight * soft, 0.0)
    return alpha * temperature ** 2 * weighted.mean()


def _pearson_rows(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Per-row Pearson correlation: cos(a − mean a, b − mean b), `eps` added to the norm product."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_loss(student_logits: Tensor, teacher_logits: Tensor | TopKLogits, beta: float = 1.0,
              gamma: float = 1.0, tau: float = 1.0) -> Tensor:
    """DIST (Huang et al., NeurIPS 2022; Hao840/OFAKD `distillers/dist.py` `dist_loss`):
    `τ² (β·inter + γ·intra)` on `y = σ(z/τ)`.

    inter = `1 − mean_b pearson(y_s[b,:], y_t[b,:])` (each sample over classes),
    intra = `1 − mean_k pearson(y_s[:,k], y_t[:,k])` (each class over the batch).
    Reproduces OFAKD `DIST` (from the DIST authors' code). The teacher may be a `TopKLogits`.
    """
    teacher = _teacher_logits(teacher_logits, student_logits.shape[1])
    y_s = _log_softmax(student_logits, tau).exp()
    y_t = _log_softmax(teacher, tau).exp()
    inter = 1 - _pearson_rows(y_s, y_t).mean()
    intra = 1 - _pearson_rows(y_s.t(), y_t.t()).mean()
    return tau ** 2 * (beta * inter + gamma * intra)


def bkd_loss(student_logits: Tensor, teacher_logits: Tensor | TopKLogits) -> Tensor:
    """Binary KD: BCE-with-logits of z_s against the teacher's softmax p_t = softmax(z_t) (over
    classes, not a per-class sigmoid), element mean over B×K; no temperature.

    Reproduces OFAKD `BKD` (Hao840/OFAKD `distillers/kd.py`, `BKD.forward`:
    `binary_cross_entropy_with_logits(logits_student, logits_teacher.softmax(1))`). ±inf student
    logits are clamped to ±1e30, where torch's BCE-with-logits would give `0·inf = NaN` for a
    term whose true value is 0. The teacher may be a `TopKLogits` (softmax of the rebuilt
    logits, tail classes included).
    """
    teacher = _teacher_logits(teacher_logits, student_logits.shape[1])
    student = student_logits.float().clamp(-_LOGIT_CEILING, _LOGIT_CEILING)
    return F.binary_cross_entropy_with_logits(student, _log_softmax(teacher).exp())


# --------------------------------------------------------------------------------------------
# Embedding losses (penultimate features)
# --------------------------------------------------------------------------------------------

def _pairwise_distances(embed: Tensor, squared: bool, eps: float) -> Tensor:
    """B×B Euclidean distances, squared distance clamped at `eps`, diagonal set to 0."""
    sq_norm = embed.pow(2).sum(dim=1)
    dist = (sq_norm[:, None] + sq_norm[None, :] - 2 * embed @ embed.t()).clamp_min(eps)
    if not squared:
        dist = dist.sqrt()
    off_diagonal = 1 - torch.eye(len(embed), device=embed.device, dtype=embed.dtype)
    return dist * off_diagonal


def _mean_normalized_distances(embed: Tensor, squared: bool, eps: float) -> Tensor:
    """Pairwise distances divided by the mean of the positive (off-diagonal) ones."""
    dist = _pairwise_distances(embed, squared, eps)
    return dist / (dist.sum() / (dist > 0).sum())


def _triplet_angles(embed: Tensor) -> Tensor:
    """Flattened B³ cosines `⟨unit(e_j − e_i), unit(e_k − e_i)⟩` over every (i, j, k)."""
    unit_diff = F.normalize(embed[None, :, :] - embed[:, None, :], p=2, dim=2)
    return torch.bmm(unit_diff, unit_diff.transpose(1, 2)).flatten()


def rkd_loss(student_embed: Tensor, teacher_embed: Tensor, distance_weight: float = 25.0,
             angle_weight: float = 50.0, eps: float = 1e-12, squared: bool = False) -> Tensor:
    """Relational KD (Park et al., CVPR 2019; Hao840/OFAKD `distillers/rkd.py` `RKD`):
    `w_d·Huber(ψ_D^s, ψ_D^t) + w_a·Huber(ψ_A^s, ψ_A^t)`.

    ψ_D: pairwise distances / their positive mean; ψ_A: cosine of every triplet's difference
    vectors; Huber = `smooth_l1` (β = 1), element mean. The teacher side carries no gradient
    (computed under no_grad there). Reproduces OFAKD `RKD` (from the RKD authors' code).
    Embeddings are flattened to B×D.
    """
    student = student_embed.float().flatten(1)
    teacher = teacher_embed.float().flatten(1).detach()
    # fp32 matmuls even under autocast: ‖a‖² + ‖b‖² − 2ab cancels badly in bf16
    with torch.autocast(device_type=student.device.type, enabled=False):
        distance = F.smooth_l1_loss(_mean_normalized_distances(student, squared, eps),
                                    _mean_normalized_distances(teacher, squared, eps))
        angle = F.smooth_l1_loss(_triplet_angles(student), _triplet_angles(teacher))
    return distance_weight * distance + angle_weight * angle


def correlation_loss(student_embed: Tensor, teacher_embed: Tensor, scale: float = 0.02) -> Tensor:
    """CC as in OFAKD `Correlation` (`distillers/correlation.py`), on already projected
    embeddings.

    `δ = |e_s − e_t|`, `L = scale · mean_{b=1..B−1} Σ_d δ_{b,d} δ_{b+1,d}` (consecutive samples).
    """
    delta = (student_embed.float() - teacher_embed.float()).abs()
    return scale * (delta[:-1] * delta[1:]).sum(dim=1).mean()


# --------------------------------------------------------------------------------------------
# Feature-map losses
# --------------------------------------------------------------------------------------------

def mse_sum_loss(a: Tensor, b: Tensor) -> Tensor:
    """`Σ (a − b)² / B`: the "sum/B" reduction of ViTKD and MGD (weights are the caller's)."""
    return (a.float() - b.float()).pow(2).sum() / a.shape[0]


def feature_mimic_loss(student_map: Tensor, teacher_map: Tensor) -> Tensor:
    """ScaleKD direct view (deep-optimization/ScaleKD `mmcls/models/dis_losses/fmdv2.py`
    `FreqMaskingDistillLossv2`): `Σ (n(S) − n(T))² / B`, weight by the caller.

    `n` = L2 normalisation of each position's channel vector (dim 1, `F.normalize`, eps 1e-12).
    Reproduces ScaleKD `FreqMaskingDistillLossv2` direct branch (after the projector).
    """
    fused = _fused("feature_mimic", student_map)
    if fused is not None:
        return fused(student_map, teacher_map)
    return mse_sum_loss(F.normalize(student_map.float(), dim=1),
                        F.normalize(teacher_map.float(), dim=1))


def _spatial_dc_term(s: Tensor, t: Tensor) -> Tensor:
    """`Σ (n_c(DC_s) − n_c(DC_t))² / B` with DC = per-channel spatial mean, broadcast.

    Every position holds the same unit vector, so this is `HW · Σ_c (unit(μ_s) − unit(μ_t))² / B`.
    """
    mu_s, mu_t = s.mean(dim=(2, 3)), t.mean(dim=(2, 3))
    return s.shape[2] * s.shape[3] * mse_sum_loss(F.normalize(mu_s, dim=1), F.normalize(mu_t, dim=1))


def _spatial_ac_term(s: Tensor, t: Tensor) -> Tensor:
    """`Σ (n_c(X_s − μ_s) − n_c(X_t − μ_t))² / B`: mean-removed maps, unit channel vectors."""
    ac_s = s - s.mean(dim=(2, 3), keepdim=True)
    ac_t = t - t.mean(dim=(2, 3), keepdim=True)
    return mse_sum_loss(F.normalize(ac_s, dim=1), F.normalize(ac_t, dim=1))


def _channel_dc_term(s: Tensor, t: Tensor) -> Tensor:
    """`Σ (n_p(DC_s) − n_p(DC_t))² / B` with DC = per-position channel mean, broadcast over C.

    Each channel holds the same HW map ν, so this is `C · Σ (unit(ν_s) − unit(ν_t))² / B`.
    """
    nu_s, nu_t = s.mean(dim=1).flatten(1), t.mean(dim=1).flatten(1)
    return s.shape[1] * mse_sum_loss(F.normalize(nu_s, dim=1), F.normalize(nu_t, dim=1))


def _channel_ac_term(s: Tensor, t: Tensor) -> Tensor:
    """`Σ (n_p(X_s − ν_s) − n_p(X_t − ν_t))² / B`: each channel's HW map unit-normalised."""
    ac_s = (s - s.mean(dim=1, keepdim=True)).flatten(2)
    ac_t = (t - t.mean(dim=1, keepdim=True)).flatten(2)
    return mse_sum_loss(F.normalize(ac_s, dim=2), F.normalize(ac_t, dim=2))


_FREQ_TERMS = {"spatial": (_spatial_dc_term, _spatial_ac_term),
               "channel": (_channel_dc_term, _channel_ac_term)}


def freq_decoupled_loss(student_map: Tensor, teacher_map: Tensor, dc_weight: float | Tensor,
                        ac_weight: float | Tensor, dim: str = "spatial") -> Tensor:
    """Frequency-decoupled feature loss (lusilili/UFD-KD `mmcls/models/dis_losses/ufd.py`
    `UnifiedFreqDecoupleLoss`; ScaleKD's alternative view, `fmdv2.py`).

    `dc_weight·Σ(n(DC_s) − n(DC_t))²/B + ac_weight·Σ(n(AC_s) − n(AC_t))²/B` on B×C×H×W maps.
    The unnormalised DCT-II keeping only coefficient 0 reconstructs the mean exactly, so
    `dim="spatial"`: DC = per-channel mean over (H, W), AC = residual, `n` along channels at each
    position; `dim="channel"`: DC = per-position mean over C, AC = residual, `n` along the
    spatial axis (each channel's HW map unit-norm). ScaleKD's alternative view is
    `dc_weight=0, dim="spatial"`. A term whose weight is a Python 0 is not computed.
    Reproduces UFD-KD `UnifiedFreqDecoupleLoss` and ScaleKD `FreqMaskingDistillLossv2` (alt view).
    """
    fused = _fused("freq_decoupled", student_map)
    if fused is not None:
        return fused(student_map, teacher_map, dc_weight, ac_weight, dim)
    if dim not in _FREQ_TERMS:
        raise ValueError(f"dim must be 'spatial' or 'channel', got {dim!r}")
    s, t = student_map.float(), teacher_map.float()
    dc_term, ac_term = _FREQ_TERMS[dim]
    loss = s.new_zeros(())
    if not _is_zero_weight(dc_weight):
        loss = loss + dc_weight * dc_term(s, t)
    if not _is_zero_weight(ac_weight):
        loss = loss + ac_weight * ac_term(s, t)
    return loss


def _as_grid(feature: Tensor) -> Tensor:
    """B×C×H×W as is; B×L×D tokens (L a square, prefix tokens already dropped) → B×D×√L×√L."""
    if feature.dim() == 4:
        return feature
    batch, length, channels = feature.shape
    side = math.isqrt(length)
    if side * side != length:
        raise ValueError(f"token count {length} is not a square grid; drop prefix tokens first")
    return feature.transpose(1, 2).reshape(batch, channels, side, side)


def hcl_loss(student_map: Tensor, teacher_map: Tensor, levels: tuple[int, ...] = (4, 2, 1)) -> Tensor:
    """PAT's hierarchical context loss (jimmylin0979/PAT `distillers/pat.py` `hcl_loss`),
    ReviewKD-style.

    `(MSE(a, b) + Σ_l w_l · MSE(pool_l(a), pool_l(b))) / (1 + Σ_l w_l)`: MSE is element mean,
    `pool_l` is adaptive average pooling to l×l, levels with `l ≥ H` are skipped and `w` halves
    with every level used (0.5, 0.25, 0.125). Tokens B×L×D are laid out as B×D×√L×√L first.
    Reproduces PAT `hcl_loss`.
    """
    s, t = _as_grid(student_map).float(), _as_grid(teacher_map).float()
    loss = F.mse_loss(s, t)
    weight, total_weight = 1.0, 1.0
    for level in levels:
        if level >= s.shape[2]:
            continue
        weight /= 2
        loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(s, level),
                                          F.adaptive_avg_pool2d(t, level))
        total_weight += weight
    return loss / total_weight


# --------------------------------------------------------------------------------------------
# Losses of single methods (USKD, CRD, CAKD, SRRL)
# --------------------------------------------------------------------------------------------

_USKD_RANK_EPS = 1e-6        # cls_KD's stabiliser in the ranking-score denominators
_USKD_WEAK_LABEL_KEEP = 0.9  # weak head target: 0.9·label + 0.1/K (cls_KD, fixed in the code)


def _uskd_targets(labels: Tensor) -> tuple[Tensor, Tensor]:
    """(B×n target classes, B×n label values): integer labels → the label, value 1 (n = 1);
    soft (mixup) labels → their top-2 classes and values (n = 2), as cls_KD."""
    if labels.dim() == 2:
        values, classes = labels.float().topk(2, dim=1)
        return classes, values
    classes = labels.long()[:, None]
    return classes, torch.ones_like(classes, dtype=torch.float32)


def _zipf_non_target_labels(scores: Tensor, targets: Tensor) -> Tensor:
    """B×(K − n) Zipf soft labels over the non-target classes, each row summing to 1.

    Classes are sorted by `scores` (descending) over all K classes, targets included; the
    class at 1-based rank r gets `1/r`; the target columns are then removed and the rest
    renormalised (cls_KD `USKDLoss`). Column order is the class order without targets.
    """
    batch, num_classes = scores.shape
    position = scores.argsort(dim=1, descending=True).argsort(dim=1)   # 0-based rank per class
    zipf = 1.0 / (position + 1).float()
    keep = torch.ones_like(scores, dtype=torch.bool).scatter_(1, targets, False)
    zipf = zipf[keep].view(batch, num_classes - targets.shape[1])
    return zipf / zipf.sum(dim=1, keepdim=True)


def uskd_losses(logits: Tensor, weak_logits: Tensor, labels: Tensor, *, mu: float = 0.005,
                rank_on_log_probs: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """USKD's (L_target, L_non, L_weak) (Yang et al., ICCV 2023; cls_KD `USKDLoss`), batch means.

    With targets `t` (value `v`, `_uskd_targets`), `s = σ(z_s)`, `w = weak_logits`:
      L_target = −(1/B) Σ_b Σ_t sg[p_t] log s_t,  p_t = s_t² + v − mean_batch(s_t²), 0 where v = 0
      L_weak   = −(1/B) Σ_b Σ_k μ q_k log σ(w)_k,  q = 0.9·label + 0.1/K
      score    = σ(w) / (1 − Σ_t σ(w)_t + ε) + ℓ / (1 − Σ_t ℓ_t + ε),  ℓ = log s as shipped
                 (`rank_on_log_probs`) or s (intent); ε = 1e-6; no gradient
      L_non    = −(1/B) Σ_b Σ_{j∉t} ẑ_j log σ(z̃_s)_j, ẑ = `_zipf_non_target_labels(score, t)`,
                 z̃_s the logits without the target columns.
    The batch mean in p_t is over this process's batch (as cls_KD under DDP: no all-gather).
    cls_KD already takes log-softmax wherever it needs a log, so the numerics are its own.
    """
    logits, weak_logits = logits.float(), weak_logits.float()
    batch, num_classes = logits.shape
    targets, values = _uskd_targets(labels)

    log_p = logits.log_softmax(dim=1)
    log_p_target = log_p.gather(1, targets)
    with torch.no_grad():
        sharpened = log_p_target.exp().pow(2)
        p_target = sharpened + values - sharpened.mean(0, keepdim=True)
        p_target = torch.where(values == 0, 0.0, p_target)
    loss_target = -(p_target * log_p_target).sum(dim=1).mean()

    if labels.dim() == 2:
        weak_label = _USKD_WEAK_LABEL_KEEP * labels.float()
    else:
        weak_label = torch.zeros_like(logits).scatter_(1, targets, _USKD_WEAK_LABEL_KEEP)
    weak_label = weak_label + (1 - _USKD_WEAK_LABEL_KEEP) / num_classes
    log_w = weak_logits.log_softmax(dim=1)
    loss_weak = -(mu * weak_label * log_w).sum(dim=1).mean()

    with torch.no_grad():
        w = log_w.exp()
        student = log_p if rank_on_log_probs else log_p.exp()
        scores = (w / (1 - w.gather(1, targets).sum(1, keepdim=True) + _USKD_RANK_EPS)
                  + student / (1 - student.gather(1, targets).sum(1, keepdim=True)
                               + _USKD_RANK_EPS))
        zipf = _zipf_non_target_labels(scores, targets)
    keep = torch.ones_like(logits, dtype=torch.bool).scatter_(1, targets, False)
    log_q = logits[keep].view(batch, num_classes - targets.shape[1]).log_softmax(dim=1)
    loss_non = -(zipf * log_q).sum(dim=1).mean()
    return loss_target, loss_non, loss_weak


_NCE_EPS = 1e-7  # OFAKD's stabiliser in the NCE ratios


def nce_loss(scores: Tensor, num_samples: int, valid: Tensor | None = None) -> Tensor:
    """CRD's NCE loss for one side (Tian et al., ICLR 2020; OFAKD `ContrastLoss`), from
    B×(1+K) normalised scores P (column 0: the positive, then K negatives), noise P_n = 1/N:

    `L = −(1/B) [Σ_b log(P⁺ / (P⁺ + K·P_n + ε)) + Σ_{b,j} log(K·P_n / (P⁻ + K·P_n + ε))]`.

    `valid` (B bools) leaves out padded samples (dataset index −1), whose positive row is
    unknown; B stays the batch size.
    """
    scores = scores.float()
    noise = (scores.shape[1] - 1) / num_samples   # K·P_n
    positive = torch.log(scores[:, 0] / (scores[:, 0] + noise + _NCE_EPS))
    per_sample = positive + torch.log(noise / (scores[:, 1:] + noise + _NCE_EPS)).sum(dim=1)
    if valid is not None:
        per_sample = torch.where(valid, per_sample, 0.0)
    return -per_sample.sum() / scores.shape[0]


def _mse(a: Tensor, b: Tensor) -> Tensor:
    """Element-mean MSE in fp32."""
    return F.mse_loss(a.float(), b.float())


def cakd_pca_loss(student_qk: Tensor, teacher_qk: Tensor, student_vv: Tensor,
                  teacher_vv: Tensor, qk_weight: float = 0.2, vv_weight: float = 0.05) -> Tensor:
    """CAKD's partially cross attention loss (Liu et al., ACCV 2022, L_PCA; CrossArch_KD):
    `qk_weight·MSE(S_qk, A_qk) + vv_weight·MSE(S_vv, A_vv)`, MSE = element mean, on the
    head-averaged B×L×L attention logits of the student projector (S) and the teacher (A)."""
    return qk_weight * _mse(student_qk, teacher_qk) + vv_weight * _mse(student_vv, teacher_vv)


def cakd_gl_loss(student_logits: Tensor, teacher_logits: Tensor, student_cls: Tensor,
                 teacher_cls: Tensor, student_patches: Tensor, teacher_patches: Tensor,
                 logit_weight: float = 1.0, cls_weight: float = 1.0,
                 patch_weight: float = 0.05) -> Tensor:
    """CAKD's group-wise linear loss (Liu et al., ACCV 2022, L_GL; CrossArch_KD):
    `logit_weight·MSE(z_s, z_t) + cls_weight·MSE(cls_s, cls_t) + patch_weight·MSE(P_s, P_t)`,
    MSE = element mean: logits, the projected pooled student feature against the teacher's
    class token, and the group-projected student tokens against the teacher's patch tokens."""
    return (logit_weight * _mse(student_logits, teacher_logits)
            + cls_weight * _mse(student_cls, teacher_cls)
            + patch_weight * _mse(student_patches, teacher_patches))


def srrl_losses(student_feature: Tensor, teacher_feature: Tensor, regressed_logits: Tensor,
                teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
    """SRRL's (L_fm, L_sr) (Yang et al., ICLR 2021; cls_KD `SRRLLoss`), each an
    element-mean MSE: the aligned pooled student feature against the teacher's pooled feature,
    and the teacher classifier's logits on that student feature (`regressed_logits`) against
    the teacher's own logits."""
    return _mse(student_feature, teacher_feature), _mse(regressed_logits, teacher_logits)
