"""ScaleKD (Fan et al., NeurIPS 2024, "ScaleKD: Strong Vision Transformers Could Be Excellent
Teachers"), `deep-optimization/ScaleKD`."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastkd.attention_projector import (CrossAttentionProjector, default_num_heads, grid_to_tokens,
                                        tokens_to_grid)
from fastkd.losses import feature_mimic_loss, freq_decoupled_loss, soft_ce_kd_loss
from fastkd.models import forward_taps, stage_info
from fastkd.teacher_stages import TeacherTail, UnsupportedTeacher

from . import register
from .base import Distiller, Needs, UnsupportedPair

VIEWS = ("direct", "alt")
# CAP heads (stage 3, stage 4) of the official configs, keyed by the teacher's stage-3 and
# stage-4 widths: `num_heads` of `loss_fmd_s3` / `loss_fmd_s4` in deep-optimization/ScaleKD
# configs/distillers/traditional_traning_strategy/swin-{s,b,l}_distill_res50_img_s3_s4.py
# (swin-l_distill_mbv1 and advanced_training_strategy/swin-l_distill_res50 agree with swin-l).
# No width rule gives them: 768 channels get 16 heads in Swin-L's stage 3, 6 in Swin-S's stage 4.
OFFICIAL_NUM_HEADS = {
    (384, 768): (3, 6),       # Swin-S
    (512, 1024): (8, 16),     # Swin-B
    (768, 1536): (16, 24),    # Swin-L
}


@dataclass(frozen=True)
class ScaleKDParams:
    # [α_direct, α_alt] per student stage. Defaults: the swin-b/swin-l → res50 configs (every
    # shipped config but swin-s, which uses stage4_weights [0.08, 0.0] and no KD).
    stage3_weights: tuple[float, float] = (0.08, 0.06)
    stage4_weights: tuple[float, float] = (0.08, 0.06)
    # CAP heads at stages 3, 4. None: the official configs' heads for a Swin-S/B/L teacher
    # (`OFFICIAL_NUM_HEADS`), C_t // head_dim for any other teacher
    num_heads: tuple[int, int] | None = None
    head_dim: int = 64                         # the fallback: Swin-B's 512/8 and 1024/16
    softmax_scale: float = 5.0
    kd_weight: float = 0.5                     # α (official CE weight 1 − α: distill.gt_weight)
    temperature: float = 1.0


def default_heads(channels3: int, channels4: int, head_dim: int) -> tuple[int, int]:
    """CAP heads at stages 3 and 4 for a teacher of these widths: the official configs' for
    Swin-S/B/L widths, else `default_num_heads` of each width."""
    official = OFFICIAL_NUM_HEADS.get((channels3, channels4))
    if official is not None:
        return official
    return default_num_heads(channels3, head_dim), default_num_heads(channels4, head_dim)


@register
class ScaleKD(Distiller):
    """`gt_weight·CE + α·T²·softCE(z_s, z_t) + Σ_{stage∈{3,4}} [α_d·L_dir + α_a·L_alt]`.

    deep-optimization/ScaleKD `mmcls/models/dis_losses/fmdv2.py` (`FreqMaskingDistillLossv2`)
    and `mmcls/models/classifiers/distiller.py`. Two cross-attention projectors
    (`CrossAttentionProjector`) per student
    stage, one per view. Stage 3: learnable queries on the teacher's stage-3 grid; each output
    is pushed through the frozen teacher's remaining stage and final norm with autograd on
    (teacher parameter perception, `TeacherTail`) and compared with the teacher's final map
    `T4`. Stage 4: the two teacher-processed stage-3 outputs are the queries of the stage-4
    projectors (nothing detached, so stage-4 losses also train the stage-3 projectors).
    Direct view: `feature_mimic_loss`; alternative view: `freq_decoupled_loss(dc_weight=0)`
    (DCT with the DC removed = mean-removed mimicking). KD: `soft_ce_kd_loss`.
    Total as the official `ori_loss·(1−α) + loss_kd + loss_s3 + loss_s3_alt + loss_s4 +
    loss_s4_alt`, with `distill.gt_weight: 0.5` standing for `1 − α` (the recipes set it).

    Pairs: any student with stage 3/4 maps (CNN, ViT and MLP students: token grids from the
    taps, prefix tokens dropped); teachers whose last stage `TeacherTail` can run (Swin, ViT,
    ConvNeXt, ResNet, Mixer); others raise `UnsupportedPair` at construction.

    Deviations from the official code:
    * The teacher's last stage is found by introspection for any input size (official:
      `forward_specific_stage`, hard-coded per backbone for 224 px). For class-token teachers
      the tail gets the teacher's own stage-3 prefix tokens of the same image in front of the
      projected patch tokens (the official configs have no class-token teacher).
    * The `is_vit=True` extra pass of the stage-4 outputs through the teacher's last block is
      not implemented (every shipped config sets `is_vit=False`).
    * A view whose weights are 0 at both stages gets no projectors, and a stage-4 view with
      weight 0 none at stage 4 (official: built and run, the loss multiplied by 0; with
      swin-s's `[0.08, 0.0]` that is a whole unused projector, which DDP would reject).
    * Both views go through the teacher tail in one concatenated batch (same result, one pass).
    * CAP details as in `fastkd.attention_projector` (pos map sized by the student grid).
    * Default heads: the CNN-student configs' (`OFFICIAL_NUM_HEADS`); the official DeiT-B
      student config (advanced_training_strategy/swin-l_distill_deit-b) sets none and gets
      the module default of 8 (`mmcls/models/dis_losses/fmd.py`, `num_heads=8`): set
      `num_heads: [8, 8]` to reproduce it.
    """
    name = "scalekd"
    paper = ("Fan et al., ScaleKD: Strong Vision Transformers Could Be Excellent Teachers, "
             "NeurIPS 2024 (arXiv 2411.06786)")
    needs = Needs(teacher=True, teacher_logits=True, student_stages=(3, 4), teacher_stages=(3, 4),
                  teacher_graph=True, cacheable=False)
    Params = ScaleKDParams

    def __init__(self, student, teacher, params, **kwargs):
        super().__init__(student, teacher, params, **kwargs)
        size = self.probe_size()
        try:
            self.tail = TeacherTail(teacher.model, size, from_stage=3)
        except UnsupportedTeacher as error:
            raise UnsupportedPair(f"scalekd: {error}") from None
        s_info, t_info = stage_info(student, size), stage_info(teacher.model, size)
        self.grids = {stage: (t_info[stage].height, t_info[stage].width) for stage in (3, 4)}
        heads = params.num_heads or default_heads(t_info[3].channels, t_info[4].channels,
                                                  params.head_dim)
        weights = {3: params.stage3_weights, 4: params.stage4_weights}
        self.weights = {stage: dict(zip(VIEWS, weights[stage])) for stage in (3, 4)}
        # A stage-3 view is needed when either stage uses it (stage 4 takes its queries).
        self.views = [v for v in VIEWS if self.weights[3][v] or self.weights[4][v]]

        def projector(stage: int, learnable_queries: bool) -> CrossAttentionProjector:
            s, t = s_info[stage], t_info[stage]
            return CrossAttentionProjector(s.channels, (s.height, s.width), t.channels,
                                           (t.height, t.width), num_heads=heads[stage - 3],
                                           softmax_scale=params.softmax_scale,
                                           learnable_queries=learnable_queries)
        self.stage3 = nn.ModuleDict({v: projector(3, True) for v in self.views})
        self.stage4 = nn.ModuleDict({v: projector(4, False) for v in self.views
                                     if self.weights[4][v]})

    def view_loss(self, view: str, student_map: Tensor, teacher_map: Tensor, weight: float) -> Tensor:
        """α·L_dir or α·L_alt of one projected map against the teacher's final map."""
        if view == "direct":
            return weight * feature_mimic_loss(student_map, teacher_map)
        return freq_decoupled_loss(student_map, teacher_map, dc_weight=0.0, ac_weight=weight,
                                   dim="spatial")

    def forward(self, images, labels, *, epoch=1.0, indices=None):
        p = self.params
        student = forward_taps(self.student, images, (3, 4))
        teacher = self.teacher.features(images, (3, 4), with_logits=bool(p.kd_weight))
        target = self.tail.final_norm(teacher.stages[4])
        terms = self.gt_term(student.logits, labels)
        if p.kd_weight:
            terms["loss_kd"] = p.kd_weight * soft_ce_kd_loss(student.logits, teacher.logits,
                                                             p.temperature)
        if not self.views:
            return student.logits, terms
        projected = torch.cat([tokens_to_grid(self.stage3[v](student.stages[3]), self.grids[3])
                               for v in self.views])
        prefix = teacher.prefix.get(3)
        if prefix is not None:
            prefix = prefix.repeat(len(self.views), 1, 1)
        perceived = dict(zip(self.views, self.tail(projected, prefix).chunk(len(self.views))))
        for view in self.views:
            suffix = "" if view == "direct" else "_alt"
            if self.weights[3][view]:
                terms[f"loss_s3{suffix}"] = self.view_loss(view, perceived[view], target,
                                                            self.weights[3][view])
            if view in self.stage4:
                tokens = self.stage4[view](student.stages[4], queries=grid_to_tokens(perceived[view]))
                terms[f"loss_s4{suffix}"] = self.view_loss(
                    view, tokens_to_grid(tokens, self.grids[4]), target, self.weights[4][view])
        return student.logits, terms
