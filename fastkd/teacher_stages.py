"""Running parts of a frozen timm teacher: its last stage on a foreign map, prompts in front
of its stages.

Two methods need more of the teacher than its outputs:
* ScaleKD's teacher parameter perception (Fan et al., NeurIPS 2024; deep-optimization/ScaleKD
  backbones' `forward_specific_stage`, e.g. `mmcls/models/backbones/swin_transformer.py`)
  pushes projected student features
  through the teacher's remaining stage and final norm, with autograd on (`TeacherTail`).
* PAT's adaptive feedback prompts (jimmylin0979/PAT `distillers/pat.py` `PromptBlock`) rewrite
  the input of each teacher stage during a second
  teacher forward (`StageEntries.prompted`).

Everything is found by introspection, never from tables of model names:
* stage modules come from `feature_info` (via `fastkd.models.stage_info`), stage 4 from the
  module that produces the final features when a head convolution follows the last stage
  (EfficientNet, MobileNetV2: `bn2` after `conv_head`);
* the modules that run between two stages are read off the module tree, timm's containers
  running their children in registration order (`blocks.9 → blocks.10, blocks.11`,
  `layer3 → layer4`, `layers.2 → layers.3`);
* the final norm is the model's `norm` (ViT, Swin, Mixer) or `norm_pre` (ConvNeXt; ResNet has
  neither);
* the layout a stage passes on (NCHW for CNNs, NHWC for timm's Swin, B×(P+L)×C tokens for
  ViT/Mixer) is read off a probe forward by comparing the raw stage output with the NCHW tap.

Each object checks itself on a probe input at construction and raises `UnsupportedTeacher`
when introspection does not reproduce the teacher.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Literal, Sequence

import torch
from torch import Tensor, nn

from fastkd.models import (STAGES, feature_entries, forward_stages, num_prefix_tokens, stage_info,
                           stage_module)

Layout = Literal["nchw", "nhwc", "tokens"]
# A prompt: (stage input as a B×C×H×W grid) → grid of the same shape.
GridTransform = Callable[[Tensor], Tensor]


class UnsupportedTeacher(ValueError):
    """Introspection cannot run this part of the teacher; distillers turn it into UnsupportedPair."""


# ------------------------------------------------------------------------------------ layouts


def raw_to_grid(raw: Tensor, layout: Layout, hw: tuple[int, int]) -> tuple[Tensor, Tensor | None]:
    """A stage's raw tensor → (B×C×H×W grid, B×P×C prefix tokens or None)."""
    if layout == "nchw":
        return raw, None
    if layout == "nhwc":
        return raw.permute(0, 3, 1, 2), None
    prefix_count = raw.shape[1] - hw[0] * hw[1]
    prefix = raw[:, :prefix_count] if prefix_count else None
    grid = raw[:, prefix_count:].transpose(1, 2).reshape(raw.shape[0], raw.shape[2], *hw)
    return grid, prefix


def grid_to_raw(grid: Tensor, prefix: Tensor | None, layout: Layout) -> Tensor:
    """Inverse of `raw_to_grid` (contiguous: timm's Swin blocks `view` their input)."""
    if layout == "nchw":
        return grid
    if layout == "nhwc":
        return grid.permute(0, 2, 3, 1).contiguous()
    tokens = grid.flatten(2).transpose(1, 2)
    return tokens if prefix is None else torch.cat([prefix.to(tokens.dtype), tokens], dim=1)


@dataclass
class _Probe:
    taps: dict[int, Tensor]         # stage → NCHW tap (forward_intermediates)
    outputs: dict[int, Tensor]      # stage → raw output of the stage module
    inputs: dict[str, Tensor]       # module name → raw input (recorded on request)
    final: Tensor                   # raw final features (what `forward_features` returns)
    layout: Layout


def _probe(model: nn.Module, input_size: Sequence[int], input_of: Sequence[str] = ()) -> _Probe:
    """One batch-1 forward in eval mode on a fixed random image, recording raw stage outputs,
    the inputs of the named modules and the final features. Random, not zeros: a zero image
    would make layouts (and a wrong tail) compare equal by accident."""
    info = stage_info(model, input_size)
    weight = next(model.parameters())
    image = torch.randn(1, *input_size, generator=torch.Generator().manual_seed(0))
    image = image.to(weight.device, weight.dtype)
    outputs, inputs, handles = {}, {}, []
    for stage in STAGES:
        handles.append(stage_module(model, info[stage]).register_forward_hook(
            lambda module, args, out, stage=stage: outputs.setdefault(stage, out)))
    for name in input_of:
        handles.append(model.get_submodule(name).register_forward_pre_hook(
            lambda module, args, name=name: inputs.setdefault(name, args[0])))
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            # timm's forward_intermediates returns forward_features' output as its final value
            final, taps, _ = forward_stages(model, image, STAGES)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training
    return _Probe(taps, outputs, inputs, final, _layout(model, outputs[1], taps[1]))


def _layout(model: nn.Module, raw: Tensor, tap: Tensor) -> Layout:
    """How `model` passes features between stages: its raw stage output against the NCHW tap."""
    if raw.dim() == 3:
        return "tokens"
    if _close(raw, tap):
        return "nchw"
    if raw.dim() == 4 and _close(raw.permute(0, 3, 1, 2), tap):
        return "nhwc"
    raise UnsupportedTeacher(f"{type(model).__name__}: stage outputs of shape {tuple(raw.shape)} "
                             f"are neither NCHW, NHWC nor tokens of the {tuple(tap.shape)} tap")


def stage_layout(model: nn.Module, input_size: Sequence[int]) -> Layout:
    """How `model` passes features between stages, read off a probe forward."""
    return _probe(model, input_size).layout


def _close(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-4)


# --------------------------------------------------------------------------------- final norm


class FinalNorm:
    """The per-position norm between the last stage and the pooling (`forward_features`' last
    step): `norm` (ViT, Swin, Mixer), `norm_pre` (ConvNeXt), none (ResNet). Applied to an NCHW
    stage-4 map it gives the teacher's final feature map, which ScaleKD and UFD mimic.

    A plain object, not an `nn.Module`: it holds teacher modules, which must never become
    parameters of a distiller.
    """

    def __init__(self, model: nn.Module, input_size: Sequence[int]):
        probe = _probe(model, input_size)
        self.layout = probe.layout
        self.norm = next((getattr(model, name) for name in ("norm", "norm_pre")
                          if isinstance(getattr(model, name, None), nn.Module)), None)
        hw = stage_info(model, input_size)[4]
        expected, _ = raw_to_grid(probe.final, self.layout, (hw.height, hw.width))
        if not _close(self(probe.taps[4]), expected):
            raise UnsupportedTeacher(f"{type(model).__name__}: its final features are not a "
                                     f"per-position norm of the last stage's output")

    def __call__(self, grid: Tensor) -> Tensor:
        if self.norm is None:
            return grid
        # Per-token norms do not care about prefix tokens, so the patch grid alone is enough.
        raw = self.norm(grid_to_raw(grid, None, self.layout))
        return raw_to_grid(raw, self.layout, tuple(grid.shape[2:]))[0]


# ------------------------------------------------------------------------------- teacher tail


def _modules_between(model: nn.Module, first: str, last: str) -> list[nn.Module]:
    """The modules that run after module `first` up to and including module `last`, for
    containers that run their children in registration order (timm's stages and blocks):
    `first`'s later siblings at each level up to the common parent, the parent's children
    between the two branches, then `last`'s branch down to `last` itself."""
    a, b = first.split("."), last.split(".")
    depth = 0
    while depth < min(len(a), len(b)) - 1 and a[depth] == b[depth]:
        depth += 1

    def children(path: list[str]) -> list[str]:
        parent = model.get_submodule(".".join(path)) if path else model
        return [name for name, _ in parent.named_children()]

    def module(path: list[str]) -> nn.Module:
        return model.get_submodule(".".join(path))

    modules = []
    for level in range(len(a) - 1, depth, -1):  # climb out of `first`'s branch
        names = children(a[:level])
        modules += [module(a[:level] + [n]) for n in names[names.index(a[level]) + 1:]]
    names = children(a[:depth])  # the common parent
    between = names[names.index(a[depth]) + 1:names.index(b[depth])]
    modules += [module(a[:depth] + [n]) for n in between]
    for level in range(depth + 1, len(b)):  # descend into `last`'s branch
        names = children(b[:level])
        modules += [module(b[:level] + [n]) for n in names[:names.index(b[level])]]
    return modules + [module(b)]


class TeacherTail:
    """The frozen teacher from the output of stage `from_stage` to its final feature map.

    `tail(grid, prefix)`: a B×C×H×W map on stage `from_stage`'s grid and channels (plus, for
    class-token models, B×P×C prefix tokens to put in front) → the B×C4×H4×W4 map the teacher
    itself would produce after its last stage and final norm. Autograd flows through it to the
    input when the caller has it on; the teacher's weights stay frozen. Used by ScaleKD
    (teacher parameter perception); the official code hard-codes this per backbone
    (`forward_specific_stage`).
    """

    def __init__(self, model: nn.Module, input_size: Sequence[int], from_stage: int = 3):
        if from_stage not in (1, 2, 3):
            raise ValueError(f"from_stage must be 1, 2 or 3, got {from_stage}")
        info = stage_info(model, input_size)
        self.from_stage = from_stage
        self.in_hw = (info[from_stage].height, info[from_stage].width)
        self.out_hw = (info[4].height, info[4].width)
        probe = _probe(model, input_size)
        self.layout = probe.layout
        self.prefix_tokens = num_prefix_tokens(model) if self.layout == "tokens" else 0
        self.modules = _modules_between(model, info[from_stage].module, info[4].module)
        self.final_norm = FinalNorm(model, input_size)
        grid, prefix = raw_to_grid(probe.outputs[from_stage], self.layout, self.in_hw)
        expected, _ = raw_to_grid(probe.final, self.layout, self.out_hw)
        with torch.no_grad():
            reproduced = self(grid, prefix)
        if not _close(reproduced, expected):
            raise UnsupportedTeacher(f"{type(model).__name__}: running {info[4].module} after "
                                     f"{info[from_stage].module} does not reproduce the teacher")

    def __call__(self, grid: Tensor, prefix: Tensor | None = None) -> Tensor:
        if self.prefix_tokens and (prefix is None or prefix.shape[1] != self.prefix_tokens):
            raise ValueError(f"this teacher needs its {self.prefix_tokens} prefix token(s)")
        x = grid_to_raw(grid, prefix, self.layout)
        for module in self.modules:
            x = module(x)
        x, _ = raw_to_grid(x, self.layout, self.out_hw)
        return self.final_norm(x)


# ------------------------------------------------------------------------ prompts at stage entries


class StageEntries:
    """Where each teacher stage begins, and a context in which its input is rewritten.

    The entry of stage s is the feature_info module right after stage s−1's tap (for s = 1, the
    first module with stage 1's reduction): `blocks.(i+1)` in a ViT/Mixer, the stage module
    itself in a ResNet (`layerN`), ConvNeXt (`stages.i`) or Swin (`layers.i`). For timm's Swin
    this is before the stage's patch merging (timm ≥ 0.9 merges at the start of a stage), where
    PAT's timm-0.6 Swin had the merging at the end of the previous stage.

    `input_shapes[s]` is the (C, H, W) grid the stage receives. Prefix tokens pass through a
    prompt untouched (timm puts them first).
    """

    def __init__(self, model: nn.Module, input_size: Sequence[int]):
        self.model = model
        info = stage_info(model, input_size)
        entries = [(e["module"], e["reduction"]) for e in feature_entries(model)]
        first = min(i for i, (_, reduction) in enumerate(entries) if reduction == info[1].reduction)
        # StageInfo.index is the position in feature_info (timm's forward_intermediates index)
        positions = {1: first} | {s: info[s - 1].index + 1 for s in STAGES[1:]}
        self.names = {s: entries[p][0] for s, p in positions.items()}
        probe = _probe(model, input_size, input_of=list(self.names.values()))
        self.layout = probe.layout
        self.input_shapes = {}
        for stage, name in self.names.items():
            hw = (info[stage].height, info[stage].width)  # token inputs keep the stage's grid
            grid, _ = raw_to_grid(probe.inputs[name], self.layout, hw)
            self.input_shapes[stage] = tuple(grid.shape[1:])

    @contextlib.contextmanager
    def prompted(self, transforms: dict[int, GridTransform]) -> Iterator[None]:
        """Within the context, stage s receives `transforms[s](its input grid)`."""
        handles = []
        try:
            for stage, transform in transforms.items():
                module = self.model.get_submodule(self.names[stage])
                hw = self.input_shapes[stage][1:]
                handles.append(module.register_forward_pre_hook(
                    lambda module, args, transform=transform, hw=hw:
                    (self._rewrite(args[0], transform, hw), *args[1:])))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _rewrite(self, raw: Tensor, transform: GridTransform, hw: tuple[int, int]) -> Tensor:
        grid, prefix = raw_to_grid(raw, self.layout, hw)
        return grid_to_raw(transform(grid), prefix, self.layout)
