"""CAKD (Liu et al., ACCV 2022, "Cross-Architecture Knowledge Distillation"),
`yufanLIU/CrossArch_KD`."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor, nn

from fastkd.losses import cakd_gl_loss, cakd_pca_loss
from fastkd.models import forward_taps, num_prefix_tokens, stage_info, stage_module
from fastkd.projectors import pooled_dim
from fastkd.teacher_stages import FinalNorm, UnsupportedTeacher

from . import register
from .base import Distiller, Needs, UnsupportedPair


@dataclass(frozen=True)
class CAKDParams:
    qk_weight: float = 0.2        # L_PCA: MSE of the QKᵀ logits
    vv_weight: float = 0.05       # L_PCA: MSE of the VVᵀ affinities
    logit_weight: float = 1.0     # L_GL: MSE of the logits
    cls_weight: float = 1.0       # L_GL: MSE of cls_proj(pooled student) vs teacher class token
    patch_weight: float = 0.05    # L_GL: MSE of the group-wise projected tokens vs patch tokens
    pca_heads: int = 16           # heads of the student's attention projector
    group_size: int = 4           # GL groups: group_size × group_size blocks of grid positions
    ramp_start_epoch: float = 25.0  # λ(e) = min(max(e − start, 0) / ramp_epochs, max_weight)
    ramp_epochs: float = 50.0
    max_weight: float = 0.2


class AttentionLogitProjector(nn.Module):
    """CAKD's PCA projector: head-averaged pre-softmax `S_qk = QKᵀ/√d_h` and `S_vv = VVᵀ/√d_h`
    of the student tokens (`Linear(C → 3C)`, no bias, `heads × C/heads`). The official module
    also computes an attention output through a `to_out` layer that no loss reads; not built."""

    def __init__(self, channels: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(channels, 3 * channels, bias=False)

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        batch, length, channels = tokens.shape
        head_dim = channels // self.heads
        q, k, v = self.qkv(tokens).view(batch, length, 3, self.heads, head_dim).permute(2, 0, 3, 1, 4)
        scale = head_dim ** -0.5
        return (q @ k.transpose(-2, -1) * scale).mean(1), (v @ v.transpose(-2, -1) * scale).mean(1)


class GroupLinearProjector(nn.Module):
    """CAKD's GL projector: the H×W token grid is cut into blocks of `group_size²` positions
    (edge blocks smaller), each block with its own `Linear(C_s → C_t)`; tokens keep their order.
    Official: 14×14 → 16 groups, 7×7 → 4 groups (exactly these blocks), one shared Linear for
    any other grid; here every grid gets its blocks."""

    def __init__(self, in_channels: int, out_channels: int, hw: tuple[int, int], group_size: int):
        super().__init__()
        rows = torch.arange(hw[0]).repeat_interleave(hw[1]) // group_size
        cols = torch.arange(hw[1]).repeat(hw[0]) // group_size
        group_of_token = rows * (-(-hw[1] // group_size)) + cols
        self.groups = nn.ModuleList(nn.Linear(in_channels, out_channels)
                                    for _ in range(int(group_of_token.max()) + 1))
        # Tokens sorted by group, so each group is one contiguous slice; `restore` undoes it.
        order = torch.argsort(group_of_token, stable=True)
        self.register_buffer("order", order, persistent=False)
        self.register_buffer("restore", torch.argsort(order), persistent=False)
        self.sizes = torch.bincount(group_of_token).tolist()

    def forward(self, tokens: Tensor) -> Tensor:
        chunks = tokens[:, self.order].split(self.sizes, dim=1)
        projected = torch.cat([linear(chunk) for linear, chunk in zip(self.groups, chunks)], dim=1)
        return projected[:, self.restore]


def _last_attention(teacher_model: nn.Module, info) -> nn.Module:
    """The fused-qkv attention module of the teacher's last block (timm `Attention`)."""
    for module in stage_module(teacher_model, info[4]).modules():
        if isinstance(getattr(module, "qkv", None), nn.Linear) and isinstance(
                getattr(module, "num_heads", None), int):
            return module
    raise UnsupportedTeacher(f"{type(teacher_model).__name__}: its last block has no fused-qkv "
                             f"attention module")


@register
class CAKD(Distiller):
    """`CE_ls(z_s, y) + λ(e)·[L_PCA + L_GL]` (Liu et al., ACCV 2022; yufanLIU/CrossArch_KD
    `CAKD/dist_train_cakd.py` `train_one_epoch`; GAN dropped).

    * `L_PCA = 0.2·MSE(S_qk, A_qk) + 0.05·MSE(S_vv, A_vv)`: `S` from the PCA projector on
      the student's stage-3 tokens; `A_qk = (Q/√d_h)Kᵀ` (pre-softmax) and `A_vv = VVᵀ`
      (unscaled, as the official teacher) of the teacher's last block, head-averaged, prefix
      rows/columns removed (the official `[:, 1:, 1:]`).
    * `L_GL = MSE(z_s, z_t) + MSE(cls_proj(h_s), t_cls) + 0.05·MSE(GL(tokens_s), t_patch)`
      (`GLProj` in `cakd_modified_files/resnet.py`): `h_s` the student's pooled features,
      `t_cls` the teacher's pooled pre-logits (its class token after the final norm),
      `t_patch` its final-normed patch tokens. Logit term
      is an MSE, not a KL. MSE = element mean. Teacher tensors carry no gradient.
      (`fastkd.losses.cakd_pca_loss`, `cakd_gl_loss`.)
    * `λ(e) = min(max(e − 25, 0)/50, 0.2)`, `e = epoch − 1` the 0-based epoch
      (`train_one_epoch`: λ(25) = 0, λ(30) = 0.1, λ(35) = 0.2). CE label smoothing 0.1 is
      `data.label_smoothing`.

    The teacher's attention is read by a forward hook on the `qkv` Linear of its last block's
    attention (q, k, v recomputed from its output, timm's `q_norm`/`k_norm` applied), installed
    only for the duration of the teacher forward.

    Pairs: a teacher of the ViT family whose last block has one fused-qkv attention over all
    its tokens (checked on a probe forward; windows smaller than the grid, MLP and CNN teachers
    raise `UnsupportedPair`; relative-position biases, if any, are not part of `A_qk`); any
    student whose stage-3 grid is the teacher's token grid (ResNet-50 at 224: 14×14 =
    ViT-B/16's 196 patches; ViT/Mixer students of patch 16), else `UnsupportedPair`.

    Deviations from the official code:
    * The "multi-view robust training" GAN is dropped: as shipped it is inert (its real branch
      is detached and the student's GAN term is computed on a detached map), and its
      optimiser-ordering bug crashes current PyTorch. The student's gradients are unchanged;
      the logged total lacks its constant terms.
    * λ moves every step (fractional epoch), not once per epoch.
    * GL groups of `group_size²` for every grid (official: only 14×14 and 7×7).
    * Any student architecture; the official code wires ResNet-50 + torchvision ViT-B/16 only.
    """
    name = "cakd"
    paper = "Liu et al., Cross-Architecture Knowledge Distillation, ACCV 2022 (arXiv 2207.05273)"
    needs = Needs(teacher=True, teacher_logits=True, student_stages=(3,), teacher_stages=(4,),
                  student_pooled=True, teacher_pooled=True, cacheable=False)
    Params = CAKDParams
    teacher_families = ("vit",)

    def __init__(self, student, teacher, params, **kwargs):
        super().__init__(student, teacher, params, **kwargs)
        size = self.probe_size()
        s_info, t_info = stage_info(student, size), stage_info(teacher.model, size)
        s3, t4 = s_info[3], t_info[4]
        if (s3.height, s3.width) != (t4.height, t4.width):
            raise UnsupportedPair(f"cakd: the student's stage-3 grid {s3.height}×{s3.width} must "
                                  f"equal the teacher's patch grid {t4.height}×{t4.width}")
        if s3.channels % params.pca_heads:
            raise UnsupportedPair(f"cakd: pca_heads={params.pca_heads} does not divide the "
                                  f"student's {s3.channels} stage-3 channels")
        try:
            # A teacher module: kept out of this module's children (and so its parameters).
            object.__setattr__(self, "attention", _last_attention(teacher.model, t_info))
            self.final_norm = FinalNorm(teacher.model, size)
        except UnsupportedTeacher as error:
            raise UnsupportedPair(f"cakd: {error}") from None
        self.prefix_tokens = num_prefix_tokens(teacher.model)
        self._check_global_attention(teacher.model, size, t4.height * t4.width)
        self.pca_projector = AttentionLogitProjector(s3.channels, params.pca_heads)
        self.gl_projector = GroupLinearProjector(s3.channels, t4.channels, (s3.height, s3.width),
                                                 params.group_size)
        self.cls_projector = nn.Linear(pooled_dim(student), pooled_dim(teacher.model))

    def ramp(self, epoch: float) -> float:
        """λ(e) on the 0-based epoch e = epoch − 1."""
        p = self.params
        return min(max(epoch - 1 - p.ramp_start_epoch, 0.0) / p.ramp_epochs, p.max_weight)

    def teacher_attention(self, qkv: Tensor) -> tuple[Tensor, Tensor]:
        """Head-averaged `(Q/√d)Kᵀ` and `VVᵀ` over patch tokens from the hooked qkv output."""
        attn = self.attention
        batch, length, _ = qkv.shape
        q, k, v = qkv.float().view(batch, length, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        # fp32 targets: under the engine's bf16 autocast these matmuls would run (and the
        # targets come back) in bf16, whatever the `.float()` above; unscaled VVᵀ is large.
        with torch.autocast(qkv.device.type, enabled=False):
            # timm's ViT Attention may normalise q and k per head (qk_norm); others have none.
            q = getattr(attn, "q_norm", nn.Identity())(q)
            k = getattr(attn, "k_norm", nn.Identity())(k)
            qk = (q * q.shape[-1] ** -0.5 @ k.transpose(-2, -1)).mean(1)
            vv = (v @ v.transpose(-2, -1)).mean(1)
        cut = self.prefix_tokens
        return qk[:, cut:, cut:], vv[:, cut:, cut:]

    @contextlib.contextmanager
    def _qkv_recorded(self) -> Iterator[list[Tensor]]:
        # Hooked only while the teacher runs, so the shared teacher keeps no trace of CAKD.
        recorded: list[Tensor] = []
        handle = self.attention.qkv.register_forward_hook(lambda m, args, out: recorded.append(out))
        try:
            yield recorded
        finally:
            handle.remove()

    def _check_global_attention(self, model: nn.Module, size, patch_tokens: int) -> None:
        weight = next(model.parameters())
        with torch.no_grad(), self._qkv_recorded() as recorded:
            model(torch.zeros(1, *size, device=weight.device, dtype=weight.dtype))
        tokens = recorded[-1].shape[:2]
        if tuple(tokens) != (1, self.prefix_tokens + patch_tokens):
            raise UnsupportedPair(f"cakd: the teacher's last attention sees {tuple(tokens)} "
                                  f"(batch, tokens), not one global attention over "
                                  f"{self.prefix_tokens}+{patch_tokens} tokens (windowed?)")

    def forward(self, images, labels, *, epoch=1.0, indices=None):
        p = self.params
        student = forward_taps(self.student, images, (3,))
        with self._qkv_recorded() as recorded:
            teacher = self.teacher.features(images, (4,))
        teacher_qk, teacher_vv = self.teacher_attention(recorded[-1])
        teacher_patches = self.final_norm(teacher.stages[4]).flatten(2).transpose(1, 2).float()
        tokens = student.stages[3].flatten(2).transpose(1, 2)
        student_qk, student_vv = self.pca_projector(tokens)
        pca = cakd_pca_loss(student_qk, teacher_qk, student_vv, teacher_vv, p.qk_weight,
                            p.vv_weight)
        gl = cakd_gl_loss(student.logits, teacher.logits, self.cls_projector(student.pooled),
                          teacher.pooled, self.gl_projector(tokens), teacher_patches,
                          p.logit_weight, p.cls_weight, p.patch_weight)
        ramp = self.ramp(epoch)
        return student.logits, {**self.gt_term(student.logits, labels),
                                "loss_pca": ramp * pca, "loss_gl": ramp * gl}

