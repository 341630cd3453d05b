"""OFA-KD (Hao et al., NeurIPS 2023, "One-for-All: Bridge the Gap Between Heterogeneous
Architectures in Knowledge Distillation"), OFAKD's recipe."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block
from torch import Tensor

from fastkd.losses import ofa_loss
from fastkd.models import forward_taps, model_family, num_prefix_tokens, stage_info
from fastkd.projectors import (PatchMerging, SepConv, grid_side_merges,
                               init_projector_weights, pooled_dim)

from . import register
from .base import Distiller, Needs

# OFAKD merges token grids down to 7×7 (`final_patch_grid`), the grid of a 224-px stage 4.
TOKEN_GRID = 7
BRANCH_HEADS = 4  # attention heads of the branch ViT blocks (OFAKD)


@dataclass(frozen=True)
class OFAParams:
    stages: tuple[int, ...] = (1, 2, 3, 4)   # `--ofa-stage`
    eps: tuple[float, ...] = (1.0,)          # one value for all, or one per stage + final logits
    temperature: float = 1.0                 # `--ofa-temperature`
    kd_weight: float = 1.0                   # final-logit OFA term (`--kd-loss-weight`)
    ofa_weight: float = 1.0                  # sum of the stage-branch terms (`--ofa-loss-weight`)


class CnnBranch(nn.Sequential):
    """Stage s < 4: 4 − s `SepConv`s (channels doubling, the last one to `width`); stage 4:
    1×1 conv (bias) to `width`; then global average pool and Linear(width, K) (Hao840/OFAKD
    `distillers/ofa.py` `OFA.__init__`)."""

    def __init__(self, stage: int, channels: int, width: int, num_classes: int):
        if stage < 4:
            blocks, c_in = [], channels
            for i in range(4 - stage):
                c_out = width if i == 3 - stage else 2 * c_in
                blocks.append(SepConv(c_in, c_out))
                c_in *= 2
        else:
            blocks = [nn.Conv2d(channels, width, 1)]
        super().__init__(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, num_classes))

    def forward(self, stage_map: Tensor, prefix: Tensor | None = None) -> Tensor:
        return super().forward(stage_map)   # CNN students have no prefix tokens


class TokenBranch(nn.Module):
    """Token students (ViT, Swin, Mixer, ResMLP): 2×2 patch merges of the patch tokens down
    towards a 7×7 grid (first merge E → D_s, GELU except after the last merge of a chain longer
    than one), max(4 − s, 1) ViT blocks of width D_s with 4 heads, readout of the prefix
    (class) tokens — or the token mean when there are none — and Linear to K (`OFA.__init__`).

    The prefix tokens are split off before merging, re-attached in front of the merged patch
    tokens, and read out after the blocks: the evident intent of OFAKD, whose
    `num_tokens` lookup finds 0 on timm ≥ 0.6 ViTs so that the shipped code never does it.
    Deviations (only for shapes OFAKD's models never produce): with no merge and E ≠ D_s the
    patch tokens get a Linear(E → D_s) instead of the merge's projection; prefix tokens of a
    width E ≠ D_s get a Linear(E → D_s) (OFAKD's concatenation would fail); P > 1 prefix tokens
    are read out flattened into Linear(P·D_s, K) (OFAKD's Linear(D_s, K) assumes P ≤ 1).
    """

    def __init__(self, stage: int, channels: int, grid: tuple[int, int], num_prefix: int,
                 width: int, num_classes: int):
        super().__init__()
        merges = grid_side_merges(*grid, TOKEN_GRID)
        layers = []
        for i in range(merges):
            last_of_chain = merges > 1 and i == merges - 1
            layers.append(PatchMerging(channels if i == 0 else width, width,
                                       nn.Identity if last_of_chain else nn.GELU))
        if not layers and channels != width:
            layers.append(nn.Linear(channels, width))
        self.merge = nn.Sequential(*layers)
        self.num_prefix = num_prefix
        project_prefix = num_prefix and channels != width
        self.prefix_proj = nn.Linear(channels, width) if project_prefix else nn.Identity()
        self.blocks = nn.Sequential(*[
            Block(width, num_heads=BRANCH_HEADS, mlp_ratio=4.0, qkv_bias=False)
            for _ in range(max(4 - stage, 1))])
        self.head = nn.Linear(width * max(num_prefix, 1), num_classes)

    def forward(self, stage_map: Tensor, prefix: Tensor | None = None) -> Tensor:
        tokens = self.merge(stage_map.permute(0, 2, 3, 1)).flatten(1, 2)  # B×L×D_s patch tokens
        if self.num_prefix:
            if prefix is None:
                raise ValueError("ofa: this student has prefix (class) tokens but its stage taps "
                                 "came without them (timm's return_prefix_tokens unsupported)")
            tokens = torch.cat([self.prefix_proj(prefix), tokens], dim=1)
        tokens = self.blocks(tokens)
        readout = tokens[:, :self.num_prefix].flatten(1) if self.num_prefix else tokens.mean(dim=1)
        return self.head(readout)


def broadcast_eps(eps: tuple[float, ...], num_stages: int) -> tuple[float, ...]:
    """OFAKD's `--ofa-eps` rule: one value → every stage and the final logits; otherwise
    exactly one per stage plus one (last) for the final logits."""
    if len(eps) == 1:
        return tuple(eps) * (num_stages + 1)
    if len(eps) != num_stages + 1:
        raise ValueError(f"ofa: eps must hold 1 value or len(stages) + 1 = {num_stages + 1} "
                         f"values (one per stage, then the final logits), got {len(eps)}")
    return tuple(eps)


@register
class OFA(Distiller):
    """`gt_weight·CE + kd_weight·L_OFA(z_s; ε_last) + ofa_weight·Σ_s L_OFA(branch_s(f_s); ε_s)`.

    Formula: Hao840/OFAKD `distillers/ofa.py` (`ofa_loss`, `OFA.forward`),
    `fastkd.losses.ofa_loss` (adaptive target enhancement, no T², log-softmax). Each student
    stage gets a branch that turns its features into K logits (`OFA.__init__`: `CnnBranch`
    for CNN students, `TokenBranch` for token students), width
    D* = max(D_s, D_t) for CNN branches and D_s for token branches (D = pre-logit width), init
    as OFAKD. Only the teacher's logits are used, so every student/teacher pairing works and a
    teacher cache can serve it. ε: `broadcast_eps`. Soft (mixup) labels: the OFA target is their
    argmax (as `OFA.forward`), CE keeps the soft labels. Defaults: OFAKD's CLI (ε 1, T 1,
    weights 1); its README uses ε 1.5 for ImageNet DeiT-T → ResNet18.
    Deviations: the class-token handling and shapes of `TokenBranch`; `PatchMerging` pads odd
    grids. Stage taps are fastkd's (`fastkd.models.stage_info`, found by introspection).
    """
    name = "ofa"
    paper = "Hao et al., One-for-All: Bridge the Gap Between Heterogeneous Architectures in " \
            "Knowledge Distillation, NeurIPS 2023 (arXiv 2310.19444)"
    needs = Needs(teacher=True, teacher_logits=True, student_stages=(1, 2, 3, 4), cacheable=True)
    Params = OFAParams

    def __init__(self, student, teacher, params, **kwargs):
        super().__init__(student, teacher, params, **kwargs)
        if not set(params.stages) <= {1, 2, 3, 4} or len(set(params.stages)) != len(params.stages):
            raise ValueError(f"ofa: stages must be distinct values among 1..4, got {params.stages}")
        self.eps = broadcast_eps(params.eps, len(params.stages))
        # Per instance: the tapped stages are a parameter.
        self.needs = Needs(teacher=True, teacher_logits=True, student_stages=tuple(params.stages),
                           cacheable=True)
        infos = stage_info(student, self.probe_size())
        token_student = model_family(student) != "cnn"
        width_s, width_t = pooled_dim(student), pooled_dim(teacher.model)
        self.branches = nn.ModuleDict()
        for stage in params.stages:
            info = infos[stage]
            if token_student:
                branch = TokenBranch(stage, info.channels, (info.height, info.width),
                                     num_prefix_tokens(student), width_s, self.num_classes)
            else:
                branch = CnnBranch(stage, info.channels, max(width_s, width_t), self.num_classes)
            self.branches[str(stage)] = branch
        init_projector_weights(self.branches)

    def branch_logits(self, stages: dict[int, Tensor],
                      prefix: dict[int, Tensor]) -> dict[int, Tensor]:
        """K logits from each tapped stage through its branch."""
        return {stage: self.branches[str(stage)](stages[stage], prefix.get(stage))
                for stage in self.params.stages}

    def forward(self, images, labels, *, epoch=1.0, indices=None):
        p = self.params
        feats = forward_taps(self.student, images, p.stages, with_logits=True)
        teacher_logits = self.teacher.logits(images)
        target = self.hard_target(labels)
        branch = self.branch_logits(feats.stages, feats.prefix)
        loss_kd = ofa_loss(feats.logits, teacher_logits, target, self.eps[-1], p.temperature)
        terms = {**self.gt_term(feats.logits, labels), "loss_kd": p.kd_weight * loss_kd}
        if p.stages:  # with no stage, OFA is its logit term alone
            terms["loss_ofa"] = p.ofa_weight * sum(
                ofa_loss(branch[stage], teacher_logits, target, eps, p.temperature)
                for stage, eps in zip(p.stages, self.eps))
        return feats.logits, terms
