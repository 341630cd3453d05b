"""CC (Peng et al., ICCV 2019, "Correlation Congruence for Knowledge Distillation"), OFAKD's
`Correlation` baseline."""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from fastkd.losses import correlation_loss
from fastkd.models import forward_taps
from fastkd.projectors import pooled_dim

from . import register
from .base import Distiller, Needs


@dataclass(frozen=True)
class CCParams:
    feat_dim: int = 128      # embedding width (`--correlation-feat-dim`)
    scale: float = 0.02      # `--correlation-scale`
    kd_weight: float = 1.0   # `--kd-loss-weight`


@register
class CC(Distiller):
    """`gt_weight·CE + kd_weight·scale·mean_b Σ_d δ_{b,d} δ_{b+1,d}`, `δ = |e_s − e_t|`.

    Formula: Hao840/OFAKD `distillers/correlation.py` `Correlation`,
    `fastkd.losses.correlation_loss`; `e_s = Linear(D_s → 128)` of the student's pooled feature
    and `e_t = Linear(D_t → 128)` of the teacher's, both trainable (OFAKD `LinearEmbed`,
    PyTorch default init). Any pairing works (pooled features only).
    Deviation from OFAKD: none. Like OFAKD, this is a simplified form (products of consecutive
    samples' embedding gaps), not the paper's kernel correlation matrices.
    """
    name = "cc"
    paper = "Peng et al., Correlation Congruence for Knowledge Distillation, ICCV 2019 " \
            "(arXiv 1904.01802); OFAKD's `Correlation` form"
    needs = Needs(teacher=True, teacher_logits=False, student_pooled=True, teacher_pooled=True,
                  cacheable=True)
    Params = CCParams

    def __init__(self, student, teacher, params, **kwargs):
        super().__init__(student, teacher, params, **kwargs)
        self.embed_s = nn.Linear(pooled_dim(student), params.feat_dim)
        self.embed_t = nn.Linear(pooled_dim(teacher.model), params.feat_dim)

    def forward(self, images, labels, *, epoch=1.0, indices=None):
        p = self.params
        feats = forward_taps(self.student, images, (), with_logits=True)
        teacher_pooled = self.teacher.features(images, (), with_logits=False).pooled
        loss = correlation_loss(self.embed_s(feats.pooled), self.embed_t(teacher_pooled),
                                scale=p.scale)
        return feats.logits, {**self.gt_term(feats.logits, labels), "loss_kd": p.kd_weight * loss}
