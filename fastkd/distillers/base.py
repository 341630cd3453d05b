"""The distiller contract (mdistiller's shape, with the teacher kept outside the module).

A distiller is an `nn.Module` that holds the student and the method's own trainable parts
(projectors, generators, prompts). The frozen teacher is held as a plain attribute, not a
submodule: it never enters DDP, the optimizer or a checkpoint. `forward` returns the student
logits and a dict of named loss terms with their weights already applied; the engine sums the
terms and logs each one, and knows no method names.

Each method declares what it needs (`Needs`) so that the engine, the teacher cache and
`fastkd methods` can reason about it without running it, and its hyper-parameters as a
dataclass `Params` whose defaults are the paper's (validated from `distill.params` with the
same strict rules as the rest of the config).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fastkd.projectors import common_input_size


@dataclass(frozen=True)
class Needs:
    """What a method reads from the forward passes; the engine and the cache rely on it."""
    teacher: bool = True                 # False: self-distillation, no teacher is built
    teacher_logits: bool = True
    student_stages: tuple[int, ...] = ()  # stage numbers 1..4 tapped on the student
    teacher_stages: tuple[int, ...] = ()
    student_pooled: bool = False          # penultimate (pre-logits) features
    teacher_pooled: bool = False
    teacher_graph: bool = False           # gradients must flow through the frozen teacher
    cacheable: bool = True                # teacher outputs can be replayed from a teacher cache
    indices: bool = False                 # reads dataset indices (CRD's memory bank)


class UnsupportedPair(ValueError):
    """This method cannot serve this student/teacher pairing; raised at start-up."""


@dataclass(frozen=True)
class NoParams:
    pass


class Distiller(nn.Module):
    """Base class. Subclasses set the class attributes and implement `forward`.

    `epoch` passed to `forward` is the 1-based epoch number (fractional within an epoch:
    epoch 1.5 = half-way through the first epoch), the convention of mdistiller's warm-up
    `min(epoch / warmup, 1)`.
    """
    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    needs: ClassVar[Needs] = Needs()
    Params: ClassVar[type] = NoParams
    # families ('cnn', 'vit', 'mlp') the method supports; None = any
    student_families: ClassVar[tuple[str, ...] | None] = None
    teacher_families: ClassVar[tuple[str, ...] | None] = None
    # DDP must look for parameters a step did not use (costs a graph walk); True only for a
    # method whose parts are not all used on every step
    find_unused_parameters: ClassVar[bool] = False

    def __init__(self, student: nn.Module, teacher, params, *, num_classes: int,
                 gt_weight: float = 1.0, label_smoothing: float = 0.0,
                 input_size: tuple[int, int, int] | None = None):
        super().__init__()
        self.input_size = None if input_size is None else tuple(input_size)
        self.student = student
        # Not a submodule on purpose: the teacher stays out of DDP, optimizers and checkpoints.
        object.__setattr__(self, "teacher", teacher)
        self.params = params
        self.num_classes = num_classes
        self.gt_weight = gt_weight
        self.label_smoothing = label_smoothing

    def probe_size(self) -> tuple[int, int, int]:
        """(C, H, W) at which projectors are shaped: the training input size when the engine
        gives it, else the size both models accept (`projectors.common_input_size`)."""
        if self.input_size is not None:
            return self.input_size
        return common_input_size(self.student, self.teacher.model if self.teacher else self.student)

    @classmethod
    def needs_for(cls, params) -> Needs:
        """What the method reads with these parameters (the teacher cache stores exactly
        that); the class's `needs` unless a parameter changes it (FitNet's stages)."""
        return cls.needs

    @classmethod
    def check_pair(cls, student_family: str, teacher_family: str | None) -> None:
        """Raise UnsupportedPair when this method cannot serve the pairing."""
        if cls.student_families is not None and student_family not in cls.student_families:
            raise UnsupportedPair(f"method '{cls.name}' supports {', '.join(cls.student_families)} "
                                  f"students, not a {student_family} student")
        if (teacher_family is not None and cls.teacher_families is not None
                and teacher_family not in cls.teacher_families):
            raise UnsupportedPair(f"method '{cls.name}' supports {', '.join(cls.teacher_families)} "
                                  f"teachers, not a {teacher_family} teacher")

    def gt_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Ground-truth cross-entropy: hard labels (with label smoothing) or soft mixup targets."""
        logits = logits.float()
        if labels.dim() == 2:
            return torch.sum(-labels * F.log_softmax(logits, dim=-1), dim=-1).mean()
        return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)

    @staticmethod
    def hard_target(labels: Tensor) -> Tensor:
        """Integer targets: soft (mixup/cutmix) labels map to their argmax (as OFAKD's
        `OFA.forward` builds its target mask: `one_hot(label.argmax(-1))`)."""
        return labels.argmax(dim=-1) if labels.dim() == 2 else labels

    def gt_term(self, logits: Tensor, labels: Tensor, weight: float | None = None) -> dict[str, Tensor]:
        """`{"loss_gt": w·CE}` or nothing when the weight is 0."""
        weight = self.gt_weight if weight is None else weight
        return {"loss_gt": weight * self.gt_loss(logits, labels)} if weight else {}

    def forward(self, images: Tensor, labels: Tensor, *, epoch: float = 1.0,
                indices: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def extra_parameter_count(self) -> int:
        """Trainable parameters that belong to the method, not to the student (for the log)."""
        student = {id(p) for p in self.student.parameters()}
        return sum(p.numel() for p in self.parameters() if id(p) not in student and p.requires_grad)


class LogitDistiller(Distiller):
    """A method that reads only the two models' logits (KD, DKD, NKD, WSLD, DIST, BKD).

    One student forward, the teacher's logits, and the terms `loss_gt` and `loss_kd`; a
    subclass gives only `kd_term`, its weighted distillation term (warm-ups included).
    """
    needs = Needs(teacher=True, teacher_logits=True, cacheable=True)

    def kd_term(self, logits: Tensor, teacher_logits: Tensor, labels: Tensor,
                epoch: float) -> Tensor:
        raise NotImplementedError

    def forward(self, images, labels, *, epoch=1.0, indices=None):
        logits = self.student(images)
        teacher_logits = self.teacher.logits(images)
        return logits, {**self.gt_term(logits, labels),
                        "loss_kd": self.kd_term(logits, teacher_logits, labels, epoch)}


class Vanilla(Distiller):
    """The student alone, trained on the ground truth (the `none` method)."""
    name = "none"
    paper = "— (baseline: the student trained alone)"
    needs = Needs(teacher=False, teacher_logits=False)

    def forward(self, images, labels, *, epoch=1.0, indices=None):
        logits = self.student(images)
        return logits, self.gt_term(logits, labels)
