"""Models: timm students, frozen teachers, and the stage feature taps that distillers read.

Everything goes through timm: `create_model` builds, `feature_info` describes the stages,
and one `forward_intermediates` call taps the stages in the same forward that yields the
logits. Stages 1..4 are found by introspection (`stage_info`), never from tables of names.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import math
import types
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import timm
import torch
from timm.data import resolve_data_config
from timm.layers import PatchEmbed
from torch import Tensor, nn

from fastkd.weight_files import (TeacherHeadMismatch, head_mismatch_message, load_state_dict_file,
                                 load_weights)

STAGES = (1, 2, 3, 4)
# OFA-KD taps a 12-block isotropic model after blocks 2, 4, 10 and 12 (1-based).
_ISOTROPIC_TAPS_OF_12 = (2, 4, 10, 12)

Family = Literal["cnn", "vit", "mlp"]


# ---------------------------------------------------------------------------------- creation


def create_student(name: str, num_classes: int, *, checkpoint: str | Path | None = None,
                   pretrained: bool = False, **kwargs) -> nn.Module:
    """A timm model. Keywords set to None keep the model's default (timm's `create_model`
    drops them), so configs can carry optional keys. A `checkpoint` (e.g. ImageNet weights for
    a CIFAR run) may have another head size: its head is then skipped with a warning."""
    _check_one_weight_source(checkpoint, pretrained)
    model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    if checkpoint is not None:
        load_weights(model, load_state_dict_file(checkpoint), checkpoint, reset_head=True)
    return model


def create_teacher(name: str, num_classes: int, *, checkpoint: str | Path | None = None,
                   pretrained: bool = False, use_ema: bool = False, **kwargs) -> nn.Module:
    """A frozen timm model in eval mode, weights from a local checkpoint (strict) or timm's
    pretrained loading. A head of another class count raises `TeacherHeadMismatch`: timm would
    silently give it a random head, and a teacher with a random head teaches noise."""
    _check_one_weight_source(checkpoint, pretrained)
    if use_ema and checkpoint is None:
        raise ValueError("use_ema=True needs a teacher checkpoint that holds EMA weights")
    if pretrained:
        _check_pretrained_head(name, num_classes)
    if checkpoint is None and not pretrained:
        warnings.warn(f"teacher {name} has random weights (no checkpoint, pretrained=False): "
                      "fine for smoke tests and benchmarks, useless for distillation", stacklevel=2)
    model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    if checkpoint is not None:
        state = load_state_dict_file(checkpoint, use_ema=use_ema)
        load_weights(model, state, checkpoint, reset_head=False)
    return freeze(model)


def freeze(model: nn.Module, train_mode: bool = False) -> nn.Module:
    """No gradients for the weights, eval mode (train mode with `train_mode`), and a `train()`
    that keeps that mode, so that no trainer (nor a parent module's `train()`) can switch
    dropout or BN statistic updates on or off."""
    model.requires_grad_(False)
    model._fastkd_frozen_mode = train_mode
    model.train = types.MethodType(_stay_in_frozen_mode, model)
    return model.train()


def _stay_in_frozen_mode(self: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(self, self._fastkd_frozen_mode)


def _check_one_weight_source(checkpoint, pretrained: bool) -> None:
    if checkpoint is not None and pretrained:
        raise ValueError("give either a checkpoint or pretrained=True, not both")


def _check_pretrained_head(name: str, num_classes: int) -> None:
    """Checked from the registry before anything is downloaded."""
    cfg = timm.models.get_pretrained_cfg(name)
    pretrained_classes = getattr(cfg, "num_classes", None)
    if pretrained_classes and pretrained_classes != num_classes:
        raise TeacherHeadMismatch(head_mismatch_message(
            f"timm's pretrained weights for {name}", pretrained_classes, num_classes))


# ------------------------------------------------------------------------ model introspection


def model_data_config(model: nn.Module) -> dict:
    """timm's `resolve_data_config` for the model: mean, std, input_size, crop_pct,
    interpolation, crop_mode. A model built at another `img_size` than its pretrained config
    (a small test Swin/Mixer) gets the size its patch embedding was built for, because its
    pretrained config still names the default size and the model only accepts its own."""
    config = resolve_data_config({}, model=model)
    patch_embed = next((m for m in model.modules() if isinstance(m, PatchEmbed)), None)
    img_size = getattr(patch_embed, "img_size", None)
    if img_size is not None:
        config["input_size"] = (config["input_size"][0], *img_size)
    return config


def _is_attention(module: nn.Module) -> bool:
    # Attention *pooling* heads (CLIP ResNets) do not make a backbone a transformer.
    name = type(module).__name__
    return isinstance(module, nn.MultiheadAttention) or ("Attention" in name and "Pool" not in name)


def model_family(model: nn.Module) -> Family:
    """'vit' if any module is an attention layer (ViT, DeiT, Swin, hybrids), 'mlp' for patch
    token models without attention (Mixer, ResMLP, gMLP), 'cnn' otherwise."""
    modules = list(model.modules())
    if any(_is_attention(m) for m in modules):
        return "vit"
    if any(isinstance(m, PatchEmbed) for m in modules):
        return "mlp"
    return "cnn"


def num_prefix_tokens(model: nn.Module) -> int:
    """Class/distillation/register tokens in front of the patch tokens (0 for CNN/MLP/Swin)."""
    return int(getattr(model, "num_prefix_tokens", 0) or 0)


@dataclass(frozen=True)
class StageInfo:
    """Stage `stage` (1..4) is `forward_intermediates` output `index`, produced by `module`;
    with `final`, it is the final features instead (what `forward_features` returns, after
    the head convolution that follows block `index`), produced by `module`."""
    stage: int
    index: int
    module: str
    channels: int
    reduction: int
    height: int
    width: int
    final: bool = False


def isotropic_stage_indices(depth: int) -> tuple[int, int, int, int]:
    """Block indices (0-based) tapped as stages 1..4 of an isotropic model of `depth` blocks.

    OFA-KD's positions scaled to the depth: round(D·k/12) − 1 for k = 2, 4, 10, 12, rounding
    half up (12 blocks → 1, 3, 9, 11). Shallow models would repeat blocks, so each index is
    pushed to at least the previous + 1, and capped to leave room for the stages after it:
    four distinct blocks whenever D ≥ 4 (D = 4 → 0, 1, 2, 3). With D < 4 there are no four
    blocks: stages take blocks 0, 1, … in order and the last block repeats (D = 3 → 0, 1, 2, 2).
    """
    if depth < 1:
        raise ValueError(f"an isotropic model needs at least one block, got depth {depth}")
    indices: list[int] = []
    for stage, k in enumerate(_ISOTROPIC_TAPS_OF_12):
        target = math.floor(depth * k / 12 + 0.5) - 1
        lowest = indices[-1] + 1 if indices else 0
        highest = depth - (4 - stage) if depth >= 4 else depth - 1
        indices.append(min(max(target, lowest), highest))
    return tuple(indices)


def feature_entries(model: nn.Module) -> list[dict]:
    """timm's `feature_info` entries (module, num_chs, reduction), the one reader of it."""
    info = getattr(model, "feature_info", None)
    entries = getattr(info, "info", info)  # a FeatureInfo object or timm's plain list
    if not entries:
        raise ValueError(f"{type(model).__name__} has no feature_info: stages cannot be found")
    return list(entries)


def _head_conv_before_pool(model: nn.Module, entries: list[dict]) -> bool:
    """Whether `forward_features` runs layers after the last feature_info entry that change
    its width: a head convolution before the pooling (EfficientNet and MobileNetV2's
    `conv_head` + `bn2`, 320 → 1,280 channels; GhostNet, ReXNet). A head convolution after
    the pooling (MobileNetV3) leaves `num_features` at the last stage's width."""
    width = getattr(model, "num_features", None)
    return isinstance(width, int) and width != entries[-1]["num_chs"]


def _stage_taps(model: nn.Module) -> dict[int, tuple[int, dict, bool]]:
    """Stage → (forward_intermediates index, feature_info entry, tap the final features?),
    from feature_info alone.

    One reduction (ViT, Mixer, ResMLP: one entry per block): `isotropic_stage_indices`.
    Several (ResNet, EfficientNet, ConvNeXt, Swin): the last entry of each of the four largest
    reductions, which drops stride-2 stems and keeps a stage's final output. timm indexes
    `forward_intermediates` by position in feature_info. When stage 4 is the last entry and a
    head convolution follows it before the pooling (`_head_conv_before_pool`), stage 4 is
    read after that convolution: the final features, as OFA-KD taps MobileNetV2 (Hao840/OFAKD
    `custom_forward/efficientnet.py`: stage 4 is the output of `conv_head` + `bn2`, 1,280
    channels).
    """
    entries = feature_entries(model)
    reductions = sorted({entry["reduction"] for entry in entries})
    if len(reductions) == 1:
        positions = isotropic_stage_indices(len(entries))
    elif len(reductions) >= 4:
        positions = tuple(max(i for i, entry in enumerate(entries) if entry["reduction"] == r)
                          for r in reductions[-4:])
    else:
        raise ValueError(f"{type(model).__name__}: feature_info reductions {reductions}; stages "
                         f"1..4 need one reduction (isotropic) or at least four (hierarchical)")
    after_head = positions[-1] == len(entries) - 1 and _head_conv_before_pool(model, entries)
    return {stage: (i, entries[i], after_head and stage == STAGES[-1])
            for stage, i in zip(STAGES, positions)}


def stage_info(model: nn.Module, input_size: Sequence[int] | None = None) -> dict[int, StageInfo]:
    """Stages 1..4 of `model` at `input_size` (C, H, W; default: `model_data_config`).

    Channels and spatial sizes come from one dummy forward (batch 1, eval, no_grad, on the
    model's device), not from reduction arithmetic, which padding and patch sizes break.
    The result is cached on the model, per input size.
    """
    size = tuple(input_size or model_data_config(model)["input_size"])
    cache = model.__dict__.setdefault("_fastkd_stage_info", {})
    if size not in cache:
        taps = _stage_taps(model)
        shapes, final_shape, final_module = _probe_stage_shapes(
            model, sorted({i for i, _, _ in taps.values()}), size)
        infos = {}
        for stage, (index, entry, final) in taps.items():
            channels, height, width = shapes[index]
            if channels != entry["num_chs"]:
                raise ValueError(f"{type(model).__name__}: forward_intermediates output {index} "
                                 f"has {channels} channels, feature_info says {entry['num_chs']}")
            module = entry["module"]
            if final:
                if final_shape[1:] != (height, width) or final_module is None:
                    raise ValueError(f"{type(model).__name__}: its final features "
                                     f"{final_shape} are not a map on the last stage's grid")
                channels, module = final_shape[0], final_module
            infos[stage] = StageInfo(stage, index, module, channels, entry["reduction"],
                                     height, width, final)
        cache[size] = infos
    return cache[size]


def _probe_input(model: nn.Module, size: tuple) -> Tensor:
    weight = next(model.parameters())
    return torch.zeros(1, *size, device=weight.device, dtype=weight.dtype)


def _probe_stage_shapes(model: nn.Module, indices: list[int], size: tuple
                        ) -> tuple[dict[int, tuple], tuple, str | None]:
    """({index: (C, H, W)}, shape of the final features without batch, name of the module
    that produces them) from one probe forward.

    That module is the last one to finish whose output is the final tensor itself, leaving
    out containers of feature_info modules (GhostNet's `blocks` holds its head convolution
    `blocks.9`): EfficientNet's `bn2`, a ResNet's `layer4`."""
    # A dummy batch must not move BatchNorm statistics: probe in eval mode, then give every
    # submodule back its own mode (a student may hold deliberately frozen, eval-mode parts).
    modes = [(module, module.training) for module in model.modules()]
    containers = {".".join(entry["module"].split(".")[:depth])
                  for entry in feature_entries(model)
                  for depth in range(1, entry["module"].count(".") + 1)}
    finished: list[tuple[str, Any]] = []
    handles = [module.register_forward_hook(
        lambda module, args, out, name=name: finished.append((name, out)))
        for name, module in model.named_modules() if name and name not in containers]
    model.eval()
    try:
        with torch.no_grad():
            final, maps = model.forward_intermediates(_probe_input(model, size), indices=indices,
                                                      output_fmt="NCHW")
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training
    producer = next((name for name, out in reversed(finished) if out is final), None)
    shapes = {index: tuple(fmap.shape[1:]) for index, fmap in zip(indices, maps)}
    return shapes, tuple(final.shape[1:]), producer


def stage_module(model: nn.Module, info: StageInfo) -> nn.Module:
    """The module whose output is stage `info.stage` (feature_info's module name: a ResNet
    `layerN`, a ViT `blocks.i`, a Swin `layers.i`). Methods hook it to read the stage's input
    or to change its output (PAT's prompts). Its raw output is the tapped stage up to layout:
    ViT blocks give B×L×C tokens with the prefix in front, Swin stages B×H×W×C; the stage map
    in `Features` is the same tensor reshaped to NCHW."""
    return model.get_submodule(info.module)


# --------------------------------------------------------------------------------- feature taps


@dataclass
class Features:
    """What one forward gives a distiller."""
    logits: Tensor | None  # B×K, None if not asked
    pooled: Tensor | None  # B×D pre-logits, `forward_head(pre_logits=True)`
    stages: dict[int, Tensor]  # stage (1..4) → B×C×H×W (token grids reshaped NCHW)
    prefix: dict[int, Tensor]  # ViT only: stage → B×P×C prefix (class/dist) tokens


@functools.lru_cache(maxsize=None)
def _can_split_prefix(model_class: type) -> bool:
    # Cached per class: inspect.signature costs tens of microseconds, every training step.
    return "return_prefix_tokens" in inspect.signature(model_class.forward_intermediates).parameters


def _returns_prefix_tokens(model: nn.Module) -> bool:
    return num_prefix_tokens(model) > 0 and _can_split_prefix(type(model))


def forward_taps(model: nn.Module, x: Tensor, stages: Sequence[int], *,
                 with_logits: bool = True) -> Features:
    """The taps a distiller reads: stage maps, pooled features and logits from ONE forward of
    `model` (not timm's `forward_features`, which returns only the final features).

    `forward_intermediates(indices, output_fmt='NCHW', intermediates_only=False)` returns the
    final features along with the taps; `forward_head` turns them into pooled features and
    logits. The head runs twice (pre-logits, then logits): cheap, and it works for every timm
    head (distilled DeiT has two classifiers). With dropout in the head (student training),
    pooled and logits see different dropout masks.
    """
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"stages must be among {STAGES}, got {sorted(unknown)}")
    final, stage_maps, prefix = forward_stages(model, x, stages)
    pooled = model.forward_head(final, pre_logits=True)
    logits = model.forward_head(final) if with_logits else None
    return Features(logits=logits, pooled=pooled, stages=stage_maps, prefix=prefix)


def forward_stages(model: nn.Module, x: Tensor, stages: Sequence[int]
                   ) -> tuple[Tensor, dict[int, Tensor], dict[int, Tensor]]:
    """(final features as `forward_features` returns them, stage → B×C×H×W map, stage → B×P×C
    prefix tokens) from one `forward_intermediates` call. A stage tapped after the head
    convolution (`StageInfo.final`) is the final features themselves."""
    taps = {stage: (index, final) for stage, (index, _, final) in _stage_taps(model).items()
            if stage in stages}
    blocks = {stage: index for stage, (index, final) in taps.items() if not final}
    stage_maps, prefix = {}, {}
    if not blocks:
        final = model.forward_features(x)  # timm's forward_intermediates needs an index
    else:
        indices = sorted(set(blocks.values()))
        with_prefix = _returns_prefix_tokens(model)
        options = {"return_prefix_tokens": True} if with_prefix else {}
        final, taken = model.forward_intermediates(x, indices=indices, output_fmt="NCHW",
                                                   intermediates_only=False, **options)
        maps = dict(zip(indices, taken))
        for stage, index in blocks.items():
            if with_prefix:  # ViT gives (patch grid, prefix tokens) pairs
                stage_maps[stage], prefix[stage] = maps[index]
            else:
                stage_maps[stage] = maps[index]
    for stage in taps.keys() - blocks.keys():
        stage_maps[stage] = final
    return final, stage_maps, prefix


# ------------------------------------------------------------------------------------ teacher


def cast_teacher_weights_(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The frozen teacher's weights in the AMP dtype, once. Autocast caches its casts only for
    tensors that require grad, so a frozen fp32 teacher would be re-cast at every step (on a
    CPU, `copy_` was 9 % of a step's operator time). Normalisation layers (`is_norm_layer`:
    BatchNorm, LayerNorm, GroupNorm, timm's LayerNorm2d, RmsNorm) stay in fp32: their
    statistics and affine parameters are where the precision matters, and autocast runs them in
    fp32 anyway. The logits stay within bf16 rounding of the fp32-weight teacher under autocast
    (`tests/test_hot_path.py`)."""
    model.to(dtype)
    for module in model.modules():
        if is_norm_layer(module):
            module.float()
    return model


def is_norm_layer(module: nn.Module) -> bool:
    """A normalisation layer itself (a leaf whose class is named `*Norm*`), not a container
    such as timm's `NormMlpClassifierHead`."""
    return "Norm" in type(module).__name__ and not any(True for _ in module.children())


class Teacher:
    """The frozen teacher, deliberately not an `nn.Module`: it can never land in a distiller's
    parameters, state dict, checkpoint or DDP wrapper.

    Runs under `torch.no_grad()` and autocast in `amp_dtype` (none for None / fp32). Not
    `inference_mode`: its outputs feed losses that save them for backward (MSE, products), and
    autograd refuses inference tensors there. `graph=True` keeps autograd on for methods whose
    own modules sit inside or before the teacher (weights stay frozen). Logits and pooled
    features come back in fp32 so losses see one dtype; stage maps stay in the compute dtype
    (they are large; losses upcast). If the student's normalisation (`student_mean_std`)
    differs from the teacher's pretrained config, inputs are re-normalised first.

    `train_mode=True` runs the frozen teacher in train mode throughout (BatchNorm on batch
    statistics, dropout and drop-path active, still no gradients for its weights), as the
    mmcls/mmengine-based repositories do: their distiller calls `teacher.eval()` once, and the
    runner's `model.train()` at every epoch turns the teacher back to train mode
    (deep-optimization/ScaleKD and lusilili/UFD-KD `mmcls/models/classifiers/distiller.py`,
    yzd-v/cls_KD `mmcls/distillation/distillers/classification_distiller.py`).
    """

    def __init__(self, model: nn.Module, *, amp_dtype: torch.dtype | None,
                 student_mean_std: tuple[Sequence[float], Sequence[float]] | None = None,
                 channels_last: bool = False, train_mode: bool = False):
        self.model = freeze(model, train_mode)
        self.train_mode = train_mode
        self.amp_dtype = None if amp_dtype == torch.float32 else amp_dtype
        self.channels_last = channels_last
        self.family: Family = model_family(model)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        if self.amp_dtype is not None:
            cast_teacher_weights_(self.model, self.amp_dtype)
        config = model_data_config(model)
        self._renorm = _renormalization(student_mean_std, (config["mean"], config["std"]))

    @property
    def info(self) -> dict[int, StageInfo]:
        """Stages at the teacher's own input size (`stage_info` for other sizes)."""
        return stage_info(self.model)

    def to(self, device: torch.device | str) -> Teacher:
        self.model.to(device)
        if self._renorm is not None:  # moved once here, not on every call
            self._renorm = tuple(t.to(device) for t in self._renorm)
        return self

    def train(self, mode: bool = True) -> Teacher:
        """Keeps the teacher's own mode whatever `mode` says: eval (BN statistics and dropout
        off), or train throughout with `train_mode=True`."""
        self.model.train()
        return self

    def eval(self) -> Teacher:
        return self.train(False)

    def logits(self, images: Tensor) -> Tensor:
        """B×K fp32 logits, no autograd graph."""
        with self._running(images, graph=False):
            return self.model(self._prepare(images)).float()

    def features(self, images: Tensor, stages: Sequence[int], *, graph: bool = False,
                 with_logits: bool = True) -> Features:
        """`forward_taps` of the teacher: its stage maps, pooled features and logits (fp32)."""
        with self._running(images, graph=graph):
            found = forward_taps(self.model, self._prepare(images), stages,
                                     with_logits=with_logits)
        logits = None if found.logits is None else found.logits.float()
        return replace(found, logits=logits, pooled=found.pooled.float())

    def run(self, fn: Callable[[nn.Module, Tensor], Any], images: Tensor, *, graph: bool = False) -> Any:
        """`fn(model, x)` in the teacher's context: re-normalised input, autocast, no autograd
        unless `graph`. For methods that tap blocks outside stages 1..4 (ViTKD)."""
        with self._running(images, graph=graph):
            return fn(self.model, self._prepare(images))

    def _running(self, images: Tensor, *, graph: bool) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        if not graph:
            stack.enter_context(torch.no_grad())
        if self.amp_dtype is not None:
            stack.enter_context(torch.autocast(device_type=images.device.type,
                                               dtype=self.amp_dtype))
        return stack

    def _prepare(self, images: Tensor) -> Tensor:
        if self._renorm is not None:
            scale, shift = (t.to(images.device, images.dtype) for t in self._renorm)
            images = images * scale + shift
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images


def _renormalization(student, teacher) -> tuple[Tensor, Tensor] | None:
    """(scale, shift) with x_t = x_s·scale + shift, the student-normalised image re-normalised
    for the teacher: x_t = (x_s·σ_s + μ_s − μ_t) / σ_t. None when the two agree."""
    if student is None:
        return None
    (mean_s, std_s), (mean_t, std_t) = (
        [torch.tensor(v, dtype=torch.float64).view(1, -1, 1, 1) for v in pair]
        for pair in (student, teacher))
    if torch.allclose(mean_s, mean_t) and torch.allclose(std_s, std_t):
        return None
    return (std_s / std_t).float(), ((mean_s - mean_t) / std_t).float()
