"""SRRL (Yang et al., ICLR 2021, "Knowledge Distillation via Softmax Regression
Representation Learning"), cls_KD's unofficial recipe."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from fastkd.losses import srrl_losses
from fastkd.models import forward_taps, stage_info
from fastkd.projectors import pooled_dim

from . import register
from .base import Distiller, Needs

STAGE = 4  # the connector reads the student's last stage


@dataclass(frozen=True)
class SRRLParams:
    alpha: float = 1.0   # feature term L_fm (cls_KD default, all configs)
    beta: float = 5.0    # softmax-regression term L_sr (cls_KD default, CIFAR; ImageNet configs: 1)


def teacher_classifier_logits(teacher_model: nn.Module, pre_logits: Tensor) -> Tensor:
    """The teacher's last layer applied to features in its pre-logit space, gradients on.

    timm's `forward_head(x)` is pool → (norm) → classifier on what `forward_features` returns,
    a map for a CNN and tokens for a ViT; `forward_head(x, pre_logits=True)` stops right before
    the classifier, which `get_classifier()` returns. So the classifier maps the pooled space to
    the logits for every family, and that is where the student's aligned pooled feature lives.
    (Feeding `forward_head` that vector spread over a map or token sequence would make the
    pooling an identity but re-apply post-pool norms: ConvNeXt's head LayerNorm, ViT fc_norm.)
    Distilled DeiT has two classifiers, averaged at inference as timm does.
    """
    heads = teacher_model.get_classifier()
    if isinstance(heads, tuple):
        return sum(head(pre_logits) for head in heads) / len(heads)
    return heads(pre_logits)


class Connector(nn.Sequential):
    """Conv1×1 (C_s → D_t, no bias) → BN → ReLU, init N(0, √(2/(k²·C_out))), BN (1, 0) (cls_KD).

    The ReLU is kept only when the teacher's pooled features are non-negative (a ReLU network
    such as ResNet, cls_KD's only case): a ReLU could never match the signed, LayerNorm-ed
    pooled features of ViT, ConvNeXt or Mixer teachers.
    """

    def __init__(self, in_channels: int, out_channels: int, relu: bool):
        super().__init__(nn.Conv2d(in_channels, out_channels, 1, bias=False),
                         nn.BatchNorm2d(out_channels), *([nn.ReLU()] if relu else []))
        conv, norm = self[0], self[1]
        nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / out_channels))  # k = 1
        nn.init.ones_(norm.weight)
        nn.init.zeros_(norm.bias)


@register
class SRRL(Distiller):
    """`gt_weight·CE + α·L_fm + β·L_sr`.

    Formula: yzd-v/cls_KD (master) `mmcls/distillation/losses/srrl.py` `SRRLLoss` and its
    distiller. `S' = Connector(S₄)`
    on the student's last stage map (tokens as their patch grid), `v = GAP(S')`;
    `L_fm = (1/B) Σ_b mean_c (v − f_t)²` against the teacher's pooled (pre-logit) feature `f_t`;
    `z_st` = the frozen teacher's classifier applied to `v`, gradients flowing through it into
    the connector and student (`teacher_classifier_logits`); `L_sr = MSE_mean(z_st, z_t)`.
    Both are torch's element-mean MSE (`fastkd.losses.srrl_losses`). Any student/teacher
    pairing works.
    For a ResNet teacher this is cls_KD exactly: `f_t` is GAP of the teacher's stage 4 and
    cls_KD's `head.fc(pre_logits(neck(S')))` is fc(GAP(S')).
    Deviations: for teachers whose pooled feature is not GAP of the last stage (ViT class token,
    ConvNeXt's post-pool LayerNorm) the student is matched to the pooled feature, the space
    the classifier reads — cls_KD's ViT path has no SRRL; the connector's ReLU is dropped for
    teachers with signed pooled features (`Connector`), decided once on a probe batch.
    The teacher itself runs without a graph; only its classifier is in the graph, so it must be
    live (not served from a cache).
    """
    name = "srrl"
    paper = "Yang et al., Knowledge Distillation via Softmax Regression Representation " \
            "Learning, ICLR 2021; unofficial recipe of yzd-v/cls_KD"
    needs = Needs(teacher=True, teacher_logits=True, student_stages=(STAGE,), teacher_pooled=True,
                  teacher_graph=True, cacheable=False)
    Params = SRRLParams

    def __init__(self, student, teacher, params, **kwargs):
        super().__init__(student, teacher, params, **kwargs)
        size = self.probe_size()
        channels = stage_info(student, size)[STAGE].channels
        self.connector = Connector(channels, pooled_dim(teacher.model),
                                   relu=self._teacher_pooled_nonnegative(size))

    def _teacher_pooled_nonnegative(self, size) -> bool:
        """True when the teacher's pooled features are ≥ 0 on a random probe batch."""
        weight = next(self.teacher.model.parameters())
        probe = torch.randn(2, *size, generator=torch.Generator().manual_seed(0))
        probe = probe.to(weight.device, weight.dtype)
        pooled = self.teacher.features(probe, (), with_logits=False).pooled
        return bool((pooled >= 0).all())

    def forward(self, images, labels, *, epoch=1.0, indices=None):
        p = self.params
        feats = forward_taps(self.student, images, (STAGE,), with_logits=True)
        teacher = self.teacher.features(images, (), with_logits=True)
        aligned = self.connector(feats.stages[STAGE]).mean(dim=(2, 3))
        logits_st = teacher_classifier_logits(self.teacher.model, aligned)
        loss_fm, loss_sr = srrl_losses(aligned, teacher.pooled, logits_st, teacher.logits)
        return feats.logits, {**self.gt_term(feats.logits, labels),
                              "loss_fm": p.alpha * loss_fm, "loss_sr": p.beta * loss_sr}
