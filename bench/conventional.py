"""The conventional KD training loop: what users run today with timm's `train.py` or the
research repositories (OFA-KD, mdistiller, cls_KD), written as a careful user would write it.

torchvision `ImageFolder` + PIL `RandomResizedCrop`/flip/`ToTensor`/`Normalize` in a
`DataLoader` with one worker per core, persistent workers, pinned memory on a GPU and
`non_blocking` copies; NCHW models; `torch.autocast`; the teacher online under `no_grad`; the
KD loss in eager PyTorch (Hinton et al. 2015: KL at temperature T, scaled by T²); timm's SGD.
The models are the same timm models fastkd trains, built the same way: only the loop differs.
It is the baseline of `fastkd bench e2e`, not a strawman.
"""
from __future__ import annotations

from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2


class ConventionalLoop:
    """`batches()` yields (images, labels) forever (epoch after epoch); `step()` trains on one."""

    kind = "torchvision DataLoader"

    def __init__(self, root: Path, *, student: str, teacher: str, num_classes: int,
                 img_size: int, batch_size: int, workers: int, device: torch.device,
                 amp_dtype: torch.dtype | None, lr: float = 0.1, temperature: float = 4.0,
                 student_kwargs: dict | None = None, teacher_kwargs: dict | None = None):
        from torch.utils.data import DataLoader
        from torchvision import datasets, transforms

        self.device, self.amp_dtype, self.temperature = device, amp_dtype, temperature
        self.student = timm.create_model(student, num_classes=num_classes,
                                         **(student_kwargs or {})).to(device).train()
        self.teacher = timm.create_model(teacher, num_classes=num_classes,
                                         **(teacher_kwargs or {})).to(device).eval()
        self.teacher.requires_grad_(False)
        config = timm.data.resolve_data_config({}, model=self.student)
        transform = transforms.Compose([
            transforms.RandomResizedCrop(img_size), transforms.RandomHorizontalFlip(),
            transforms.ToTensor(), transforms.Normalize(config["mean"], config["std"])])
        self.loader = DataLoader(
            datasets.ImageFolder(str(Path(root) / "train"), transform), batch_size=batch_size,
            shuffle=True, drop_last=True, num_workers=workers, pin_memory=device.type == "cuda",
            persistent_workers=workers > 0)
        self.optimizer = create_optimizer_v2(self.student, "sgd", lr=lr, weight_decay=1e-4,
                                             momentum=0.9)

    def batches(self):
        while True:
            yield from self.loader

    def kd_loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        return F.kl_div(F.log_softmax(student_logits / t, dim=1),
                        F.softmax(teacher_logits / t, dim=1), reduction="batchmean") * t * t

    def step(self, batch) -> None:
        images, labels = batch
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.amp_dtype,
                            enabled=self.amp_dtype is not None):
            logits = self.student(images)
            with torch.no_grad():
                teacher_logits = self.teacher(images)
            loss = F.cross_entropy(logits, labels) + self.kd_loss(logits.float(),
                                                                  teacher_logits.float())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

