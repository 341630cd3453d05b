"""ScaleKD's cross-attention projector (CAP), shared by ScaleKD and UFD.

A CAP turns a student feature map into tokens laid out like a teacher feature: queries on the
teacher's grid (learnable, or passed in) attend over the student's map. Formula: ScaleKD's
`AttentionProjector` (deep-optimization/ScaleKD `mmcls/models/dis_losses/fmd.py`, `fmdv2.py`)
+ `WindowMultiheadPosAttention` (`attention.py`) with `window_shapes=(1,1)`:

    X' = ReLU(BN(Conv3×3(X))) + P                  keys/values, B×(H_s·W_s)×C_s
    Q0 = ReLU(Conv1×1(queries))                    B×(H_q·W_q)×C_t
    A  = Proj(softmax(q kᵀ · (C_t/h)^{-1/2} · softmax_scale) · v),
         q = W_q Q0, k = W_k X', v = W_v X'        h heads, biases on
    Y  = LN(A);   output = Y + MLP(Y)              mmcv FFN: Linear C_t→4C_t, ReLU, Linear back

Deviations from the official code:
* The positional map `P` is sized by the student grid and the queries by `query_hw` (ScaleKD's
  `fmd.py` and UFD's CAP before lusilili/UFD-KD commit `42e5c86`). `fmdv2.py` sizes both by
  `query_hw`,
  which is the same whenever the student grid equals the query grid, the only case it allows.
  UFD's latest ×2 bilinear upsampling of the student map is not applied (lusilili/UFD-KD
  `mmcls/models/dis_losses/ufd.py`: its own ImageNet config's grids do not fit it).
* The windowed attention branch (`window_shapes ≠ (1,1)`) is not implemented: every shipped
  config uses global attention.
* No learnable query table is built when the caller always passes queries (ScaleKD's stage-4
  CAPs): the official code creates an unused `nn.Embedding` there when `self_query=True`.
* Attention runs through `F.scaled_dot_product_attention` (same math, fused kernels on GPU).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import Tensor, nn


def default_num_heads(channels: int, head_dim: int) -> int:
    """`channels // head_dim` heads, lowered to the nearest count that divides `channels`
    (at least 1), so that tiny test models get a valid head split."""
    heads = max(1, channels // head_dim)
    while channels % heads:
        heads -= 1
    return heads


class CrossAttentionProjector(nn.Module):
    """Student map B×C_s×H_s×W_s → B×(H_q·W_q)×C_t tokens in raster order (see module doc).

    `learnable_queries=False` means the caller passes `queries` (B×H_q·W_q×C_t) on every call,
    as ScaleKD's stage-4 CAPs do with the teacher-processed stage-3 outputs.
    """

    def __init__(self, student_channels: int, student_hw: tuple[int, int], teacher_channels: int,
                 query_hw: tuple[int, int], *, num_heads: int, softmax_scale: float = 5.0,
                 learnable_queries: bool = True, mlp_ratio: int = 4):
        super().__init__()
        if teacher_channels % num_heads:
            raise ValueError(f"{num_heads} heads do not divide {teacher_channels} channels")
        self.query_hw = tuple(query_hw)
        self.teacher_channels = teacher_channels
        self.num_heads = num_heads
        self.softmax_scale = softmax_scale
        self.student_conv = nn.Sequential(
            nn.Conv2d(student_channels, student_channels, 3, padding=1),
            nn.BatchNorm2d(student_channels), nn.ReLU())
        self.pos_embed = nn.Parameter(torch.zeros(1, student_channels, *student_hw))
        trunc_normal_(self.pos_embed, std=0.02)
        # nn.Embedding's default N(0, 1) init, as in the official code.
        self.query_embed = (nn.Embedding(query_hw[0] * query_hw[1], teacher_channels)
                            if learnable_queries else None)
        self.query_conv = nn.Sequential(nn.Conv2d(teacher_channels, teacher_channels, 1), nn.ReLU())
        self.q = nn.Linear(teacher_channels, teacher_channels)
        self.k = nn.Linear(student_channels, teacher_channels)
        self.v = nn.Linear(student_channels, teacher_channels)
        self.proj = nn.Linear(teacher_channels, teacher_channels)
        self.norm = nn.LayerNorm(teacher_channels)
        self.mlp = nn.Sequential(nn.Linear(teacher_channels, mlp_ratio * teacher_channels), nn.ReLU(),
                                 nn.Linear(mlp_ratio * teacher_channels, teacher_channels))

    def forward(self, student_map: Tensor, queries: Tensor | None = None) -> Tensor:
        batch = student_map.shape[0]
        height, width = self.query_hw
        if student_map.shape[-2:] != self.pos_embed.shape[-2:]:
            raise ValueError(f"projector built for a {tuple(self.pos_embed.shape[-2:])} student grid "
                             f"got {tuple(student_map.shape[-2:])}: build the distiller with the "
                             f"training input size")
        if queries is None:
            if self.query_embed is None:
                raise ValueError("this projector has no learnable queries: pass `queries`")
            queries = self.query_embed.weight.unsqueeze(0).expand(batch, -1, -1)
        if queries.shape[1] != height * width:
            raise ValueError(f"expected {height}×{width} queries, got {queries.shape[1]}")
        # The 1×1 conv on the query grid is a per-token linear map; run in 2-D as the original.
        query_grid = queries.transpose(1, 2).reshape(batch, self.teacher_channels, height, width)
        query_tokens = self.query_conv(query_grid).flatten(2).transpose(1, 2)
        keys = (self.student_conv(student_map) + self.pos_embed).flatten(2).transpose(1, 2)
        attended = F.scaled_dot_product_attention(
            self._heads(self.q(query_tokens)), self._heads(self.k(keys)), self._heads(self.v(keys)),
            scale=self.softmax_scale * (self.teacher_channels // self.num_heads) ** -0.5)
        attended = self.proj(attended.transpose(1, 2).flatten(2))
        normed = self.norm(attended)
        return normed + self.mlp(normed)

    def _heads(self, tokens: Tensor) -> Tensor:
        batch, length, channels = tokens.shape
        return tokens.view(batch, length, self.num_heads, channels // self.num_heads).transpose(1, 2)


def tokens_to_grid(tokens: Tensor, hw: tuple[int, int]) -> Tensor:
    """B×(H·W)×C raster-order tokens → B×C×H×W (the official `permute(0,2,1).view(T.shape)`)."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *hw)


def grid_to_tokens(grid: Tensor) -> Tensor:
    """B×C×H×W → B×(H·W)×C raster-order tokens."""
    return grid.flatten(2).transpose(1, 2)
