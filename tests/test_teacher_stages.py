"""Running parts of a frozen teacher by introspection: the last stage applied to a stage-3
map reproduces the teacher (Swin, ViT, ConvNeXt, ResNet, Mixer), the final norm, layouts, and
prompts rewriting stage inputs without disturbing token order."""
from __future__ import annotations

import pytest
import timm
import torch
from timm.models.mlp_mixer import MlpMixer

from fastkd.models import forward_taps, stage_info
from fastkd.teacher_stages import (FinalNorm, StageEntries, TeacherTail, UnsupportedTeacher,
                                   grid_to_raw, raw_to_grid, stage_layout)

SIZE = (3, 64, 64)


def tiny_teacher(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "swin":
        model = timm.create_model("swin_tiny_patch4_window7_224", embed_dim=16, depths=(1, 1, 1, 1),
                                  num_heads=(1, 2, 2, 4), window_size=2, img_size=64, num_classes=10)
    elif family == "vit":
        model = timm.create_model("test_vit", img_size=64, num_classes=10)
    elif family == "convnext":
        model = timm.create_model("test_convnext", num_classes=10)
    elif family == "resnet":
        model = timm.create_model("test_resnet", num_classes=10)
    elif family == "mixer":
        model = MlpMixer(num_classes=10, img_size=64, patch_size=16, num_blocks=4, embed_dim=64)
    return model.eval().requires_grad_(False)


def final_features_nchw(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """`model.forward_features` in NCHW, written out per layout (independent of `raw_to_grid`)."""
    out = model.forward_features(images)
    info = stage_info(model, SIZE)[4]
    if out.dim() == 3:  # ViT/Mixer tokens, prefix first
        patches = out[:, out.shape[1] - info.height * info.width:]
        return patches.transpose(1, 2).reshape(out.shape[0], -1, info.height, info.width)
    if out.shape[1] != info.channels:  # Swin: NHWC
        return out.permute(0, 3, 1, 2)
    return out


FAMILIES = ("swin", "vit", "convnext", "resnet", "mixer")


@pytest.mark.parametrize("family", FAMILIES)
def test_tail_on_own_stage3_output_reproduces_the_final_features(family):
    model = tiny_teacher(family)
    tail = TeacherTail(model, SIZE)
    images = torch.randn(2, *SIZE)
    with torch.no_grad():
        features = forward_taps(model, images, (3,))
        reproduced = tail(features.stages[3], features.prefix.get(3))
        expected = final_features_nchw(model, images)
    torch.testing.assert_close(reproduced, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ("swin", "vit"))
def test_tail_passes_gradients_to_its_input_only(family):
    model = tiny_teacher(family)
    tail = TeacherTail(model, SIZE)
    info = stage_info(model, SIZE)[3]
    grid = torch.randn(2, info.channels, info.height, info.width, requires_grad=True)
    prefix = torch.randn(2, tail.prefix_tokens, info.channels) if tail.prefix_tokens else None
    tail(grid, prefix).square().sum().backward()
    assert grid.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_tail_needs_the_prefix_of_class_token_teachers():
    tail = TeacherTail(tiny_teacher("vit"), SIZE)
    with pytest.raises(ValueError, match="prefix"):
        tail(torch.randn(2, 64, 4, 4))


@pytest.mark.parametrize("family", FAMILIES)
def test_final_norm_of_stage4_tap_is_the_final_features(family):
    model = tiny_teacher(family)
    images = torch.randn(2, *SIZE)
    with torch.no_grad():
        stage4 = forward_taps(model, images, (4,)).stages[4]
        torch.testing.assert_close(FinalNorm(model, SIZE)(stage4), final_features_nchw(model, images),
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family,layout", [("swin", "nhwc"), ("vit", "tokens"), ("mixer", "tokens"),
                                           ("convnext", "nchw"), ("resnet", "nchw")])
def test_layouts(family, layout):
    assert stage_layout(tiny_teacher(family), SIZE) == layout


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "tokens"])
def test_raw_grid_round_trip(layout):
    grid, prefix = torch.randn(2, 5, 3, 4), torch.randn(2, 2, 5)
    raw = grid_to_raw(grid, prefix if layout == "tokens" else None, layout)
    back, back_prefix = raw_to_grid(raw, layout, (3, 4))
    assert back.equal(grid)
    if layout == "tokens":
        assert back_prefix.equal(prefix) and raw[:, 2 + 1 * 4 + 2].equal(grid[:, :, 1, 2])


def blurred_final(model: torch.nn.Module) -> torch.nn.Module:
    """`model` whose final features are a 3×3 average of its last stage: not a per-position
    norm of it, so no tail can reproduce them."""
    intermediates = model.forward_intermediates

    def forward_intermediates(*args, **kwargs):
        out = intermediates(*args, **kwargs)
        if kwargs.get("intermediates_only"):
            return out
        return torch.nn.functional.avg_pool2d(out[0], 3, 1, 1), out[1]
    model.forward_intermediates = forward_intermediates
    return model


def test_unsupported_teacher_is_reported():
    model = blurred_final(tiny_teacher("resnet"))
    with pytest.raises(UnsupportedTeacher, match="final features"):
        TeacherTail(model, SIZE)


def test_tail_of_a_head_conv_teacher_runs_through_conv_head_and_bn2():
    """EfficientNet: stage 4 is read after `conv_head` + `bn2` (Hao840/OFAKD
    `custom_forward/efficientnet.py`), so the tail from stage 3 runs the last blocks and the
    head convolution and reproduces the final features."""
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=10).eval().requires_grad_(False)
    tail = TeacherTail(model, SIZE)
    images = torch.randn(2, *SIZE)
    with torch.no_grad():
        reproduced = tail(forward_taps(model, images, (3,)).stages[3])
        expected = model.forward_features(images)
    torch.testing.assert_close(reproduced, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family,names", [
    ("resnet", {1: "layer1", 2: "layer2", 3: "layer3", 4: "layer4"}),
    ("swin", {1: "layers.0", 2: "layers.1", 3: "layers.2", 4: "layers.3"}),
    ("vit", {1: "blocks.0", 2: "blocks.1", 3: "blocks.2", 4: "blocks.5"}),  # taps after 0, 1, 4, 5
])
def test_stage_entries(family, names):
    entries = StageEntries(tiny_teacher(family), SIZE)
    assert entries.names == names
    if family == "resnet":  # stage inputs: the stem's output, then each previous stage's
        assert entries.input_shapes == {1: (32, 16, 16), 2: (32, 16, 16), 3: (48, 8, 8), 4: (192, 4, 4)}


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_prompts_leave_the_teacher_unchanged(family):
    model = tiny_teacher(family)
    entries = StageEntries(model, SIZE)
    images = torch.randn(2, *SIZE)
    seen = {}

    def identity(stage):
        def transform(grid):
            seen[stage] = tuple(grid.shape[1:])
            return grid
        return transform

    run = model.forward_features  # not the logits: timm's Mixer head starts at zero
    with torch.no_grad():
        plain = run(images)
        with entries.prompted({s: identity(s) for s in (1, 2, 3, 4)}):
            prompted = run(images)
        # a scale, not a shift: LayerNorm teachers ignore a constant added to every channel
        with entries.prompted({3: lambda grid: 1.5 * grid}):
            shifted = run(images)
        after = run(images)
    torch.testing.assert_close(prompted, plain, rtol=0, atol=0)
    assert seen == entries.input_shapes
    assert not torch.allclose(shifted, plain)
    torch.testing.assert_close(after, plain, rtol=0, atol=0)  # hooks removed on exit


def test_prompt_sees_patch_tokens_at_their_grid_positions():
    """A transform that touches one grid position changes that token only (no scramble, the
    class token in front untouched)."""
    model = tiny_teacher("vit")
    entries = StageEntries(model, SIZE)
    # the block's first norm sees the block input after the prompt's pre-hook rewrote it
    block_norm = model.get_submodule(entries.names[2]).norm1
    received = []
    handle = block_norm.register_forward_pre_hook(lambda m, args: received.append(args[0]))

    def poke(grid):
        grid = grid.clone()
        grid[:, :, 1, 2] += 1.0
        return grid

    with torch.no_grad():
        model(torch.zeros(1, *SIZE))
        with entries.prompted({2: poke}):
            model(torch.zeros(1, *SIZE))
    handle.remove()
    plain, poked = received
    changed = (poked - plain).abs().sum(-1)[0]
    assert changed.nonzero().flatten().tolist() == [1 + 1 * 4 + 2]
