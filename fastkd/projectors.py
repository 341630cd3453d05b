"""Shared heterogeneous aligners: map a student stage onto a teacher stage's shape.

Every stage tap (`fastkd.models.Features.stages`) is a B×C×H×W map, whatever the family:
ViT/Mixer tokens arrive reshaped to their patch grid with the prefix (class/distillation)
tokens kept apart, Swin tokens arrive as NCHW. So an aligner between a CNN and a token model
is an aligner between two maps, and PAT's heterogeneous FitNet aligners (jimmylin0979/PAT
`distillers/pat.py` `get_projector_module`)
become one rule, chosen by the ratio of the two grids:

* same grid: 1×1 conv (CNN↔CNN, OFAKD's FitNet; Linear on tokens for token↔token);
* student grid r× finer: conv with kernel = stride = r (PAT's `PatchEmbed` for a CNN student
  under a token teacher; its space-to-depth `MyPatchMerging` + Linear for the token cases);
* student grid r× coarser: transposed conv with kernel = stride = r (PAT's Linear(D → r²·C)
  + `Unpatchify`, and its 1×1 conv + space-to-depth of the teacher target);
* any other ratio: resample the student map to the teacher grid, then a 1×1 conv.

Also here: OFA-KD's projector init and building blocks (`SepConv`, `PatchMerging`), and the
probing helpers that give projectors their shapes at construction.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import PatchEmbed, trunc_normal_
from torch import Tensor

from fastkd.models import model_data_config


# ------------------------------------------------------------------------------- probing


def _has_patch_embed(model: nn.Module) -> bool:
    return any(isinstance(m, PatchEmbed) for m in model.modules())


def common_input_size(student: nn.Module, teacher: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) at which projector shapes are probed: the size both models will see.

    The data defaults to the student's input size, so that is the answer, unless only the
    teacher has a patch embedding: a fixed-size token teacher (DeiT under a ResNet student)
    accepts only its own size, so the data must come at that size.
    """
    if _has_patch_embed(teacher) and not _has_patch_embed(student):
        return tuple(model_data_config(teacher)["input_size"])
    return tuple(model_data_config(student)["input_size"])


def pooled_dim(model: nn.Module) -> int:
    """Width of `forward_head(pre_logits=True)`: timm's `head_hidden_size` where the head
    has a hidden layer, else `num_features`."""
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


# ------------------------------------------------------------------------------- init


def init_projector_weights(module: nn.Module) -> None:
    """OFA-KD's init (Hao840/OFAKD `distillers/utils.py` `init_weights`, also PAT's projectors).

    Conv2d: Kaiming-normal, fan_out, ReLU gain; BatchNorm: weight 1, bias 0; Linear:
    truncated normal std 0.02, bias 0; LayerNorm keeps PyTorch's default. Deviation: a
    ConvTranspose2d (our form of PAT's Linear + unpatchify) is initialised as that Linear.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.Linear, nn.ConvTranspose2d)):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


# ------------------------------------------------------------------------------- OFA blocks


class SepConv(nn.Sequential):
    """OFA-KD's down-sampling block (Hao840/OFAKD `distillers/utils.py` `SepConv`), spatial
    size halved.

    depthwise 3×3 stride 2 → 1×1 (c_in→c_in) → BN → ReLU → depthwise 3×3 → 1×1 (c_in→c_out)
    → BN → ReLU; every conv bias-free.
    """

    def __init__(self, in_channels: int, out_channels: int):
        depthwise = dict(kernel_size=3, padding=1, groups=in_channels, bias=False)
        super().__init__(
            nn.Conv2d(in_channels, in_channels, stride=2, **depthwise),
            nn.Conv2d(in_channels, in_channels, 1, bias=False),
            nn.BatchNorm2d(in_channels),
            nn.ReLU(),
            nn.Conv2d(in_channels, in_channels, stride=1, **depthwise),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )


class PatchMerging(nn.Module):
    """Swin-style 2×2 patch merging on B×H×W×C tokens: concatenate each 2×2 neighbourhood
    (4C), LayerNorm(4C), Linear(4C → out, no bias), activation (Hao840/OFAKD
    `distillers/utils.py` `PatchMerging`).

    Deviation: an odd H or W is zero-padded to even first (as timm's Swin does); OFAKD asserts.
    """

    def __init__(self, dim: int, out_dim: int, act_layer: type[nn.Module] = nn.GELU):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)
        self.act = act_layer()

    def forward(self, x: Tensor) -> Tensor:
        _, height, width, _ = x.shape
        x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
        # the four neighbours in Swin's order (0,0), (1,0), (0,1), (1,1) → B×H/2×W/2×4C
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]],
                      dim=-1)
        return self.act(self.reduction(self.norm(x)))


# ------------------------------------------------------------------------------- aligners


def resample(x: Tensor, size: Sequence[int]) -> Tensor:
    """B×C×H×W to `size`: area average when no side grows (keeps every input position's
    contribution), bilinear otherwise."""
    size = tuple(size)
    if tuple(x.shape[-2:]) == size:
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _integer_ratio(big: Sequence[int], small: Sequence[int]) -> tuple[int, int] | None:
    if all(b % s == 0 for b, s in zip(big, small)):
        return big[0] // small[0], big[1] // small[1]
    return None


class FeatureAligner(nn.Module):
    """Student stage map B×C_s×H_s×W_s → the teacher stage's B×C_t×H_t×W_t.

    The layer is chosen from the two grids at construction (module docstring; PAT's
    `get_projector_module`):
    1×1 conv, patchify conv (kernel = stride = H_s/H_t), unpatchify transposed conv (kernel =
    stride = H_t/H_s), or resample + 1×1 conv for a non-integer ratio.
    `forward(x, size)` resamples the output to `size` when it differs (an input size other
    than the probed one), so the loss always compares equal grids.

    Deviations from PAT (identical function class, other parameterisation):
    * maps instead of tokens: PAT's token aligners (Linear, `MyPatchMerging` + Linear,
      `PatchEmbed`, Linear + `Unpatchify`) are the convs above up to a fixed permutation of
      weights, and the MSE is over the same elements; the unpatchify form has one bias per
      output channel instead of one per (sub-position, channel);
    * token student → finer token teacher: PAT reshapes Linear(D_s → D_s·scale) outputs
      row-major into more tokens, which does not put them at their spatial positions; the
      transposed conv does;
    * non-integer grid ratios: PAT asserts; here the student map is resampled first.
    """

    def __init__(self, in_channels: int, in_size: Sequence[int], out_channels: int,
                 out_size: Sequence[int], *, bias: bool = True):
        super().__init__()
        in_size, out_size = tuple(in_size), tuple(out_size)
        self.out_size = out_size
        self.resample_input = False
        down = _integer_ratio(in_size, out_size)
        up = _integer_ratio(out_size, in_size)
        if in_size == out_size:
            self.proj = nn.Conv2d(in_channels, out_channels, 1, bias=bias)
        elif down is not None:
            self.proj = nn.Conv2d(in_channels, out_channels, down, stride=down, bias=bias)
        elif up is not None:
            self.proj = nn.ConvTranspose2d(in_channels, out_channels, up, stride=up, bias=bias)
        else:
            self.resample_input = True
            self.proj = nn.Conv2d(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: Tensor, size: Sequence[int] | None = None) -> Tensor:
        if self.resample_input:
            x = resample(x, self.out_size)
        x = self.proj(x)
        return resample(x, size) if size is not None else x


def aligner_or_identity(in_shape: Sequence[int], out_shape: Sequence[int], *,
                        bias: bool = True) -> nn.Module:
    """Identity when the (C, H, W) shapes already agree (cls_KD's MGD: `align = None`),
    else a `FeatureAligner`."""
    if tuple(in_shape) == tuple(out_shape):
        return _Identity()
    return FeatureAligner(in_shape[0], in_shape[1:], out_shape[0], out_shape[1:], bias=bias)


class _Identity(nn.Module):
    """No parameters: the map itself, resampled to `size` only if an input size other than
    the probed one made the grids differ (as `FeatureAligner.forward`)."""

    def forward(self, x: Tensor, size: Sequence[int] | None = None) -> Tensor:
        return resample(x, size) if size is not None else x


def grid_side_merges(height: int, width: int, target: int) -> int:
    """OFA-KD's number of 2×2 merges that bring a token grid down towards `target`:
    max(⌊log2(side / target)⌋, 0), side = the shorter grid side."""
    return max(int(math.floor(math.log2(min(height, width) / target))), 0)
