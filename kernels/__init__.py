"""Fused Triton kernels for the KD losses, imported as `fastkd.kernels`.

`FUSED` maps the names that `fastkd.losses._fused` looks up to callables with the signature of
the eager loss of the same name (positional arguments in the same order). Each returns a
scalar fp32 tensor whose gradient flows to the student only; a logit teacher may be a tensor
or a `fastkd.losses.TopKLogits`. The logit losses share one skeleton (`row_loss.py`: kernels,
launcher, `autograd.Function`) and each of kd.py, dkd.py, nkd.py, ofa.py supplies its
formulas; freq.py holds the feature op whole. The wrappers below only adapt signatures.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from fastkd.kernels.dkd import DKD
from fastkd.kernels.freq import MAX_POSITIONS, FreqTermsFunction
from fastkd.kernels.kd import KD
from fastkd.kernels.nkd import NKD
from fastkd.kernels.ofa import OFA
from fastkd.kernels.row_loss import RowLossFunction
from fastkd.loss_conventions import TopKLogits, is_zero_weight


def kd_loss(student_logits: Tensor, teacher_logits: Tensor | TopKLogits,
            temperature: float = 1.0) -> Tensor:
    """Fused `fastkd.losses.kd_loss`."""
    return RowLossFunction.apply(KD, student_logits, teacher_logits, None, temperature)


def dkd_loss(student_logits: Tensor, teacher_logits: Tensor | TopKLogits, target: Tensor,
             alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0) -> Tensor:
    """Fused `fastkd.losses.dkd_loss`."""
    return RowLossFunction.apply(DKD, student_logits, teacher_logits, target, temperature, alpha,
                                 beta)


def nkd_loss(student_logits: Tensor, teacher_logits: Tensor | TopKLogits, target: Tensor,
             temperature: float = 1.0, gamma: float = 1.5) -> Tensor:
    """Fused `fastkd.losses.nkd_loss`."""
    return RowLossFunction.apply(NKD, student_logits, teacher_logits, target, temperature, gamma)


def ofa_loss(student_logits: Tensor, teacher_logits: Tensor | TopKLogits, target: Tensor,
             eps: float = 1.0, temperature: float = 1.0) -> Tensor:
    """Fused `fastkd.losses.ofa_loss`."""
    return RowLossFunction.apply(OFA, student_logits, teacher_logits, target, temperature, eps)


def feature_mimic_loss(student_map: Tensor, teacher_map: Tensor) -> Tensor:
    """Fused `fastkd.losses.feature_mimic_loss` (the AC term of the "direct" mode)."""
    return FreqTermsFunction.apply(student_map, teacher_map, "direct", False, True)[1]


def freq_decoupled_loss(student_map: Tensor, teacher_map: Tensor, dc_weight: float | Tensor,
                        ac_weight: float | Tensor, dim: str = "spatial") -> Tensor:
    """Fused `fastkd.losses.freq_decoupled_loss`: the kernel returns the unweighted [DC, AC]
    terms and the weights (floats or tensors) are applied here; a Python-0 weight skips its
    term inside the kernel, as eager skips it."""
    if dim not in ("spatial", "channel"):
        raise ValueError(f"dim must be 'spatial' or 'channel', got {dim!r}")
    has_dc, has_ac = not is_zero_weight(dc_weight), not is_zero_weight(ac_weight)
    if not (has_dc or has_ac):
        return student_map.new_zeros((), dtype=torch.float32)
    terms = FreqTermsFunction.apply(student_map, teacher_map, dim, has_dc, has_ac)
    if has_dc and has_ac:
        return dc_weight * terms[0] + ac_weight * terms[1]
    return dc_weight * terms[0] if has_dc else ac_weight * terms[1]


def supports(name: str, x: Tensor) -> bool:
    """Whether the fused kernel `name` takes input `x`; `fastkd.losses` runs eager otherwise.
    The feature kernels hold whole spatial rows in one tile, so H·W is bounded."""
    if name in ("feature_mimic", "freq_decoupled"):
        return x.dim() == 4 and x.shape[-2] * x.shape[-1] <= MAX_POSITIONS
    return True


FUSED: dict[str, Callable[..., Tensor]] = {
    "kd": kd_loss,
    "dkd": dkd_loss,
    "nkd": nkd_loss,
    "ofa": ofa_loss,
    "feature_mimic": feature_mimic_loss,
    "freq_decoupled": freq_decoupled_loss,
}
