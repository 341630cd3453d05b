"""UFD, "Unified Frequency Decoupling Knowledge Distillation for Computer Vision",
`lusilili/UFD-KD` (`UnifiedFreqDecoupleLoss`)."""
from __future__ import annotations

from dataclasses import dataclass

from fastkd.attention_projector import CrossAttentionProjector, default_num_heads, tokens_to_grid
from fastkd.losses import freq_decoupled_loss, soft_ce_kd_loss
from fastkd.models import forward_taps, stage_info
from fastkd.teacher_stages import FinalNorm, UnsupportedTeacher

from . import register
from .base import Distiller, Needs, UnsupportedPair


@dataclass(frozen=True)
class UFDParams:
    # alpha_jfd = [a_dc, a_ac, a_dc_1d, a_ac_1d]: spatial DC, spatial AC, channel DC, channel AC
    weights: tuple[float, float, float, float] = (0.03, 0.065, 0.003, 0.0065)
    num_heads: int | None = None   # CAP heads; None: teacher channels // head_dim
    head_dim: int = 32             # Swin-T (768 channels) config: 24 heads
    softmax_scale: float = 5.0
    use_logit: bool = True         # KD term on/off (the official flag; see the class docstring)
    kd_weight: float = 0.5         # α; the official CE weight 1 − α is distill.gt_weight
    temperature: float = 1.0


@register
class UFD(Distiller):
    """`gt_weight·CE + α·T²·softCE(z_s, z_t) + L_dc_spat + L_ac_spat + L_dc_chan + L_ac_chan`.

    lusilili/UFD-KD `mmcls/models/dis_losses/ufd.py` `UnifiedFreqDecoupleLoss`. Student
    stage 4 only. Two cross-attention projectors (`CrossAttentionProjector`) with learnable
    queries on the teacher's stage-4 grid: the spatial branch's output goes to
    `freq_decoupled_loss(dim="spatial")` (DC = per-channel spatial mean, AC = residual, unit
    channel vectors), the channel branch's to `freq_decoupled_loss(dim="channel")` (DC =
    per-position channel mean, AC = residual, unit spatial maps), both against the teacher's
    final map (last stage + final norm, `FinalNorm`). Each of the four terms is logged apart,
    as the official `loss_dc_spat`, `loss_ac_spat`, `loss_dc_channel`, `loss_ac_channel`.

    `use_logit`: the official KD term needs both `kd=True` and `use_logit=True`. The ImageNet
    config `swin-t_distill_res18_in1k.py` sets `use_logit=False`, which silently drops KD (and
    the CE then keeps weight 1) although it says `kd=True`; here KD is on by default, as the
    config evidently intends. `use_logit: false` with `distill.gt_weight: 1` reproduces it.

    Pairs: any student with a stage-4 map (CNN; ViT/MLP through their token grids), any teacher
    whose final features are a per-position norm of its last stage (Swin, ViT, ConvNeXt, ResNet,
    Mixer); others raise `UnsupportedPair` at construction.

    Deviations from the official code: a term whose weight is 0 is not logged, and a branch
    whose two weights are 0 has no projector (official: built and run, the loss multiplied by
    0, which DDP would reject as an unused parameter); the CAP has no ×2 upsampling and its
    positional map has the student's grid (`pos_hw` = student grid: the latest commit's
    upsampling does not fit its own configs); the projector's queries set the output grid to the
    teacher's, so student and teacher grids may differ.
    """
    name = "ufd"
    paper = "Unified Frequency Decoupling Knowledge Distillation for Computer Vision (lusilili/UFD-KD)"
    # Not cacheable: the target is the teacher's own final norm applied to its stage-4 map
    # (`FinalNorm`), which needs the teacher's weights at every step.
    needs = Needs(teacher=True, teacher_logits=True, student_stages=(4,), teacher_stages=(4,),
                  cacheable=False)
    Params = UFDParams

    def __init__(self, student, teacher, params, **kwargs):
        super().__init__(student, teacher, params, **kwargs)
        size = self.probe_size()
        try:
            self.final_norm = FinalNorm(teacher.model, size)
        except UnsupportedTeacher as error:
            raise UnsupportedPair(f"ufd: {error}") from None
        s, t = stage_info(student, size)[4], stage_info(teacher.model, size)[4]
        self.teacher_grid = (t.height, t.width)
        heads = params.num_heads or default_num_heads(t.channels, params.head_dim)

        def projector(weights: tuple[float, float]) -> CrossAttentionProjector | None:
            # A branch whose DC and AC weights are both 0 gets no projector: built and run for a
            # zero loss, its parameters would get no gradient, which DDP rejects.
            if not any(weights):
                return None
            return CrossAttentionProjector(s.channels, (s.height, s.width), t.channels,
                                           self.teacher_grid, num_heads=heads,
                                           softmax_scale=params.softmax_scale)
        self.spatial_projector = projector(params.weights[:2])
        self.channel_projector = projector(params.weights[2:])

    @property
    def use_kd(self) -> bool:
        return self.params.use_logit and self.params.kd_weight != 0

    def forward(self, images, labels, *, epoch=1.0, indices=None):
        p = self.params
        student = forward_taps(self.student, images, (4,))
        teacher = self.teacher.features(images, (4,), with_logits=self.use_kd)
        target = self.final_norm(teacher.stages[4])
        terms = self.gt_term(student.logits, labels)
        branches = (("spat", "spatial", self.spatial_projector, p.weights[:2]),
                    ("channel", "channel", self.channel_projector, p.weights[2:]))
        for suffix, dim, projector, (dc, ac) in branches:
            if projector is None:
                continue
            grid = tokens_to_grid(projector(student.stages[4]), self.teacher_grid)
            if dc:
                terms[f"loss_dc_{suffix}"] = freq_decoupled_loss(grid, target, dc, 0.0, dim=dim)
            if ac:
                terms[f"loss_ac_{suffix}"] = freq_decoupled_loss(grid, target, 0.0, ac, dim=dim)
        if self.use_kd:
            terms["loss_kd"] = p.kd_weight * soft_ce_kd_loss(student.logits, teacher.logits,
                                                             p.temperature)
        return student.logits, terms
