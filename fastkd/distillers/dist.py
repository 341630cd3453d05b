"""DIST (Huang et al., NeurIPS 2022, "Knowledge Distillation from A Stronger Teacher"),
as shipped as an OFAKD baseline."""
from __future__ import annotations

from dataclasses import dataclass

from fastkd.losses import dist_loss

from . import register
from .base import Distiller, Needs


@dataclass(frozen=True)
class DISTParams:
    beta: float = 1.0        # inter-class (per-sample) relation weight
    gamma: float = 1.0       # intra-class (per-class, over the batch) relation weight
    tau: float = 1.0         # temperature
    kd_weight: float = 1.0   # OFAKD `--kd-loss-weight`


@register
class DIST(Distiller):
    """`gt_weight·CE + kd_weight · τ² (β·inter + γ·intra)`, Pearson relations of σ(z/τ).

    Formula: methods.md §1.6, `fastkd.losses.dist_loss`; defaults OFAKD's
    (`--dist-beta/--dist-gamma/--dist-tau 1`, `--kd-loss-weight 1`). The intra-class term
    correlates each class over the batch, so the loss depends on the per-process batch (as
    in OFAKD under DDP: no all-gather). Deviation: none.
    """
    name = "dist"
    paper = "Huang et al., Knowledge Distillation from A Stronger Teacher, NeurIPS 2022 " \
            "(arXiv 2205.10536)"
    needs = Needs(teacher=True, teacher_logits=True, cacheable=True)
    Params = DISTParams

    def forward(self, images, labels, *, epoch=1.0, indices=None):
        logits = self.student(images)
        teacher_logits = self.teacher.logits(images)
        p = self.params
        loss = dist_loss(logits, teacher_logits, beta=p.beta, gamma=p.gamma, tau=p.tau)
        return logits, {**self.gt_term(logits, labels), "loss_kd": p.kd_weight * loss}
