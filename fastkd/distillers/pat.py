"""PAT (Lin et al., ICCV 2025, "Perspective-Aware Teaching: Adapting Knowledge for
Heterogeneous Distillation"; arXiv 2501.08885), `jimmylin0979/PAT`."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastkd.losses import hcl_loss, kd_loss
from fastkd.models import STAGES, forward_taps, stage_info
from fastkd.projectors import init_projector_weights
from fastkd.teacher_stages import StageEntries, UnsupportedTeacher

from . import register
from .base import Distiller, Needs, UnsupportedPair


@dataclass(frozen=True)
class PATParams:
    afp_stages: tuple[int, ...] = (1, 2, 3, 4)  # teacher stages prompted (--pat-afp-stage)
    raa_num_queries: int = 64     # tokens over the 4 stages: a 4×4 grid each (--pat-raa-num-queries)
    raa_dim: int = 512            # --pat-raa-dim
    raa_heads: int = 8
    fd_weight: float = 1.0        # HCL feature loss (--pat-mse-loss-weight)
    reg_weight: float = 1.0       # KL(z_t⁰ ‖ z_tᵖ) regulariser (--pat-reg-loss-weight)
    kd_weight: float = 1.0        # --kd-loss-weight
    temperature: float = 1.0      # --kd-temperature


def sinusoidal_encoding(length: int, dim: int) -> Tensor:
    """length×dim fixed encoding: sin on even, cos on odd channels, `pos · 10000^{−2i/dim}`."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    encoding = torch.zeros(length, dim)
    encoding[:, 0::2] = torch.sin(position * frequency)
    encoding[:, 1::2] = torch.cos(position * frequency)
    return encoding


class RegionPatchEmbed(nn.Module):
    """One student stage → B×side²×d: nearest-upsample to side·p when smaller, then a conv with
    kernel = stride = p = ⌈H/side⌉ (timm PatchEmbed without norm; `RAProjector`)."""

    def __init__(self, channels: int, hw: tuple[int, int], side: int, dim: int):
        super().__init__()
        self.patch = tuple(-(-size // side) for size in hw)
        self.size = tuple(side * p for p in self.patch)
        self.proj = nn.Conv2d(channels, dim, kernel_size=self.patch, stride=self.patch)

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="nearest")
        return self.proj(x).flatten(2).transpose(1, 2)


class RegionAwareAttention(nn.Module):
    """RAA (jimmylin0979/PAT `distillers/pat.py` `RAProjector`, `RegionAttention`): every
    student stage → side² tokens, all stages attend jointly.

    Shared `LN`, `W_q`, `W_kv` on the student tokens (teacher features are not used), a fixed
    sinusoidal encoding of each token's position added to q and k, multi-head attention without
    output projection or residual, split back per stage.
    """

    def __init__(self, stage_shapes: list[tuple[int, int, int]], num_queries: int, dim: int,
                 heads: int):
        super().__init__()
        per_stage = num_queries // len(stage_shapes)
        side = math.isqrt(per_stage)
        if side * side != per_stage or dim % heads:
            raise ValueError(f"raa_num_queries / stages must be a square and raa_dim divisible "
                             f"by raa_heads (got {num_queries}, {dim}, {heads})")
        self.heads = heads
        self.embeds = nn.ModuleList(RegionPatchEmbed(c, (h, w), side, dim)
                                    for c, h, w in stage_shapes)
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(dim, 2 * dim)
        self.register_buffer("position", sinusoidal_encoding(per_stage * len(stage_shapes), dim),
                             persistent=False)

    def forward(self, stage_maps: list[Tensor]) -> list[Tensor]:
        tokens = self.norm(torch.cat([embed(x) for embed, x in zip(self.embeds, stage_maps)], dim=1))
        q = self.to_q(tokens) + self.position
        k, v = self.to_kv(tokens).chunk(2, dim=-1)
        k = k + self.position
        out = F.scaled_dot_product_attention(*(self._heads(t) for t in (q, k, v)))
        return list(out.transpose(1, 2).flatten(2).chunk(len(self.embeds), dim=1))

    def _heads(self, t: Tensor) -> Tensor:
        return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)


class GridAligner(nn.Module):
    """side² RAA tokens → a CNN-layout teacher stage C×H×W: side×side grid, nearest-upsample,
    BN, 1×1 conv without bias (`ViT2CNNProjector`)."""

    def __init__(self, dim: int, out_shape: tuple[int, int, int]):
        super().__init__()
        self.out_hw = out_shape[1:]
        self.proj = nn.Sequential(nn.BatchNorm2d(dim), nn.Conv2d(dim, out_shape[0], 1, bias=False))

    def forward(self, tokens: Tensor) -> Tensor:
        side = math.isqrt(tokens.shape[1])
        grid = tokens.transpose(1, 2).unflatten(-1, (side, side))
        return self.proj(F.interpolate(grid, size=self.out_hw, mode="nearest"))


class TokenAligner(nn.Module):
    """side² RAA tokens → a token-layout teacher stage (ViT, Mixer, Swin): BN over the token
    positions, Linear d → C, BN over channels, Linear over positions side² → H·W
    (`ViT2ViTProjector`), read as the teacher's C×H×W grid."""

    def __init__(self, dim: int, tokens: int, out_shape: tuple[int, int, int]):
        super().__init__()
        self.out_shape = out_shape
        self.channels = nn.Sequential(nn.BatchNorm1d(tokens), nn.Linear(dim, out_shape[0]))
        self.positions = nn.Sequential(nn.BatchNorm1d(out_shape[0]),
                                       nn.Linear(tokens, out_shape[1] * out_shape[2]))

    def forward(self, tokens: Tensor) -> Tensor:
        return self.positions(self.channels(tokens).transpose(1, 2)).unflatten(-1, self.out_shape[1:])


class SqueezeExcite(nn.Module):
    """`x · σ(W₂ ReLU(W₁ avgpool(x)))`, reduction 16. PAT's `SEBlock` returns the gate alone
    (`distillers/pat.py` `SEBlock`), which collapses its prompt to a per-channel bias; the gate
    is applied."""

    def __init__(self, channels: int, ratio: int = 16):
        super().__init__()
        hidden = max(1, channels // ratio)
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, hidden, 1), nn.ReLU(),
                                  nn.Conv2d(hidden, channels, 1), nn.Sigmoid())

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gate(x)


class PromptBlock(nn.Module):
    """AFP prompt in front of one teacher stage (PAT `distillers/pat.py` `PromptBlock`,
    Pro-tuning style).

    `x + β·prompt(fuse([x, align(g)]))`: `g` the previous iteration's feedback (aligned student
    minus prompted teacher at this stage's output), aligned to the stage input by nearest
    resize + BN + 1×1 conv when the shapes differ; fusion 1×1 (2C→C) → 5×5 → 1×1 → SE →
    1×1; prompt grouped 1×1 (4 groups) → depthwise 5×5 → 1×1 → SE → grouped 1×1; β starts
    at 0. All convolutions have biases.
    """

    def __init__(self, in_shape: tuple[int, int, int], feedback_shape: tuple[int, int, int]):
        super().__init__()
        channels = in_shape[0]
        groups = math.gcd(4, channels)
        self.feedback_align = nn.Identity()
        if feedback_shape != in_shape:
            self.feedback_align = nn.Sequential(
                nn.Upsample(size=in_shape[1:], mode="nearest"), nn.BatchNorm2d(feedback_shape[0]),
                nn.Conv2d(feedback_shape[0], channels, 1, bias=False))
            init_projector_weights(self.feedback_align)
        self.fusion = nn.Sequential(
            nn.Conv2d(2 * channels, channels, 1), nn.Conv2d(channels, channels, 5, padding=2),
            nn.Conv2d(channels, channels, 1), SqueezeExcite(channels),
            nn.Conv2d(channels, channels, 1))
        self.prompt = nn.Sequential(
            nn.Conv2d(channels, channels, 1, groups=groups),
            nn.Conv2d(channels, channels, 5, padding=2, groups=channels),
            nn.Conv2d(channels, channels, 1), SqueezeExcite(channels),
            nn.Conv2d(channels, channels, 1, groups=groups))
        self.beta = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor, feedback: Tensor) -> Tensor:
        fused = self.fusion(torch.cat([x, self.feedback_align(feedback).to(x.dtype)], dim=1))
        return x + self.beta * self.prompt(fused)


@register
class PAT(Distiller):
    """`gt_w·CE + kd_w·KL_T(z_t⁰‖z_s) + fd_w·Σ_s HCL(F̂_s, T̃_s) + reg_w·KL(z_t⁰‖z_tᵖ)`.

    Lin et al., ICCV 2025; jimmylin0979/PAT `distillers/pat.py` `PAT`. Per step: the student's
    four stage maps go through region-aware attention
    (`RegionAwareAttention`) and per-stage aligners onto the teacher's stage shapes (`F̂_s`). The
    teacher runs twice: plain under no_grad (`z_t⁰`, for KD and the regulariser), and prompted
    with autograd on (`z_tᵖ`, stage outputs `T̃_s`), with a `PromptBlock` rewriting the input of
    each stage in `afp_stages` (`StageEntries.prompted`; teacher weights frozen). The prompts
    read the previous step's feedback `F̂_s − T̃_s` (detached). `L_FD = Σ_s hcl_loss(F̂_s, T̃_s)`
    trains RAA, aligners and student, and the prompts through `T̃_s`; the regulariser
    `kd_loss(z_tᵖ, z_t⁰)` keeps the prompted teacher's predictions. Official term names.

    Where the shipped code is broken, the paper's intent:
    * Prefix (class/distillation) tokens are the first ones (timm), dropped from RAA inputs and
      targets and passed through prompts untouched; PAT drops the *last* token instead.
    * The sinusoidal encoding is indexed by token position (0..63), not by batch position.
    * Prompts return tokens in their layout (PAT's reshape without permuting back scrambles
      channels and positions of every token teacher, even at β = 0).
    * The SE gate multiplies its input (PAT's `SEBlock` returns the bare gate).
    Other deviations:
    * No feedback (first step, a batch of another size than the previous one, after a resume:
      feedback is not checkpointed) means zero feedback through the fusion block, where PAT skips
      the fusion; every parameter then takes part in every step, as DDP requires.
    * Feedback is stored only in training mode.
    * A Swin teacher's prompt sits before its stage's patch merging (timm ≥ 0.9 layout, see
      `StageEntries`), so its feedback aligner resizes; PAT's (timm 0.6) sat after it.
    * Aligners by the teacher's layout: conv aligner for NCHW teachers, token aligner for token
      and Swin teachers (their tokens in PAT's timm); the feedback aligner is always the conv one.

    Pairs: any student with four stage maps; teachers whose stage entries introspection finds
    (ViT, Swin, ConvNeXt, Mixer, ResNet), others raise `UnsupportedPair`. Costs two teacher
    passes per step, one with a graph.
    """
    name = "pat"
    paper = "Lin et al., Perspective-Aware Teaching (PAT), ICCV 2025 (arXiv 2501.08885)"
    needs = Needs(teacher=True, teacher_logits=True, student_stages=STAGES, teacher_stages=STAGES,
                  teacher_graph=True, cacheable=False)
    Params = PATParams

    def __init__(self, student, teacher, params, **kwargs):
        super().__init__(student, teacher, params, **kwargs)
        if not set(params.afp_stages) <= set(STAGES):
            raise ValueError(f"afp_stages must be among {STAGES}, got {params.afp_stages}")
        size = self.probe_size()
        try:
            self.entries = StageEntries(teacher.model, size)
        except UnsupportedTeacher as error:
            raise UnsupportedPair(f"pat: {error}") from None
        s_info, t_info = stage_info(student, size), stage_info(teacher.model, size)
        self.teacher_shapes = {s: (t_info[s].channels, t_info[s].height, t_info[s].width)
                               for s in STAGES}
        self.raa = RegionAwareAttention([(s_info[s].channels, s_info[s].height, s_info[s].width)
                                         for s in STAGES], params.raa_num_queries, params.raa_dim,
                                        params.raa_heads)
        tokens = params.raa_num_queries // len(STAGES)
        self.aligners = nn.ModuleList(
            GridAligner(params.raa_dim, self.teacher_shapes[s]) if self.entries.layout == "nchw"
            else TokenAligner(params.raa_dim, tokens, self.teacher_shapes[s]) for s in STAGES)
        init_projector_weights(self.aligners)
        self.prompts = nn.ModuleDict({str(s): PromptBlock(self.entries.input_shapes[s],
                                                          self.teacher_shapes[s])
                                      for s in sorted(params.afp_stages)})
        # Previous step's F̂_s − T̃_s: a plain attribute, so neither state dict nor checkpoint.
        self.feedback: dict[int, Tensor] = {}

    def _prompted_input(self, stage: int, grid: Tensor) -> Tensor:
        feedback = self.feedback.get(stage)
        if feedback is None or feedback.shape[0] != grid.shape[0]:
            feedback = grid.new_zeros(grid.shape[0], *self.teacher_shapes[stage])
        return self.prompts[str(stage)](grid, feedback)

    def forward(self, images, labels, *, epoch=1.0, indices=None):
        p = self.params
        student = forward_taps(self.student, images, STAGES)
        plain_logits = self.teacher.logits(images)
        transforms = {int(s): (lambda grid, s=int(s): self._prompted_input(s, grid))
                      for s in self.prompts}
        with self.entries.prompted(transforms):
            prompted = self.teacher.features(images, STAGES, graph=True)
        blended = self.raa([student.stages[s] for s in STAGES])
        aligned = {s: aligner(tokens) for s, aligner, tokens in zip(STAGES, self.aligners, blended)}
        if self.training:
            # nan_to_num: a step the engine skips as non-finite must not feed NaN forward
            # (zero feedback is the "no feedback" state)
            self.feedback = {s: torch.nan_to_num((aligned[s] - prompted.stages[s]).detach(),
                                                 nan=0.0, posinf=0.0, neginf=0.0) for s in STAGES}
        feature_loss = sum(hcl_loss(aligned[s], prompted.stages[s]) for s in STAGES)
        return student.logits, {
            **self.gt_term(student.logits, labels),
            "loss_kd": p.kd_weight * kd_loss(student.logits, plain_logits, p.temperature),
            "loss_pat_mse": p.fd_weight * feature_loss,
            "loss_pat_reg": p.reg_weight * kd_loss(prompted.logits, plain_logits),
        }
