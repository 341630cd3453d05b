"""What the eager losses (`fastkd.losses`) and the fused kernels (`fastkd.kernels`) share: the
cached-teacher type and the numeric conventions. Both import it; neither imports the other's
private names."""
from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

LOGIT_CEILING = 1e30  # +inf logits become this: finite, yet exp(x − ceiling) == 0 for the rest


class TopKLogits(NamedTuple):
    """A teacher's logits as the teacher cache stores them (k ≪ K).

    values: B×k top logits (stored dtype); indices: B×k int64 class ids;
    logsumexp: (B,) fp32 log Σ_k exp(z_t,k) of the FULL teacher logits at T = 1.
    """

    values: Tensor
    indices: Tensor
    logsumexp: Tensor


def is_zero_weight(weight: float | Tensor) -> bool:
    """True only for a Python number equal to 0 (a tensor weight is never skipped): a loss term
    with such a weight is not computed at all."""
    return isinstance(weight, (int, float)) and weight == 0
