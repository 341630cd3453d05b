"""Teacher weights as users have them: timm, torchvision, OFA-KD (timm train.py), official
DeiT / Swin / ConvNeXt releases and mmcls/mmpretrain classifiers. Each file is written from a
random timm model in that trainer's layout (the layout restated here from the trainer's own
code, cited per function), then loaded as a teacher, whose outputs must equal the original's."""
from __future__ import annotations

import argparse
import re

import pytest
import timm
import torch
from torch import nn

from fastkd.models import create_teacher
from fastkd.weight_files import TeacherHeadMismatch


def randomized(model: nn.Module) -> nn.Module:
    """Weights no fresh model starts from (norm weights and zero-init layers included)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
        for name, buffer in model.named_buffers():
            if name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5)
            elif name.endswith("running_mean"):
                buffer.normal_(0, 0.1)
    return model.eval()


def tiny_swin(**extra):
    return timm.create_model("swin_tiny_patch4_window7_224", num_classes=10, embed_dim=16,
                             depths=(1, 1, 2, 1), num_heads=(1, 1, 2, 2), img_size=64,
                             window_size=4, **extra)


def tiny_deit_distilled(**extra):
    return timm.create_model("deit_tiny_distilled_patch16_224", num_classes=10, depth=2,
                             embed_dim=48, num_heads=2, img_size=64, **extra)


def tiny_vit(**extra):
    return timm.create_model("vit_tiny_patch16_224", num_classes=10, depth=2, embed_dim=48,
                             num_heads=2, img_size=64, **extra)


def renamed(state: dict, rules: list[tuple[str, str]]) -> dict:
    """Every key through the first matching (regex, replacement)."""
    out = {}
    for key, value in state.items():
        for pattern, target in rules:
            if re.search(pattern, key):
                key = re.sub(pattern, target, key, count=1)
                break
        out[key] = value
    return out


# ------------------------------------------------------------------ official release layouts

def swin_official(state: dict) -> dict:
    """Microsoft's Swin layout (microsoft/Swin-Transformer `models/swin_transformer.py`):
    `layers.i.downsample` ends stage i (timm ≥ 0.9 starts stage i+1 with it), the classifier is
    `head`, and the `relative_position_index` / `attn_mask` buffers are saved too."""
    out = {}
    for key, value in state.items():
        key = re.sub(r"^layers\.(\d+)\.downsample",
                     lambda m: f"layers.{int(m.group(1)) - 1}.downsample", key)
        out[key.replace("head.fc.", "head.")] = value
        if key.endswith("attn.relative_position_bias_table"):
            out[key.replace("bias_table", "index")] = torch.zeros(16, 16, dtype=torch.long)
    out["layers.1.blocks.1.attn_mask"] = torch.zeros(4, 16, 16)
    return out


def convnext_official(state: dict) -> dict:
    """Facebook's ConvNeXt layout (facebookresearch/ConvNeXt `models/convnext.py`):
    `downsample_layers.0` is the stem, `downsample_layers.i` (i ≥ 1) starts stage i, blocks
    `stages.i.j` with `dwconv`, `norm`, `pwconv1/2`, `gamma`; final `norm`, classifier `head`."""
    return renamed(state, [
        (r"^stem\.", "downsample_layers.0."),
        (r"^stages\.(\d+)\.downsample\.", r"downsample_layers.\1."),
        (r"^stages\.(\d+)\.blocks\.(\d+)\.conv_dw", r"stages.\1.\2.dwconv"),
        (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc", r"stages.\1.\2.pwconv"),
        (r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.\2."),
        (r"^head\.norm\.", "norm."),
        (r"^head\.fc\.", "head."),
    ])


# ------------------------------------------------------------------------- mmcls layouts

def resnet_mmcls(state: dict) -> dict:
    """mmcls `tools/model_converters/torchvision_to_mmcls.py` `convert_resnet`: `fc.*` →
    `head.fc.*`, everything else `backbone.*` (timm's ResNet keys are torchvision's)."""
    return {("head." + k if k.startswith("fc") else "backbone." + k): v for k, v in state.items()}


def convnext_mmcls(state: dict) -> dict:
    """mmcls `tools/model_converters/convnext_to_mmcls.py` `convert_convnext` applied to the
    official layout: `head.` → `head.fc.`, in stages `dwconv` → `depthwise_conv`, `pwconv` →
    `pointwise_conv`, `norm` → `norm3`, then `backbone.` in front of all but the head."""
    out = {}
    for key, value in convnext_official(state).items():
        if key.startswith("head"):
            out[key.replace("head.", "head.fc.")] = value
            continue
        if key.startswith("stages"):
            key = key.replace("dwconv", "depthwise_conv").replace("pwconv", "pointwise_conv")
        elif key.startswith("norm"):
            key = key.replace("norm", "norm3")
        out["backbone." + key] = value
    return out


def correct_unfold_reduction_order(x: torch.Tensor) -> torch.Tensor:
    """mmcls/mmseg swin converters (`swin2mmseg.py` and the swin `_load_from_state_dict`
    conversions): official concat order → nn.Unfold order, patch-merging Linear weight."""
    out_channel, in_channel = x.shape
    x = x.reshape(out_channel, 4, in_channel // 4)
    return x[:, [0, 2, 1, 3], :].transpose(1, 2).reshape(out_channel, in_channel)


def correct_unfold_norm_order(x: torch.Tensor) -> torch.Tensor:
    """The same for the patch-merging LayerNorm weight and bias."""
    in_channel = x.shape[0]
    x = x.reshape(4, in_channel // 4)
    return x[[0, 2, 1, 3], :].transpose(0, 1).reshape(in_channel)


def swin_mmcls(state: dict, *, out_indices=(3,)) -> dict:
    """mmcls's SwinTransformer names (`mmcls/models/backbones/swin_transformer.py`:
    `patch_embed.projection`, `stages.i.blocks.j.attn.w_msa.*`, `ffn.layers.0.0` / `ffn.layers.1`,
    `stages.i.downsample` with Unfold order, `norm{i}` per out index; `LinearClsHead.fc`), from
    the official layout as the mmcls swin converter maps it."""
    out = {}
    for key, value in swin_official(state).items():
        if key.endswith("attn_mask"):
            continue
        if key.startswith("head."):
            out[key.replace("head.", "head.fc.")] = value
            continue
        if "downsample.reduction" in key:
            value = correct_unfold_reduction_order(value)
        elif "downsample.norm" in key:
            value = correct_unfold_norm_order(value)
        key = key.replace("attn.", "attn.w_msa.").replace("mlp.fc1.", "ffn.layers.0.0.")
        key = key.replace("mlp.fc2.", "ffn.layers.1.").replace("layers.", "stages.", 1)
        key = key.replace("patch_embed.proj.", "patch_embed.projection.")
        if key.startswith("norm."):
            key = key.replace("norm.", "norm3.")
        out["backbone." + key] = value
    for i in out_indices:   # extra out_indices add norms the classifier never uses
        if i != 3:
            width = state[f"layers.{i}.blocks.0.norm1.weight"].shape[0]
            out[f"backbone.norm{i}.weight"] = torch.ones(width)
            out[f"backbone.norm{i}.bias"] = torch.zeros(width)
    return out


def vit_mmcls(state: dict) -> dict:
    """mmcls's VisionTransformer / DistilledVisionTransformer names (`mmcls/models/backbones/
    vision_transformer.py`: `patch_embed.projection`, `layers.i.ln1/ln2`, `attn.qkv/proj`,
    `ffn.layers.0.0` / `ffn.layers.1`, final `ln1`; heads `head.layers.head` and, for DeiT,
    `head.layers.head_dist` in `vision_transformer_head.py` / `deit_head.py`)."""
    return renamed(state, [
        (r"^patch_embed\.proj\.", "backbone.patch_embed.projection."),
        (r"^blocks\.(\d+)\.norm1\.", r"backbone.layers.\1.ln1."),
        (r"^blocks\.(\d+)\.norm2\.", r"backbone.layers.\1.ln2."),
        (r"^blocks\.(\d+)\.mlp\.fc1\.", r"backbone.layers.\1.ffn.layers.0.0."),
        (r"^blocks\.(\d+)\.mlp\.fc2\.", r"backbone.layers.\1.ffn.layers.1."),
        (r"^blocks\.(\d+)\.", r"backbone.layers.\1."),
        (r"^norm\.", "backbone.ln1."),
        (r"^head_dist\.", "head.layers.head_dist."),
        (r"^head\.", "head.layers.head."),
        (r"^", "backbone."),
    ])


# ------------------------------------------------------------------------------ the tests

CASES = {
    # name: (timm name, builder, input size, file payload from the random state dict)
    "timm plain": ("test_resnet", lambda: timm.create_model("test_resnet", num_classes=10), 32,
                   lambda s: s),
    "OFA-KD (timm train.py, EMA)": (
        "test_resnet", lambda: timm.create_model("test_resnet", num_classes=10), 32,
        lambda s: {"epoch": 99, "arch": "resnet18", "args": argparse.Namespace(lr=0.1),
                   "state_dict": {k: torch.zeros_like(v) for k, v in s.items()},
                   "state_dict_ema": {"module." + k: v for k, v in s.items()}}),
    "DeiT release (distilled)": ("deit_tiny_distilled_patch16_224", tiny_deit_distilled, 64,
                                 lambda s: {"model": s}),
    "Swin release": ("swin_tiny_patch4_window7_224", tiny_swin, 64,
                     lambda s: {"model": swin_official(s)}),
    "ConvNeXt release": ("test_convnext", lambda: timm.create_model("test_convnext",
                                                                    num_classes=10), 64,
                         lambda s: {"model": convnext_official(s)}),
    "mmcls ResNet": ("test_resnet", lambda: timm.create_model("test_resnet", num_classes=10), 32,
                     lambda s: {"meta": {"epoch": 100}, "state_dict": resnet_mmcls(s)}),
    "mmcls Swin": ("swin_tiny_patch4_window7_224", tiny_swin, 64,
                   lambda s: {"state_dict": swin_mmcls(s)}),
    "mmcls Swin, four out_indices": ("swin_tiny_patch4_window7_224", tiny_swin, 64,
                                     lambda s: {"state_dict": swin_mmcls(s, out_indices=(0, 1, 2, 3))}),
    "mmcls ViT": ("vit_tiny_patch16_224", tiny_vit, 64, lambda s: {"state_dict": vit_mmcls(s)}),
    "mmcls DeiT (distilled)": ("deit_tiny_distilled_patch16_224", tiny_deit_distilled, 64,
                               lambda s: {"state_dict": vit_mmcls(s)}),
    "mmcls ConvNeXt": ("test_convnext", lambda: timm.create_model("test_convnext", num_classes=10),
                       64, lambda s: {"state_dict": convnext_mmcls(s)}),
}
SHAPED = {"deit_tiny_distilled_patch16_224": dict(depth=2, embed_dim=48, num_heads=2, img_size=64),
          "vit_tiny_patch16_224": dict(depth=2, embed_dim=48, num_heads=2, img_size=64),
          "swin_tiny_patch4_window7_224": dict(embed_dim=16, depths=(1, 1, 2, 1),
                                               num_heads=(1, 1, 2, 2), img_size=64, window_size=4)}


@pytest.mark.parametrize("case", list(CASES))
def test_teacher_file_loads_to_the_original_outputs(case, tmp_path):
    name, build, size, payload = CASES[case]
    source = randomized(build())
    path = tmp_path / "teacher.pth"
    torch.save(payload(source.state_dict()), path)
    teacher = create_teacher(name, 10, checkpoint=path, use_ema="EMA" in case,
                             **SHAPED.get(name, {}))
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), source(x))


def test_torchvision_resnet_file_loads_to_the_original_outputs(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    source = randomized(torchvision.models.resnet18(num_classes=10))
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    teacher = create_teacher("resnet18", 10, checkpoint=path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), source(x))


def test_mmcls_patch_merging_order_is_what_timm_computes():
    """The Unfold-order weights mmcls keeps (`correct_unfold_*` above) run through mmcls's
    merging (`nn.Unfold(2, stride=2)` then norm and reduction, `mmcls/models/utils/embed.py`
    `PatchMerging`) give timm's merging with the official-order weights: the reordering the
    loader undoes is the one mmcls applies."""
    torch.manual_seed(0)
    merging = randomized(tiny_swin()).layers[1].downsample
    x = torch.randn(2, 8, 8, 16)                              # B×H×W×C, as timm's Swin
    unfolded = nn.functional.unfold(x.permute(0, 3, 1, 2), 2, stride=2).transpose(1, 2)
    norm_w = correct_unfold_norm_order(merging.norm.weight)
    norm_b = correct_unfold_norm_order(merging.norm.bias)
    reduction = correct_unfold_reduction_order(merging.reduction.weight)
    mmcls = nn.functional.layer_norm(unfolded, (64,), norm_w, norm_b) @ reduction.t()
    with torch.no_grad():
        expected = merging(x).flatten(1, 2)
    torch.testing.assert_close(mmcls.detach(), expected)


def test_mmcls_file_with_another_head_size_is_refused(tmp_path):
    source = randomized(timm.create_model("test_resnet", num_classes=1000))
    path = tmp_path / "imagenet.pth"
    torch.save({"state_dict": resnet_mmcls(source.state_dict())}, path)
    with pytest.raises(TeacherHeadMismatch, match="1000-class head"):
        create_teacher("test_resnet", 10, checkpoint=path)


def test_unknown_names_are_still_listed(tmp_path):
    source = randomized(timm.create_model("test_resnet", num_classes=10))
    path = tmp_path / "odd.pth"
    torch.save({"encoder." + k: v for k, v in source.state_dict().items()}, path)
    with pytest.raises(ValueError, match="missing .* unexpected"):
        create_teacher("test_resnet", 10, checkpoint=path)
