"""USKD (Yang et al., ICCV 2023): self-KD with customised soft labels, official cls_KD recipe.

The student teaches itself: a normalised target term with a sharpened target label, a
non-target term whose soft labels follow Zipf's law over a ranking of the classes, and a weak
auxiliary classifier on a middle feature that supplies part of that ranking. No teacher.
USKD's loss is method-specific (it owns a trainable head and ranks classes), so its math lives
here as private functions rather than in `fastkd.losses`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from fastkd.models import num_prefix_tokens, stage_info

from . import register
from .base import Distiller, Needs

_RANK_EPS = 1e-6          # cls_KD's stabiliser in the ranking-score denominators
_WEAK_LABEL_KEEP = 0.9    # weak head target: 0.9·label + 0.1/K (cls_KD, fixed in the code)


@dataclass(frozen=True)
class USKDParams:
    alpha: float = 1.0     # target term weight (cls_KD ImageNet; CIFAR-100 config 0.1)
    beta: float = 0.1      # non-target (Zipf) term weight
    mu: float = 0.005      # weak auxiliary classifier weight (CIFAR-100 config 0.1)
    # True: the ranking score as shipped, whose student part is log σ(z) / (1 − Σ_targets log σ(z));
    # False: the evident intent, probabilities σ(z) / (1 − Σ_targets σ(z)) (cls_KD USKDLoss).
    rank_on_log_probs: bool = True


def _uskd_targets(labels: Tensor) -> tuple[Tensor, Tensor]:
    """(B×n target classes, B×n label values): integer labels → the label, value 1 (n = 1);
    soft (mixup) labels → their top-2 classes and values (n = 2), as cls_KD."""
    if labels.dim() == 2:
        values, classes = labels.float().topk(2, dim=1)
        return classes, values
    classes = labels.long()[:, None]
    return classes, torch.ones_like(classes, dtype=torch.float32)


def _zipf_non_target_labels(scores: Tensor, targets: Tensor) -> Tensor:
    """B×(K − n) Zipf soft labels over the non-target classes, each row summing to 1.

    Classes are sorted by `scores` (descending) over all K classes, targets included; the
    class at 1-based rank r gets `1/r`; the target columns are then removed and the rest
    renormalised (`USKDLoss.forward`). Column order is the class order without targets.
    """
    batch, num_classes = scores.shape
    position = scores.argsort(dim=1, descending=True).argsort(dim=1)   # 0-based rank per class
    zipf = 1.0 / (position + 1).float()
    keep = torch.ones_like(scores, dtype=torch.bool).scatter_(1, targets, False)
    zipf = zipf[keep].view(batch, num_classes - targets.shape[1])
    return zipf / zipf.sum(dim=1, keepdim=True)


def _uskd_losses(logits: Tensor, weak_logits: Tensor, labels: Tensor, *, mu: float,
                 rank_on_log_probs: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(L_target, L_non, L_weak) of cls_KD `USKDLoss` (`mmcls/models/dis_losses/uskd.py`),
    batch means.

    With targets `t` (value `v`), `s = σ(z_s)`, `w = weak_logits`:
      L_target = −(1/B) Σ_b Σ_t sg[p_t] log s_t,  p_t = s_t² + v − mean_batch(s_t²), 0 where v = 0
      L_weak   = −(1/B) Σ_b Σ_k μ q_k log σ(w)_k,  q = 0.9·label + 0.1/K
      score    = σ(w) / (1 − Σ_t σ(w)_t + ε) + ℓ / (1 − Σ_t ℓ_t + ε),  ℓ = log s as shipped
                 (`rank_on_log_probs`) or s (intent); ε = 1e-6; no gradient
      L_non    = −(1/B) Σ_b Σ_{j∉t} ẑ_j log σ(z̃_s)_j, ẑ = `_zipf_non_target_labels(score, t)`,
                 z̃_s the logits without the target columns.
    The batch mean in p_t is over this process's batch (as cls_KD under DDP: no all-gather).
    cls_KD already takes log-softmax wherever it needs a log, so the numerics are its own;
    inputs are upcast to fp32 (the student may run under bf16 autocast).
    """
    logits, weak_logits = logits.float(), weak_logits.float()
    batch, num_classes = logits.shape
    targets, values = _uskd_targets(labels)

    log_p = logits.log_softmax(dim=1)
    log_p_target = log_p.gather(1, targets)
    with torch.no_grad():
        sharpened = log_p_target.exp().pow(2)
        p_target = sharpened + values - sharpened.mean(0, keepdim=True)
        p_target = torch.where(values == 0, 0.0, p_target)
    loss_target = -(p_target * log_p_target).sum(dim=1).mean()

    if labels.dim() == 2:
        weak_label = _WEAK_LABEL_KEEP * labels.float()
    else:
        weak_label = torch.zeros_like(logits).scatter_(1, targets, _WEAK_LABEL_KEEP)
    weak_label = weak_label + (1 - _WEAK_LABEL_KEEP) / num_classes
    log_w = weak_logits.log_softmax(dim=1)
    loss_weak = -(mu * weak_label * log_w).sum(dim=1).mean()

    with torch.no_grad():
        w = log_w.exp()
        student = log_p if rank_on_log_probs else log_p.exp()
        scores = (w / (1 - w.gather(1, targets).sum(1, keepdim=True) + _RANK_EPS)
                  + student / (1 - student.gather(1, targets).sum(1, keepdim=True) + _RANK_EPS))
        zipf = _zipf_non_target_labels(scores, targets)
    keep = torch.ones_like(logits, dtype=torch.bool).scatter_(1, targets, False)
    log_q = logits[keep].view(batch, num_classes - targets.shape[1]).log_softmax(dim=1)
    loss_non = -(zipf * log_q).sum(dim=1).mean()
    return loss_target, loss_non, loss_weak


@register
class USKD(Distiller):
    """`gt_weight·CE + α·L_target + β·L_non + L_weak` (μ inside L_weak), no teacher.

    Formula: yzd-v/cls_KD `mmcls/models/dis_losses/uskd.py` `USKDLoss` (official); defaults
    its ImageNet configs
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
        loss_target, loss_non, loss_weak = _uskd_losses(
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
