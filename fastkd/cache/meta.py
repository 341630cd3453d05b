"""Models built on PyTorch's meta device: their architecture, no weights and no memory.

A cached run builds no teacher network, yet distillers shape their projectors from the
teacher's stage channels and grids (`stage_info`, `pooled_dim`). A meta-device copy answers
those questions exactly (shape propagation through the real forward) for free; it cannot
compute anything, so a method that would call it at a step is refused as not cacheable.
"""
from __future__ import annotations

import timm
import torch
from torch import nn

from fastkd.config import Config
from fastkd.models import freeze, model_data_config


def meta_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)


def student_data_config(cfg: Config, num_classes: int) -> dict:
    """The student's timm data config (input size, mean/std, ...) without building it."""
    return model_data_config(meta_model(cfg.model.name, num_classes, **cfg.model.kwargs))


def teacher_architecture(cfg: Config, num_classes: int) -> nn.Module:
    """The teacher's architecture on the meta device, frozen like the real one."""
    return freeze(meta_model(cfg.teacher.name, num_classes, **cfg.teacher.kwargs))
