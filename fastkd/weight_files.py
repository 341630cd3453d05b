"""Reading weight files: the checkpoint layouts of timm, torchvision, DeiT, OFA-KD and
mmpretrain-style trainers, wrapper prefixes, and strict loading with readable errors (a
classifier of the wrong size above all: a teacher with a random head teaches noise).

Key names that are not the timm model's own are translated before loading (`match_model`):
official releases through timm's own per-model `checkpoint_filter_fn` (the function timm's
pretrained loader applies: Microsoft's Swin, Facebook's ConvNeXt, DeiT, resized position
embeddings), and mmcls/mmpretrain classifiers (`backbone.` + `head.` modules) of the ResNet,
Swin, ViT/DeiT and ConvNeXt families through `_MMCLS_RULES`.
"""
from __future__ import annotations

import argparse
import pickle
import re
import sys
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

_STATE_KEYS = ("state_dict", "model")
_EMA_KEYS = ("state_dict_ema", "model_ema")
# DDP / DataParallel and torch.compile wrap the model and prefix every key.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class WeightFileError(ValueError):
    """A weight file that cannot be read, or whose weights do not fit the model."""


class TeacherHeadMismatch(WeightFileError):
    """The teacher's classifier was trained for another number of classes than the data has."""


def head_mismatch_message(source: str, source_classes: int, data_classes: int) -> str:
    return (f"{source} have a {source_classes}-class head, but the data has {data_classes} "
            f"classes. Fine-tune the teacher on this data set first and pass that checkpoint, "
            f"or set num_classes={source_classes} if the labels are the same classes.")


def load_state_dict_file(path: str | Path, *, use_ema: bool = False) -> dict[str, Tensor]:
    """The state dict in a local checkpoint, without DDP/compile key prefixes.

    Layouts: a plain state dict, or one nested under 'state_dict' / 'model' (timm train.py,
    DeiT, OFA-KD, torchvision references) or 'state_dict_ema' / 'model_ema' (their EMA
    weights, preferred with `use_ema`). `.safetensors` files are read with safetensors, the
    rest with `torch.load(weights_only=True)`; argparse.Namespace is allowed because timm's
    train.py stores its `args` in every checkpoint.
    """
    path = Path(path)
    raw = _read_checkpoint(path)
    state = _nested_state_dict(raw, path, use_ema)
    return {_strip_wrapper_prefixes(key): value for key, value in state.items()}


def _read_checkpoint(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path), device="cpu")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise WeightFileError(f"{path} holds objects that torch.load(weights_only=True) refuses to "
                         f"unpickle; save its state dict alone (torch.save(model.state_dict()))"
                         ) from error


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, Tensor) for v in obj.values())


def _nested_state_dict(raw, path: Path, use_ema: bool) -> dict[str, Tensor]:
    found = sorted(map(str, raw))[:12] if isinstance(raw, dict) else type(raw).__name__
    if use_ema:
        for key in _EMA_KEYS:
            if isinstance(raw, dict) and _is_state_dict(raw.get(key)):
                return raw[key]
        raise WeightFileError(f"{path}: use_ema=True but no EMA weights under {_EMA_KEYS}; "
                         f"keys found: {found}")
    if _is_state_dict(raw):
        return raw
    for key in _STATE_KEYS + _EMA_KEYS:
        if isinstance(raw, dict) and _is_state_dict(raw.get(key)):
            return raw[key]
    raise WeightFileError(f"{path}: no state dict found (a dict of tensors, or one under "
                     f"{_STATE_KEYS + _EMA_KEYS}); keys found: {found}")


def _strip_wrapper_prefixes(key: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


# ------------------------------------------------------------------- other trainers' key names

# mmcls/mmpretrain key → timm key (or None: a module timm's model does not have), per timm
# model class; each key takes the first rule that matches. Swin and ConvNeXt go to their
# official release's names, which timm's own filter then maps (`_CHAIN_TIMM_FILTER`). Names
# from mmcls's backbones and heads (`mmcls/models/backbones/{resnet,swin_transformer,
# vision_transformer,convnext}.py`, `mmcls/models/heads/{linear_head,vision_transformer_head,
# deit_head}.py`) and its converters (`tools/model_converters/convnext_to_mmcls.py`,
# `torchvision_to_mmcls.py`), as in deep-optimization/ScaleKD's mmcls copy.
_MMCLS_RULES: dict[str, list[tuple[str, str | None]]] = {
    "ResNet": [(r"^backbone\.", ""), (r"^head\.fc\.", "fc.")],
    "VisionTransformer": [
        (r"^backbone\.patch_embed\.projection\.", "patch_embed.proj."),
        (r"^backbone\.layers\.(\d+)\.ln1\.", r"blocks.\1.norm1."),
        (r"^backbone\.layers\.(\d+)\.ln2\.", r"blocks.\1.norm2."),
        (r"^backbone\.layers\.(\d+)\.ffn\.layers\.0\.0\.", r"blocks.\1.mlp.fc1."),
        (r"^backbone\.layers\.(\d+)\.ffn\.layers\.1\.", r"blocks.\1.mlp.fc2."),
        (r"^backbone\.layers\.(\d+)\.", r"blocks.\1."),             # attn.qkv, attn.proj
        (r"^backbone\.ln1\.", "norm."),                               # the final norm
        (r"^backbone\.", ""),                                          # cls/dist token, pos_embed
        (r"^head\.layers\.head_dist\.", "head_dist."),                # DeiTClsHead
        (r"^head\.layers\.head\.", "head."),
    ],
    "SwinTransformer": [
        (r"^backbone\.patch_embed\.projection\.", "patch_embed.proj."),
        (r"^backbone\.stages\.(\d+)\.blocks\.(\d+)\.attn\.w_msa\.", r"layers.\1.blocks.\2.attn."),
        (r"^backbone\.stages\.(\d+)\.blocks\.(\d+)\.ffn\.layers\.0\.0\.",
         r"layers.\1.blocks.\2.mlp.fc1."),
        (r"^backbone\.stages\.(\d+)\.blocks\.(\d+)\.ffn\.layers\.1\.",
         r"layers.\1.blocks.\2.mlp.fc2."),
        (r"^backbone\.stages\.", "layers."),                          # norm1/2, downsample
        (r"^backbone\.norm3?\.", "norm."),                             # `norm` before mmcls v2
        (r"^backbone\.norm[012]\.", None),                             # norms of other out_indices
        (r"^backbone\.", ""),                                          # patch_embed.norm
        (r"^head\.fc\.", "head."),
    ],
    "ConvNeXt": [
        (r"^backbone\.(.*)depthwise_conv", r"\1dwconv"),
        (r"^backbone\.(.*)pointwise_conv", r"\1pwconv"),
        (r"^backbone\.norm3\.", "norm."),
        (r"^backbone\.", ""),
        (r"^head\.fc\.", "head."),
    ],
}
_CHAIN_TIMM_FILTER = {"SwinTransformer", "ConvNeXt"}


def _unfold_to_concat_order(value: Tensor, key: str) -> Tensor:
    """mmcls's Swin patch merging gathers the 2×2 neighbours with `nn.Unfold` (channel
    c·4 + k); Microsoft's and timm's concatenate them (k·C + c) with the neighbours in the
    order (0,0), (1,0), (0,1), (1,1), Unfold's positions 0, 2, 1, 3. Inverse of mmcls's
    `correct_unfold_reduction_order` / `correct_unfold_norm_order` (its swin converters)."""
    if key.endswith("downsample.reduction.weight"):
        out_channels, in_channels = value.shape
        grouped = value.reshape(out_channels, in_channels // 4, 4)[:, :, [0, 2, 1, 3]]
        return grouped.transpose(1, 2).reshape(out_channels, in_channels)
    if ".downsample.norm." in key:
        return value.reshape(-1, 4)[:, [0, 2, 1, 3]].transpose(0, 1).reshape(-1)
    return value


def _from_mmcls(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor] | None:
    """`state` in the mmcls names of `model`'s family translated to timm's (or official
    release) names; None when it is no mmcls classifier or the family has no rules."""
    if not any(key.startswith("backbone.") for key in state):
        return None
    family = next((cls.__name__ for cls in type(model).__mro__ if cls.__name__ in _MMCLS_RULES),
                  None)
    if family is None:
        return None
    rules = [(re.compile(pattern), target) for pattern, target in _MMCLS_RULES[family]]
    out = {}
    for key, value in state.items():
        pattern, target = next(((p, t) for p, t in rules if p.search(key)), (None, key))
        if pattern is not None and target is None:
            continue
        new_key = pattern.sub(target, key, count=1) if pattern is not None else key
        if family == "SwinTransformer":
            value = _unfold_to_concat_order(value, new_key)
        out[new_key] = value
    if family in _CHAIN_TIMM_FILTER:
        out = _timm_filter(out, model)
    return out


def _timm_filter(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor] | None:
    """timm's own `checkpoint_filter_fn` of the model's module (what timm applies to its
    pretrained files); None when the module has none or it cannot read this layout."""
    filter_fn: Callable | None = getattr(sys.modules.get(type(model).__module__),
                                         "checkpoint_filter_fn", None)
    if filter_fn is None:
        return None
    try:
        return filter_fn(dict(state), model)
    except Exception:   # a filter meeting a layout it does not know: that candidate is not used
        return None


def match_model(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """`state` with the model's own key names: as it is when the names already match, else the
    first of timm's filter, the mmcls translation, that gives exactly the model's keys. Left
    unchanged when none does (`load_weights` then lists the mismatch)."""
    own = set(model.state_dict())
    if set(state) == own:
        return state
    for convert in (_timm_filter, _from_mmcls):
        candidate = convert(state, model)
        if candidate is not None and set(candidate) == own:
            return candidate
    return state


def _classifier_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the classifier(s) that `get_classifier()` returns (a tuple for
    distilled DeiT, whose second head is `head_dist`)."""
    heads = model.get_classifier()
    heads = heads if isinstance(heads, tuple) else (heads,)
    names = [name for name, module in model.named_modules() if any(module is h for h in heads)]
    return {key for key in model.state_dict() for name in names if key.startswith(name + ".")}


def load_weights(model: nn.Module, state: dict[str, Tensor], path, *, reset_head: bool) -> None:
    """Strict loading with readable errors. A head of the wrong size raises
    `TeacherHeadMismatch`, or with `reset_head` keeps the model's fresh head. Other trainers'
    key names are translated first (`match_model`)."""
    state = match_model(state, model)
    own = model.state_dict()
    head = _classifier_keys(model)
    wrong_head = sorted(k for k in head if k in state and state[k].shape != own[k].shape)
    if wrong_head:
        classes = next(state[k].shape[0] for k in wrong_head)
        if not reset_head:
            raise TeacherHeadMismatch(
                head_mismatch_message(f"the weights in {path}", classes, model.num_classes))
        warnings.warn(f"{path} has a {classes}-class head and the data {model.num_classes} "
                      f"classes: loading the rest, keeping a freshly initialised head",
                      stacklevel=3)
        state = {k: v for k, v in state.items() if k not in head}
    problems = {
        "wrong shape": [k for k in state if k in own and state[k].shape != own[k].shape],
        "missing": [k for k in own if k not in state and not (wrong_head and k in head)],
        "unexpected": [k for k in state if k not in own],
    }
    if any(problems.values()):
        listed = "; ".join(f"{what} ({len(keys)}): {keys[:5]}"
                           for what, keys in problems.items() if keys)
        raise WeightFileError(f"{path} does not fit {type(model).__name__}: {listed}")
    model.load_state_dict(state, strict=not wrong_head)
