"""Reading weight files: the checkpoint layouts of timm, torchvision, DeiT, OFA-KD and
mmpretrain-style trainers, wrapper prefixes, and strict loading with readable errors (a
classifier of the wrong size above all: a teacher with a random head teaches noise)."""
from __future__ import annotations

import argparse
import pickle
import warnings
from pathlib import Path

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


def _classifier_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the classifier(s) that `get_classifier()` returns (a tuple for
    distilled DeiT, whose second head is `head_dist`)."""
    heads = model.get_classifier()
    heads = heads if isinstance(heads, tuple) else (heads,)
    names = [name for name, module in model.named_modules() if any(module is h for h in heads)]
    return {key for key in model.state_dict() for name in names if key.startswith(name + ".")}


def load_weights(model: nn.Module, state: dict[str, Tensor], path, *, reset_head: bool) -> None:
    """Strict loading with readable errors. A head of the wrong size raises
    `TeacherHeadMismatch`, or with `reset_head` keeps the model's fresh head."""
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
