"""WSLD (Zhou et al., ICLR 2021, "Rethinking Soft Labels for Knowledge Distillation: A
Bias-Variance Tradeoff Perspective"), cls_KD's unofficial implementation."""
from __future__ import annotations

from dataclasses import dataclass

from fastkd.losses import wsld_loss

from . import register
from .base import LogitDistiller


@dataclass(frozen=True)
class WSLDParams:
    temperature: float = 2.0   # cls_KD ImageNet configs (class default 4, CIFAR 4)
    alpha: float = 2.5         # cls_KD ImageNet configs (class default 2.25, CIFAR 2.25)


@register
class WSLD(LogitDistiller):
    """`gt_weight·CE + α T² (1/B) Σ_b w_b ℓ_soft,b` with sample weights `w` from the CE ratio.

    Formula: yzd-v/cls_KD (master) `mmcls/distillation/losses/wsld.py` `WSLDLoss`,
    `fastkd.losses.wsld_loss`; the CE
    keeps weight 1 there, so `distill.gt_weight` defaults to 1. Defaults: cls_KD ImageNet
    configs (T 2, α 2.5).
    Deviation: cls_KD needs integer labels (`one_hot`); here soft (mixup) labels give the
    weights' target as their argmax, the CE term keeps the soft labels.
    """
    name = "wsld"
    paper = "Zhou et al., Rethinking Soft Labels for Knowledge Distillation: " \
            "A Bias-Variance Tradeoff Perspective, ICLR 2021 (arXiv 2102.00650)"
    Params = WSLDParams

    def kd_term(self, logits, teacher_logits, labels, epoch):
        p = self.params
        return wsld_loss(logits, teacher_logits, self.hard_target(labels),
                         temperature=p.temperature, alpha=p.alpha)
