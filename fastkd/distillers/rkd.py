"""RKD (Park et al., CVPR 2019, "Relational Knowledge Distillation"), OFAKD's baseline."""
from __future__ import annotations

from dataclasses import dataclass

from fastkd.losses import rkd_loss
from fastkd.models import forward_taps

from . import register
from .base import Distiller, Needs


@dataclass(frozen=True)
class RKDParams:
    distance_weight: float = 25.0   # `--rkd-distance-weight`
    angle_weight: float = 50.0      # `--rkd-angle-weight`
    eps: float = 1e-12              # squared-distance clamp (`--rkd-eps`)
    squared: bool = False           # `--rkd-squared`
    kd_weight: float = 1.0          # `--kd-loss-weight`


@register
class RKD(Distiller):
    """`gt_weight·CE + kd_weight·(w_d·L_dist + w_a·L_angle)` on the pooled (pre-logit) features.

    Formula: Hao840/OFAKD `distillers/rkd.py` `RKD`, `fastkd.losses.rkd_loss` (distances
    normalised by their positive
    mean, triplet angles, Huber; teacher side without gradient). Relations compare B×B and B³
    structures, so student and teacher widths may differ and every pairing works; no trainable
    part besides the student. Defaults are OFAKD's CLI.
    Deviation: none. OFAKD's RKD reads the pooled features directly since commit ce28423
    ("Update rkd.py", `distillers/rkd.py`; before it, it read attributes it never set), as
    PAT's copy does and as this does; the relations are computed in fp32 under autocast.
    """
    name = "rkd"
    paper = "Park et al., Relational Knowledge Distillation, CVPR 2019 (arXiv 1904.05068)"
    needs = Needs(teacher=True, teacher_logits=False, student_pooled=True, teacher_pooled=True,
                  cacheable=True)
    Params = RKDParams

    def forward(self, images, labels, *, epoch=1.0, indices=None):
        p = self.params
        feats = forward_taps(self.student, images, (), with_logits=True)
        teacher_pooled = self.teacher.features(images, (), with_logits=False).pooled
        loss = rkd_loss(feats.pooled, teacher_pooled, distance_weight=p.distance_weight,
                        angle_weight=p.angle_weight, eps=p.eps, squared=p.squared)
        return feats.logits, {**self.gt_term(feats.logits, labels), "loss_kd": p.kd_weight * loss}
