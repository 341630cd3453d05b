"""MGD (Yang et al., ECCV 2022, "Masked Generative Distillation"), cls_KD's classification
variant (channel mask)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from fastkd.losses import mse_sum_loss
from fastkd.models import forward_taps, stage_info
from fastkd.projectors import aligner_or_identity

from . import register
from .base import Distiller, Needs

STAGE = 4  # MGD distils the last stage


@dataclass(frozen=True)
class MGDParams:
    alpha: float = 7e-5        # α_mgd (cls_KD default and ImageNet configs)
    mask_ratio: float = 0.15   # λ_mgd: probability that a teacher-width channel is zeroed


def random_channel_mask(batch: int, channels: int, ratio: float, like: Tensor) -> Tensor:
    """B×C×1×1 of {0, 1}: each channel of each sample is 0 with probability `ratio` (cls_KD's
    `where(rand < λ, 0, 1)`; its spatial mask is commented out)."""
    keep = torch.rand(batch, channels, 1, 1, device=like.device) >= ratio
    return keep.to(like.dtype)


@register
class MGD(Distiller):
    """`gt_weight·CE + α · Σ (G(align(S) ⊙ M) − T)² / B` on the last stage.

    Formula: yzd-v/cls_KD (master) `mmcls/distillation/losses/mgd.py` `MGDLoss`; the sum/B
    reduction is
    `fastkd.losses.mse_sum_loss`. `align` is Conv1×1(C_s → C_t, bias) when only the channels
    differ and nothing when the shapes agree (cls_KD); `M` is the random channel mask
    (`random_channel_mask`), drawn afresh each step; the generator `G` is Conv3×3 → ReLU →
    Conv3×3 at the teacher width (biases, PyTorch default init as cls_KD).
    Deviation: cls_KD asserts equal H×W. When the grids differ (a ViT teacher's 14×14 patch grid
    under a ResNet's 7×7 stage 4, or any other pairing) `align` is a
    `fastkd.projectors.FeatureAligner`, which also brings the student map onto the teacher
    grid (patchify / unpatchify conv, or resample + 1×1 conv). Token stages are their patch
    grids (prefix tokens unused), so every CNN/ViT/MLP pairing works.
    """
    name = "mgd"
    paper = "Yang et al., Masked Generative Distillation, ECCV 2022 (arXiv 2205.01529); " \
            "classification variant of yzd-v/cls_KD"
    needs = Needs(teacher=True, teacher_logits=False, student_stages=(STAGE,),
                  teacher_stages=(STAGE,), cacheable=True)
    Params = MGDParams

    def __init__(self, student, teacher, params, **kwargs):
        super().__init__(student, teacher, params, **kwargs)
        size = self.probe_size()
        s, t = stage_info(student, size)[STAGE], stage_info(teacher.model, size)[STAGE]
        self.align = aligner_or_identity((s.channels, s.height, s.width),
                                         (t.channels, t.height, t.width), bias=True)
        self.generator = nn.Sequential(nn.Conv2d(t.channels, t.channels, 3, padding=1), nn.ReLU(),
                                       nn.Conv2d(t.channels, t.channels, 3, padding=1))

    def forward(self, images, labels, *, epoch=1.0, indices=None):
        feats = forward_taps(self.student, images, (STAGE,), with_logits=True)
        target = self.teacher.features(images, (STAGE,), with_logits=False).stages[STAGE]
        aligned = self.align(feats.stages[STAGE], target.shape[-2:])
        batch, channels = aligned.shape[:2]
        mask = random_channel_mask(batch, channels, self.params.mask_ratio, aligned)
        generated = self.generator(aligned * mask)
        return feats.logits, {**self.gt_term(feats.logits, labels),
                              "loss_mgd": self.params.alpha * mse_sum_loss(generated, target)}
