"""DIST (Huang et al., NeurIPS 2022, "Knowledge Distillation from A Stronger Teacher"),
as shipped as an OFAKD baseline."""
from __future__ import annotations

from dataclasses import dataclass

from fastkd.losses import dist_loss

from . import register
from .base import LogitDistiller


@dataclass(frozen=True)
class DISTParams:
    beta: float = 1.0        # inter-class (per-sample) relation weight
    gamma: float = 1.0       # intra-class (per-class, over the batch) relation weight
    tau: float = 1.0         # temperature
    kd_weight: float = 1.0   # OFAKD `--kd-loss-weight`


@register
class DIST(LogitDistiller):
    """`gt_weight·CE + kd_weight · τ² (β·inter + γ·intra)`, Pearson relations of σ(z/τ).

    Formula: Hao840/OFAKD `distillers/dist.py` `dist_loss`, `fastkd.losses.dist_loss`; defaults
    OFAKD's
    (`--dist-beta/--dist-gamma/--dist-tau 1`, `--kd-loss-weight 1`). The intra-class term
    correlates each class over the batch, so the loss depends on the per-process batch (as
    in OFAKD under DDP: no all-gather). Deviation: none.
    """
    name = "dist"
    paper = "Huang et al., Knowledge Distillation from A Stronger Teacher, NeurIPS 2022 " \
            "(arXiv 2205.10536)"
    Params = DISTParams

    def kd_term(self, logits, teacher_logits, labels, epoch):
        p = self.params
        return p.kd_weight * dist_loss(logits, teacher_logits, beta=p.beta, gamma=p.gamma, tau=p.tau)
