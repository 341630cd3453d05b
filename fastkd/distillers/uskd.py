"""USKD (Yang et al., ICCV 2023): self-KD with customised soft labels, official cls_KD recipe.

The student teaches itself: a normalised target term with a sharpened target label, a
non-target term whose soft labels follow Zipf's law over a ranking of the classes, and a weak
auxiliary classifier on a middle feature that supplies part of that ranking. No teacher.
The loss terms are `fastkd.losses.uskd_losses`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn
from torch import Tensor

from fastkd.losses import uskd_losses
from fastkd.models import num_prefix_tokens, stage_info

from . import register
from .base import Distiller, Needs


@dataclass(frozen=True)
class USKDParams:
    alpha: float = 1.0     # target term weight (cls_KD ImageNet; CIFAR-100 config 0.1)
    beta: float = 0.1      # non-target (Zipf) term weight
    mu: float = 0.005      # weak auxiliary classifier weight (CIFAR-100 config 0.1)
    # True: the ranking score as shipped, whose student part is log σ(z) / (1 − Σ_targets log σ(z));
    # False: the evident intent, probabilities σ(z) / (1 − Σ_targets σ(z)) (cls_KD USKDLoss).
    rank_on_log_probs: bool = True


@register
class USKD(Distiller):
    """`gt_weight·CE + α·L_target + β·L_non + L_weak` (μ inside L_weak), no teacher.

    Formula: `fastkd.losses.uskd_losses` (cls_KD `USKDLoss`, official); defaults its ImageNet configs
    (α 1, β 0.1, μ 0.005); CIFAR-100: α 0.1, β 0.1, μ 0.1.

    The middle feature fed to the weak head `Linear(C_mid, K)` (PyTorch default init, as cls_KD):
    * hierarchical students (CNN, ConvNeXt, Swin): global average of stage 3 (`stage_info`),
      cls_KD's `fea[-2]` (256 channels for ResNet18);
    * isotropic students with a class token (ViT, DeiT): the class token after block
      ⌊depth/2⌋ (block 6 of 12), cls_KD's `mid_token`, un-normalised. This block is not one of
      fastkd's four isotropic stage taps (blocks 2, 4, 10, 12 of 12), so it is read from one
      `forward_intermediates` call at that block index;
    * isotropic students without a class token (Mixer, ResMLP, avg-pool ViT; not in cls_KD):
      the token average after the same middle block.
    The tap and the logits come from one forward.

    Deviations from cls_KD: the ranking score defaults to the shipped form (`rank_on_log_probs`,
    `USKDLoss.forward`: a log-probability over 1 − Σ target log-probabilities), with the
    intended probability form one flag away; the Zipf vector is built on the logits' device
    (cls_KD hard-codes CUDA); `epoch` and `indices` are unused (no schedule, as cls_KD).
    """
    name = "uskd"
    paper = "Yang et al., From Knowledge Distillation to Self-Knowledge Distillation: " \
            "A Unified Approach with Normalized Loss and Customized Soft Labels, ICCV 2023 " \
            "(arXiv 2303.13005)"
    # Stage 3 for hierarchical students; isotropic ones are tapped at their middle block.
    needs = Needs(teacher=False, teacher_logits=False, student_stages=(3,))
    Params = USKDParams

    def __init__(self, student, teacher, params, *, num_classes, **kwargs):
        super().__init__(student, None, params, num_classes=num_classes, **kwargs)
        self.mid_index, self.reads_class_token, mid_channels = _middle_tap(student)
        self.weak_head = nn.Linear(mid_channels, num_classes)

    def middle_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(B×C_mid middle feature, B×K logits) from one student forward."""
        options = {"return_prefix_tokens": True} if self.reads_class_token else {}
        final, (middle,) = self.student.forward_intermediates(
            images, indices=[self.mid_index], output_fmt="NCHW", intermediates_only=False,
            **options)
        logits = self.student.forward_head(final)
        if self.reads_class_token:
            grid, prefix = middle
            return prefix[:, 0], logits   # timm puts the class token first among the prefix
        return middle.mean(dim=(2, 3)), logits

    def forward(self, images, labels, *, epoch=1.0, indices=None):
        middle, logits = self.middle_and_logits(images)
        p = self.params
        loss_target, loss_non, loss_weak = uskd_losses(
            logits, self.weak_head(middle), labels, mu=p.mu, rank_on_log_probs=p.rank_on_log_probs)
        return logits, {**self.gt_term(logits, labels),
                        "loss_kd": p.alpha * loss_target + p.beta * loss_non,
                        "loss_weak": loss_weak}


def _middle_tap(student: nn.Module) -> tuple[int, bool, int]:
    """(forward_intermediates index, read the class token?, channels) of USKD's middle feature."""
    info = getattr(student, "feature_info", None)
    entries = list(getattr(info, "info", info) or [])
    if not entries:
        raise ValueError(f"uskd: {type(student).__name__} has no feature_info, so its middle "
                         f"feature cannot be found")
    if len({entry["reduction"] for entry in entries}) > 1:     # hierarchical: stage 3
        stage3 = stage_info(student)[3]
        return stage3.index, False, stage3.channels
    index = max(len(entries) // 2 - 1, 0)                    # isotropic: block ⌊depth/2⌋, 1-based
    has_class_token = (getattr(student, "cls_token", None) is not None
                       and num_prefix_tokens(student) > 0)
    return index, has_class_token, entries[index]["num_chs"]
