"""BKD (binary KD): OFAKD's baseline that treats each class as an independent binary task."""
from __future__ import annotations

from dataclasses import dataclass

from fastkd.losses import bkd_loss

from . import register
from .base import LogitDistiller


@dataclass(frozen=True)
class BKDParams:
    kd_weight: float = 1.0   # OFAKD `--kd-loss-weight`


@register
class BKD(LogitDistiller):
    """`gt_weight·CE + kd_weight · BCEWithLogits(z_s, softmax(z_t))`, element mean over B×K.

    Formula: Hao840/OFAKD `distillers/kd.py` `BKD`, `fastkd.losses.bkd_loss`; no temperature.
    Defaults OFAKD's.
    Deviation: none.
    """
    name = "bkd"
    paper = "— (binary KD baseline of Hao et al., One-for-All, NeurIPS 2023, Hao840/OFAKD)"
    Params = BKDParams

    def kd_term(self, logits, teacher_logits, labels, epoch):
        return self.params.kd_weight * bkd_loss(logits, teacher_logits)
