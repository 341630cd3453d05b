"""Shared fixtures for the method tests: tiny student/teacher pairs of each family.

Every method test builds its distiller on these pairs and runs `two_training_steps`, which
checks the catalog's contract: a finite loss, gradients reaching the student and the method's
own modules, none reaching the teacher.
"""
from __future__ import annotations

import pytest
import timm
import torch
from timm.models.mlp_mixer import MlpMixer

from fastkd.models import Teacher

NUM_CLASSES = 10
IMG = 64
FAMILIES = ("cnn", "vit", "mlp")  # plus "convnext" and "swin" for the papers' teachers


def tiny_model(family: str, *, seed: int = 0) -> torch.nn.Module:
    """A few-hundred-k-parameter model of the family at 64 px (CNN: 4 stages down to 2×2)."""
    torch.manual_seed(seed)
    if family == "cnn":
        return timm.create_model("test_resnet", num_classes=NUM_CLASSES)
    if family == "vit":
        return timm.create_model("test_vit", num_classes=NUM_CLASSES, img_size=IMG)
    if family == "convnext":
        return timm.create_model("test_convnext", num_classes=NUM_CLASSES)
    if family == "swin":  # the papers' teacher family (ScaleKD, UFD, PAT), 4 stages down to 2×2
        return timm.create_model("swin_tiny_patch4_window7_224", embed_dim=16, depths=(1, 1, 1, 1),
                                 num_heads=(1, 2, 2, 4), window_size=2, img_size=IMG,
                                 num_classes=NUM_CLASSES)
    if family == "mlp":
        # registered mixers fix embed_dim/num_blocks, so the class is built directly
        return MlpMixer(num_classes=NUM_CLASSES, img_size=IMG, patch_size=16, num_blocks=4, embed_dim=64)
    raise ValueError(family)


def tiny_pair(student_family: str, teacher_family: str):
    """(student module, Teacher) — the teacher frozen and in eval, as the engine builds it."""
    student = tiny_model(student_family, seed=1)
    teacher_model = tiny_model(teacher_family, seed=2)
    with torch.no_grad():  # some heads start at zero (Mixer): give the teacher real opinions
        for weight in teacher_model.get_classifier().parameters():
            if weight.dim() > 1 and not weight.any():
                weight.normal_(std=0.5)
    teacher_model.eval().requires_grad_(False)
    return student, Teacher(teacher_model, amp_dtype=None)


def two_training_steps(distiller: torch.nn.Module, *, batch: int = 4, soft_labels: bool = False,
                       epoch: float = 1.0) -> dict[str, torch.Tensor]:
    """Run two SGD steps; assert finite losses, gradients on student and method modules, none
    on the teacher. Returns the last step's loss terms."""
    distiller.train()
    params = [p for p in distiller.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-3)
    images = torch.randn(batch, 3, IMG, IMG)
    labels = torch.randint(0, NUM_CLASSES, (batch,))
    if soft_labels:
        labels = torch.softmax(torch.randn(batch, NUM_CLASSES), dim=-1)
    indices = torch.arange(batch)
    terms = {}
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        logits, terms = distiller(images, labels, epoch=epoch, indices=indices)
        assert logits.shape == (batch, NUM_CLASSES)
        assert terms, "a distiller must return at least one loss term"
        loss = sum(terms.values())
        for name, value in terms.items():
            assert value.dim() == 0 and torch.isfinite(value), f"{name} = {value}"
        loss.backward()
        optimizer.step()
    student_ids = {id(p) for p in distiller.student.parameters()}
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in distiller.student.parameters()), \
        "no gradient reached the student"
    extra = [p for p in params if id(p) not in student_ids]
    if extra:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in extra), \
            "no gradient reached the method's own modules"
    teacher = getattr(distiller, "teacher", None)
    if teacher is not None:
        assert all(p.grad is None for p in teacher.model.parameters()), "a gradient reached the teacher"
        assert not teacher.model.training, "the teacher left eval mode"
        assert not any(p is q for p in teacher.model.parameters() for q in distiller.parameters())
    return terms


@pytest.fixture
def pair():
    return tiny_pair
