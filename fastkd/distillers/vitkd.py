"""ViTKD (Yang et al., 2022, "ViTKD: Practical Guidelines for ViT feature knowledge
distillation"), official cls_KD recipe, optionally with NKD on the logits."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
from torch import Tensor

from fastkd.losses import mse_sum_loss, nkd_loss
from fastkd.models import model_family, num_prefix_tokens, stage_info

from . import register
from .base import Distiller, Needs, UnsupportedPair

SHALLOW_BLOCKS = (0, 1)  # `forward_intermediates` indices of the two mimicked blocks


@dataclass(frozen=True)
class ViTKDParams:
    alpha: float = 3e-5        # α_vitkd, shallow mimicking
    beta: float = 3e-6         # β_vitkd, deep generation
    mask_ratio: float = 0.5    # λ_vitkd, share of deep tokens masked
    logit_loss: Literal["nkd", "none"] = "nkd"   # cls_KD's DeiT configs add NKD
    nkd_temperature: float = 1.0   # NKD T of the DeiT configs
    nkd_gamma: float = 1.0         # NKD γ of the DeiT configs


def random_token_mask(batch: int, tokens: int, ratio: float, device) -> Tensor:
    """B×N bool, True = masked: per sample, ⌊N(1 − λ)⌋ random tokens are kept (cls_KD's
    `random_masking`, argsort of uniform noise: the first `keep` of a random order survive)."""
    keep = int(tokens * (1 - ratio))
    rank = torch.rand(batch, tokens, device=device).argsort(dim=1).argsort(dim=1)
    return rank >= keep


def _token_taps(model: nn.Module, images: Tensor) -> tuple[Tensor, list[Tensor], Tensor]:
    """(final normed tokens with prefix, patch tokens after blocks 0 and 1, patch tokens after
    the last block and the final norm), from one `forward_intermediates` pass."""
    final, shallow = model.forward_intermediates(images, indices=list(SHALLOW_BLOCKS),
                                                 output_fmt="NLC", intermediates_only=False)
    return final, shallow, final[:, num_prefix_tokens(model):]


@register
class ViTKD(Distiller):
    """`gt_weight·CE + L_mimic + L_gen (+ NKD)`.

    Formula: yzd-v/cls_KD `mmcls/models/dis_losses/vitkd.py` `ViTKDLoss`, sums by
    `fastkd.losses.mse_sum_loss`:
    `L_mimic = α · Σ (align_i(low_s,i) − low_t,i)² / B` over the patch tokens of the first two
    blocks;
    `L_gen = β/λ · Σ (M ⊙ G(x̃) − M ⊙ high_t)² / B`, x̃ = align(high_s) with a learnable
    zero-initialised mask token at the masked positions (`random_token_mask`), laid out on the
    patch grid, G = Conv3×3 → ReLU → Conv3×3, M = 1 on masked tokens. Aligners are Linear
    (bias) only when the widths differ (cls_KD). With `logit_loss: nkd`, `fastkd.losses.nkd_loss`
    at the DeiT configs' T 1, γ 1 (added with no weight, as cls_KD); soft labels → argmax.
    Taps: not stages 1..4 but the blocks ViTKD names — `forward_intermediates` indices 0 and 1
    and the final normed output, on both models (class tokens never used), so a teacher cache
    cannot serve it. ViT student and teacher only, isotropic, equal patch grids
    (`UnsupportedPair` otherwise).
    Deviation: none in the math; masked positions are filled by `where` instead of cls_KD's
    keep/gather/restore (the same tensor).
    """
    name = "vitkd"
    paper = "Yang et al., ViTKD: Practical Guidelines for ViT feature knowledge distillation, " \
            "2022 (arXiv 2209.02432); NKD: ICCV 2023 (arXiv 2303.13005)"
    needs = Needs(teacher=True, teacher_logits=True, cacheable=False)
    Params = ViTKDParams
    student_families = ("vit",)
    teacher_families = ("vit",)

    def __init__(self, student, teacher, params, **kwargs):
        super().__init__(student, teacher, params, **kwargs)
        self.check_pair(model_family(student), teacher.family)
        if not 0 < params.mask_ratio <= 1:
            raise ValueError(f"vitkd: mask_ratio must be in (0, 1], got {params.mask_ratio}")
        self.needs = Needs(teacher=True, teacher_logits=params.logit_loss == "nkd", cacheable=False)
        size = self.probe_size()
        grid_s, grid_t = self._patch_grid(student, size), self._patch_grid(teacher.model, size)
        if grid_s != grid_t:
            raise UnsupportedPair(f"vitkd compares token by token: student patch grid {grid_s} "
                                  f"and teacher patch grid {grid_t} must agree")
        dim_s, dim_t = student.num_features, teacher.model.num_features
        same = dim_s == dim_t
        self.align_shallow = nn.ModuleList(
            nn.Identity() if same else nn.Linear(dim_s, dim_t) for _ in SHALLOW_BLOCKS)
        self.align_deep = nn.Identity() if same else nn.Linear(dim_s, dim_t)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim_t))
        self.generator = nn.Sequential(nn.Conv2d(dim_t, dim_t, 3, padding=1), nn.ReLU(),
                                       nn.Conv2d(dim_t, dim_t, 3, padding=1))

    @staticmethod
    def _patch_grid(model: nn.Module, size) -> tuple[int, int]:
        infos = stage_info(model, size)
        if len({(i.height, i.width) for i in infos.values()}) != 1:
            raise UnsupportedPair(f"vitkd needs plain (isotropic) ViTs; {type(model).__name__} "
                                  f"is hierarchical")
        return infos[4].height, infos[4].width

    def _teacher_taps(self, images: Tensor, with_logits: bool):
        """(shallow, deep, logits or None) of the teacher."""
        def taps(model, x):
            final, shallow, deep = _token_taps(model, x)
            return shallow, deep, model.forward_head(final).float() if with_logits else None
        return self.teacher.run(taps, images)

    def generate(self, deep: Tensor, grid: tuple[int, int], masked: Tensor) -> Tensor:
        """G(x̃): masked tokens replaced by the mask token, convolved on the patch grid."""
        batch, tokens, dim = deep.shape
        x = torch.where(masked[..., None], self.mask_token.to(deep.dtype), deep)
        x = self.generator(x.transpose(1, 2).reshape(batch, dim, *grid))
        return x.flatten(2).transpose(1, 2)

    def forward(self, images, labels, *, epoch=1.0, indices=None):
        p = self.params
        final_s, shallow_s, deep_s = _token_taps(self.student, images)
        logits = self.student.forward_head(final_s)
        with_nkd = p.logit_loss == "nkd"
        shallow_t, deep_t, teacher_logits = self._teacher_taps(images, with_logits=with_nkd)
        aligned = torch.stack([a(x) for a, x in zip(self.align_shallow, shallow_s)], dim=1)
        loss_mimic = p.alpha * mse_sum_loss(aligned, torch.stack(shallow_t, dim=1))
        deep = self.align_deep(deep_s)
        masked = random_token_mask(deep.shape[0], deep.shape[1], p.mask_ratio, deep.device)
        grid = tuple(self.student.patch_embed.dynamic_feat_size(images.shape[-2:]))
        weight = masked[..., None].to(deep.dtype)
        loss_gen = p.beta / p.mask_ratio * mse_sum_loss(self.generate(deep, grid, masked) * weight,
                                                        deep_t * weight)
        terms = {**self.gt_term(logits, labels), "loss_mimic": loss_mimic, "loss_gen": loss_gen}
        if with_nkd:
            terms["loss_kd"] = nkd_loss(logits, teacher_logits, self.hard_target(labels),
                                        temperature=p.nkd_temperature, gamma=p.nkd_gamma)
        return logits, terms
