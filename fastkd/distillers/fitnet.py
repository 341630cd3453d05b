"""FitNet (Romero et al., ICLR 2015, "FitNets: Hints for Thin Deep Nets"), PAT's heterogeneous
form, with OFAKD's CNN-only FitNet as a special case."""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn
import torch.nn.functional as F

from fastkd.losses import kd_loss
from fastkd.models import forward_taps, model_family, stage_info
from fastkd.projectors import FeatureAligner, init_projector_weights

from . import register
from .base import Distiller, Needs


@dataclass(frozen=True)
class FitNetParams:
    stages: tuple[int, ...] = (1, 2, 3, 4)   # `--fitnet-stages`
    fitnet_weight: float = 1.0               # `--fitnet-loss-weight`
    kd_weight: float = 1.0                   # PAT adds KD; 0 gives OFAKD's FitNet
    temperature: float = 1.0                 # KD temperature (`--kd-temperature`)


@register
class FitNet(Distiller):
    """`gt_weight·CE + fitnet_weight·Σ_s MSE_mean(align_s(f_s^S), f_s^T) + kd_weight·KD_T`.

    Formula: Hao840/OFAKD `distillers/fitnet.py` `FitNet` and PAT's heterogeneous FitNet
    (jimmylin0979/PAT `distillers/pat.py` `get_projector_module`); KD is
    `fastkd.losses.kd_loss` (KL form, T², OFAKD/PAT `kd_loss`). Per stage, a
    `fastkd.projectors.FeatureAligner` maps the student stage map onto the teacher stage map:
    1×1 conv on equal grids, patchify / unpatchify convs on integer grid ratios — PAT's
    patch-embed, unpatchify and patch-merging aligners for every CNN/token pairing, class
    tokens removed (the stage maps hold patch tokens only). Init as OFAKD/PAT.
    OFAKD's FitNet is the special case CNN→CNN with `kd_weight: 0`: a bias-free 1×1 conv per
    stage on equal grids and no KD term (OFAKD asserts CNN-only and equal sizes).
    Deviations from PAT: those of `FeatureAligner` (maps instead of tokens; token→finer-token
    up-sampling puts tokens at their spatial positions; non-integer grid ratios are resampled
    instead of asserted); CNN→CNN stages whose grids differ, which OFAKD and PAT refuse, get
    the same patchify / unpatchify aligners.
    """
    name = "fitnet"
    paper = "Romero et al., FitNets: Hints for Thin Deep Nets, ICLR 2015 (arXiv 1412.6550); " \
            "heterogeneous aligners from Lin et al., PAT, ICCV 2025 (arXiv 2501.08885)"
    needs = Needs(teacher=True, teacher_logits=True, student_stages=(1, 2, 3, 4),
                  teacher_stages=(1, 2, 3, 4), cacheable=True)
    Params = FitNetParams

    @classmethod
    def needs_for(cls, params) -> Needs:
        stages = tuple(params.stages)
        return Needs(teacher=True, teacher_logits=params.kd_weight != 0, student_stages=stages,
                     teacher_stages=stages, cacheable=True)

    def __init__(self, student, teacher, params, **kwargs):
        super().__init__(student, teacher, params, **kwargs)
        stages = tuple(params.stages)
        if not stages or not set(stages) <= {1, 2, 3, 4} or len(set(stages)) != len(stages):
            raise ValueError(f"fitnet: stages must be distinct values among 1..4, got {stages}")
        self.needs = self.needs_for(params)
        size = self.probe_size()
        info_s, info_t = stage_info(student, size), stage_info(teacher.model, size)
        # OFAKD's CNN FitNet conv has no bias; PAT's token aligners (Linear, PatchEmbed) do.
        bias = not (model_family(student) == "cnn" and teacher.family == "cnn")
        self.aligners = nn.ModuleDict({
            str(s): FeatureAligner(info_s[s].channels, (info_s[s].height, info_s[s].width),
                                   info_t[s].channels, (info_t[s].height, info_t[s].width),
                                   bias=bias)
            for s in stages})
        init_projector_weights(self.aligners)

    def forward(self, images, labels, *, epoch=1.0, indices=None):
        p = self.params
        feats = forward_taps(self.student, images, p.stages, with_logits=True)
        teacher = self.teacher.features(images, p.stages, with_logits=p.kd_weight != 0)
        loss_fitnet = 0.0
        for stage in p.stages:
            target = teacher.stages[stage]
            aligned = self.aligners[str(stage)](feats.stages[stage], target.shape[-2:])
            loss_fitnet = loss_fitnet + F.mse_loss(aligned.float(), target.float())
        terms = {**self.gt_term(feats.logits, labels), "loss_fitnet": p.fitnet_weight * loss_fitnet}
        if p.kd_weight:
            terms["loss_kd"] = p.kd_weight * kd_loss(feats.logits, teacher.logits, p.temperature)
        return feats.logits, terms
