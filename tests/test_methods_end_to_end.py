"""Every registered method through the real `fastkd train` path: config → build (teacher,
distiller with the training input size, dataset size for CRD) → bf16 channels_last steps →
evaluation → checkpoint. The method tests check the maths on tiny pairs; this checks the
plumbing the engine adds around each method."""
from __future__ import annotations

import pytest
import torch

from fastkd.checkpoint import load_checkpoint
from fastkd.config import load_config
from fastkd.distillers import DISTILLERS
from fastkd.engine import train

from run_helpers import make_image_folder, teacher_checkpoint, write_config

# The ViT-only method gets a ViT student; every other one a CNN student under a ViT teacher
# (the heterogeneous case the catalog exists for).
VIT_STUDENT = {"vitkd"}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("methods")
    make_image_folder(root / "data")
    return root, teacher_checkpoint(root)


@pytest.mark.parametrize("method", sorted(DISTILLERS))
def test_method_trains_through_the_engine(method, workspace, tmp_path):
    root, teacher = workspace
    (tmp_path / "data").symlink_to(root / "data")
    model = ({"name": "test_vit", "kwargs": {"img_size": 32}} if method in VIT_STUDENT
             else {"name": "test_resnet"})
    needs_teacher = DISTILLERS[method].needs.teacher
    sections = dict(model=model, distill={"method": method},
                    train={"epochs": 1, "max_steps_per_epoch": 2, "amp": "bf16",
                           "channels_last": True})
    if needs_teacher:
        sections["teacher"] = {"name": "test_vit", "checkpoint": str(teacher),
                               "kwargs": {"img_size": 32}}
    result = train(load_config(write_config(tmp_path, **sections)))
    loss_terms = {k: v for k, v in result.metrics.items() if k.startswith("loss_")}
    assert loss_terms and all(torch.isfinite(torch.tensor(float(v))) for v in loss_terms.values())
    assert 0.0 <= result.final_top1 <= 100.0
    saved = load_checkpoint(result.run_dir / "last.pt")["distiller"]
    assert not any(key.startswith("teacher") for key in saved)
