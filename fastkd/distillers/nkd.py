"""NKD (Yang et al., ICCV 2023, "From Knowledge Distillation to Self-Knowledge Distillation"),
official cls_KD recipe."""
from __future__ import annotations

from dataclasses import dataclass

from fastkd.losses import nkd_loss

from . import register
from .base import LogitDistiller


@dataclass(frozen=True)
class NKDParams:
    temperature: float = 1.0   # non-target temperature (cls_KD ImageNet CNN configs)
    gamma: float = 1.5         # non-target weight (ImageNet CNN; DeiT pairs use 1.0)


@register
class NKD(LogitDistiller):
    """`gt_weight·CE + L_target + L_non` (NKD carries no extra weight; γ is inside L_non).

    Formula: yzd-v/cls_KD `mmcls/models/dis_losses/nkd.py` `NKDLoss`, `fastkd.losses.nkd_loss`.
    Defaults: cls_KD ImageNet CNN configs
    (T 1, γ 1.5); DeiT pairs use γ 1.0, CIFAR-100 R34→R18 T 3, γ 3.5.
    Soft (mixup) labels: the NKD target is their argmax (as cls_KD), CE keeps the soft labels.
    Deviation: none beyond `nkd_loss`'s (exact target exclusion instead of `−1000` masking,
    log-softmax instead of `log(softmax)`).
    """
    name = "nkd"
    paper = "Yang et al., From Knowledge Distillation to Self-Knowledge Distillation: " \
            "A Unified Approach with Normalized Loss and Customized Soft Labels, ICCV 2023 " \
            "(arXiv 2303.13005)"
    Params = NKDParams

    def kd_term(self, logits, teacher_logits, labels, epoch):
        p = self.params
        return nkd_loss(logits, teacher_logits, self.hard_target(labels),
                        temperature=p.temperature, gamma=p.gamma)
