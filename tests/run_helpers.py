"""Tiny end-to-end runs shared by the engine, checkpoint, resume, CLI and DDP tests: an
ImageFolder of a few dozen JPEGs and a config that trains on it in seconds on a CPU."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import timm
import torch
import yaml
from PIL import Image

from fastkd.distillers.base import Vanilla

NUM_CLASSES = 4
TRAIN_PER_CLASS = 8          # 32 train images: 4 steps of 8
VAL_COUNTS = (4, 3, 3, 3)    # 13 val images: an odd count, so 2 ranks need one padded sample
TESTS_DIR = Path(__file__).resolve().parent   # on sys.path of the worker scripts of DDP tests


def make_image_folder(root: Path) -> Path:
    """Tiny JPEGs whose class is visible in the colour, so a few steps learn something."""
    rng = np.random.default_rng(0)
    for split, counts in (("train", (TRAIN_PER_CLASS,) * NUM_CLASSES), ("val", VAL_COUNTS)):
        for c, count in enumerate(counts):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                image = np.zeros((36, 44, 3), np.float64)
                image[..., c % 3] = 70 + 45 * c
                image += rng.integers(0, 70, image.shape)
                Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.jpg")
    return root


def tiny_config(tmp_path: Path, **sections) -> dict:
    """A config dict for a CPU run of seconds; `sections` are merged per section."""
    cfg = {
        "data": {"root": str(tmp_path / "data"), "loader": "torch", "num_workers": 0,
                 "img_size": 32},
        "model": {"name": "test_resnet"},
        "distill": {"method": "none"},
        "optim": {"opt": "sgd", "lr": 0.05},
        "train": {"epochs": 2, "batch_size": 8, "amp": "fp32", "channels_last": False,
                  "log_interval": 2, "seed": 0},
        "output": {"dir": str(tmp_path / "runs"), "name": "run", "tensorboard": False},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def write_config(tmp_path: Path, **sections) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path, **sections)))
    return path


def teacher_checkpoint(tmp_path: Path) -> Path:
    """A tiny ViT teacher (another family than the CNN student), saved as a state dict."""
    torch.manual_seed(3)
    model = timm.create_model("test_vit", num_classes=NUM_CLASSES, img_size=32)
    path = tmp_path / "teacher.pth"
    torch.save(model.state_dict(), path)
    return path


def read_summary(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "summary.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def assert_student_loads_into_timm(run_dir: Path, name: str = "test_resnet", **kwargs) -> None:
    from safetensors.torch import load_file
    model = timm.create_model(name, num_classes=NUM_CLASSES, **kwargs)
    model.load_state_dict(load_file(run_dir / "student.safetensors"), strict=True)


class StepHookMethod(Vanilla):
    """The student alone, with a hook called at every forward with its 1-based number: the
    base of the test methods that misbehave at a chosen step (NaN terms, a killed rank)."""
    name = "step_hook_test"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0

    def forward(self, images, labels, *, epoch=1.0, indices=None):
        logits, terms = super().forward(images, labels, epoch=epoch, indices=indices)
        self.calls += 1
        return logits, self.at_step(self.calls, logits, terms)

    def at_step(self, step: int, logits, terms: dict) -> dict:
        return terms
