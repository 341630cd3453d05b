"""KD (Hinton et al., 2015, "Distilling the Knowledge in a Neural Network"), KL form."""
from __future__ import annotations

from dataclasses import dataclass

from fastkd.losses import kd_loss

from . import register
from .base import LogitDistiller


@dataclass(frozen=True)
class KDParams:
    temperature: float = 1.0   # OFAKD `--kd-temperature` / mdistiller ImageNet T
    kd_weight: float = 1.0     # OFAKD `--kd-loss-weight`


@register
class KD(LogitDistiller):
    """`gt_weight·CE(z_s, y) + kd_weight · T² · (1/B) Σ_b KL(σ(z_t/T) ‖ σ(z_s/T))`.

    Formula: Hinton et al. 2015 in KL form (Hao840/OFAKD `distillers/utils.py` `kd_loss`),
    `fastkd.losses.kd_loss`; defaults are OFAKD's (T = 1, CE and KD weights 1/1, `train.py`).
    The other published weightings are configuration, not code:
    * mdistiller ImageNet: `distill.gt_weight: 0.5`, `kd_weight: 0.5`, T = 1;
      mdistiller CIFAR: `gt_weight: 0.1`, `kd_weight: 0.9`, T = 4.
    * cls_KD α-form (soft-CE, CE scaled by 1 − α): `gt_weight: 1 − α`, `kd_weight: α`. The
      soft-CE value differs from the KL value by the constant `T²·H(σ(z_t/T))`, so gradients
      (and training) are identical; only the logged loss value differs.
    Deviation: none in the math; log-softmax on both sides (the repos already use it).
    Soft (mixup) labels only enter the CE term, KD needs no target.
    """
    name = "kd"
    paper = "Hinton et al., Distilling the Knowledge in a Neural Network, 2015 (arXiv 1503.02531)"
    Params = KDParams

    def kd_term(self, logits, teacher_logits, labels, epoch):
        p = self.params
        return p.kd_weight * kd_loss(logits, teacher_logits, p.temperature)
