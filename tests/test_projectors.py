"""Shared aligners: which layer each grid ratio gets, output shapes for every family pair,
spatial placement, OFA's building blocks and init."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn
from timm.models.mlp_mixer import MlpMixer
from timm.models.swin_transformer import PatchMerging as TimmPatchMerging

from fastkd.models import forward_taps, stage_info
from fastkd.projectors import (FeatureAligner, PatchMerging, SepConv, aligner_or_identity,
                               common_input_size, grid_side_merges, init_projector_weights,
                               pooled_dim, resample)

IMG = 64


def tiny_model(family: str, *, seed: int = 0) -> nn.Module:
    """The tiny models of tests/distillers/conftest.py (not importable from here)."""
    torch.manual_seed(seed)
    if family == "cnn":
        return timm.create_model("test_resnet", num_classes=10)
    if family == "vit":
        return timm.create_model("test_vit", num_classes=10, img_size=IMG)
    if family == "convnext":
        return timm.create_model("test_convnext", num_classes=10)
    return MlpMixer(num_classes=10, img_size=IMG, patch_size=16, num_blocks=4, embed_dim=64)


@pytest.mark.parametrize("in_size, out_size, layer, kernel", [
    ((8, 8), (8, 8), nn.Conv2d, (1, 1)),            # equal grids: 1×1 conv
    ((16, 16), (4, 4), nn.Conv2d, (4, 4)),          # finer student: patchify (PAT PatchEmbed)
    ((2, 2), (4, 4), nn.ConvTranspose2d, (2, 2)),   # coarser student: unpatchify
    ((8, 4), (2, 2), nn.Conv2d, (4, 2)),            # unequal factors per axis
    ((6, 6), (4, 4), nn.Conv2d, (1, 1)),            # non-integer ratio: resample + 1×1 conv
])
def test_aligner_layer_follows_grid_ratio(in_size, out_size, layer, kernel):
    aligner = FeatureAligner(5, in_size, 7, out_size)
    assert type(aligner.proj) is layer and tuple(aligner.proj.kernel_size) == kernel
    assert aligner.resample_input == (in_size == (6, 6))
    out = aligner(torch.randn(3, 5, *in_size))
    assert out.shape == (3, 7, *out_size)


def test_aligner_resamples_output_to_requested_size():
    aligner = FeatureAligner(4, (8, 8), 6, (4, 4))
    assert aligner(torch.randn(2, 4, 16, 16), (4, 4)).shape == (2, 6, 4, 4)   # 8×8 out → 4×4
    assert aligner(torch.randn(2, 4, 8, 8)).shape == (2, 6, 4, 4)


def test_unpatchify_puts_each_position_in_its_own_block():
    """Token→finer grid: a student position only moves the r×r block it covers (PAT's reshape
    would scatter it row-major)."""
    aligner = FeatureAligner(4, (2, 2), 3, (6, 6), bias=False)
    x = torch.randn(1, 4, 2, 2)
    bumped = x.clone()
    bumped[0, :, 1, 0] += 1.0
    changed = (aligner(bumped) - aligner(x)).abs().sum(dim=1)[0] > 0
    expected = torch.zeros(6, 6, dtype=torch.bool)
    expected[3:6, 0:3] = True
    assert torch.equal(changed, expected)


def test_patchify_reads_only_its_own_window():
    aligner = FeatureAligner(2, (8, 8), 3, (2, 2), bias=False)
    x = torch.randn(1, 2, 8, 8)
    bumped = x.clone()
    bumped[0, :, 5, 2] += 1.0   # row block 1, column block 0
    changed = (aligner(bumped) - aligner(x)).abs().sum(dim=1)[0] > 0
    assert torch.equal(changed, torch.tensor([[False, False], [True, False]]))


@pytest.mark.parametrize("student_family, teacher_family", [
    ("cnn", "cnn"), ("cnn", "vit"), ("vit", "cnn"), ("vit", "vit"), ("vit", "mlp"),
    ("mlp", "vit"), ("convnext", "cnn"),
])
def test_aligners_reach_teacher_stage_shapes(student_family, teacher_family):
    student, teacher = tiny_model(student_family, seed=1), tiny_model(teacher_family, seed=2)
    size = common_input_size(student, teacher)
    info_s, info_t = stage_info(student, size), stage_info(teacher, size)
    images = torch.randn(2, *size)
    with torch.no_grad():
        maps_s = forward_taps(student.eval(), images, (1, 2, 3, 4)).stages
        maps_t = forward_taps(teacher.eval(), images, (1, 2, 3, 4)).stages
    for stage in (1, 2, 3, 4):
        s, t = info_s[stage], info_t[stage]
        aligner = FeatureAligner(s.channels, (s.height, s.width), t.channels, (t.height, t.width))
        assert aligner(maps_s[stage]).shape == maps_t[stage].shape


def test_common_input_size_prefers_a_fixed_size_token_teacher():
    cnn, vit = tiny_model("cnn"), tiny_model("vit")
    assert common_input_size(cnn, vit) == (3, IMG, IMG)            # the ViT's only size
    assert common_input_size(vit, cnn) == (3, IMG, IMG)            # the student's own
    assert common_input_size(cnn, tiny_model("convnext")) == (3, 160, 160)   # test_resnet's


def test_pooled_dim_is_the_pre_logit_width():
    for family in ("cnn", "vit", "mlp", "convnext"):
        model = tiny_model(family).eval()
        with torch.no_grad():
            pooled = forward_taps(model, torch.randn(1, 3, IMG, IMG), ()).pooled
        assert pooled.shape[1] == pooled_dim(model)


def test_aligner_or_identity():
    same = aligner_or_identity((8, 4, 4), (8, 4, 4))
    x = torch.randn(2, 8, 4, 4)
    assert same(x, (4, 4)) is x and not list(same.parameters())
    assert isinstance(aligner_or_identity((8, 4, 4), (16, 4, 4)), FeatureAligner)


def test_patch_merging_matches_timm_swin_layout():
    ours, timm_merge = PatchMerging(6, 12, nn.Identity), TimmPatchMerging(6, 12)
    ours.load_state_dict(timm_merge.state_dict())
    x = torch.randn(2, 4, 6, 6)
    assert torch.allclose(ours(x), timm_merge(x), atol=1e-6)
    assert ours(torch.randn(2, 5, 7, 6)).shape == (2, 3, 4, 12)   # odd sides are padded


def test_sep_conv_halves_and_widens():
    assert SepConv(8, 16)(torch.randn(2, 8, 14, 14)).shape == (2, 16, 7, 7)


def test_grid_side_merges_as_ofakd():
    assert [grid_side_merges(g, g, 7) for g in (56, 28, 14, 7, 4, 24)] == [3, 2, 1, 0, 0, 1]


def test_resample_shrinks_by_area_and_grows_bilinearly():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert torch.allclose(resample(x, (2, 2)), torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]]))
    assert resample(x, (8, 8)).shape == (1, 1, 8, 8)


def test_init_projector_weights_as_ofakd():
    module = nn.Sequential(nn.Conv2d(4, 64, 1), nn.BatchNorm2d(64), nn.Linear(64, 512),
                           nn.ConvTranspose2d(8, 8, 2, stride=2))
    for p in module.parameters():
        nn.init.constant_(p, 3.0)
    init_projector_weights(module)
    conv, norm, linear, up = module
    assert abs(conv.weight.std().item() - (2 / 64) ** 0.5) < 0.05   # fan_out = 64
    assert torch.all(norm.weight == 1) and torch.all(norm.bias == 0)
    # timm's trunc_normal_ cuts at ±2 absolute, so at std 0.02 it is a plain normal (as OFAKD)
    assert abs(linear.weight.std().item() - 0.02) < 0.003 and torch.all(linear.bias == 0)
    assert abs(up.weight.std().item() - 0.02) < 0.01 and torch.all(up.bias == 0)
