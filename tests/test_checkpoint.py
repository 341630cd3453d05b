"""Checkpoint contents and files: weights_only loading, no teacher weights, RNG round trip,
atomic writes, the resume-override policy, the student export (EMA included)."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import timm
import torch
from timm.utils import ModelEmaV3

from fastkd.checkpoint import (TrainPosition, atomic_save, capture_rng_state, export_student,
                               keep_global_batch, load_checkpoint, make_checkpoint,
                               restore_rng_state, resume_config, student_state_dict)
from fastkd.config import Config, ConfigError, config_to_dict, load_config
from fastkd.distillers.base import Vanilla
from fastkd.models import Teacher


class WithProjector(Vanilla):
    """A method with a trainable part of its own, and a teacher."""
    name = "projector_test"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.projector = torch.nn.Linear(4, 4)


def tiny_distiller() -> WithProjector:
    student = timm.create_model("test_resnet", num_classes=4)
    teacher = Teacher(timm.create_model("test_vit", num_classes=4, img_size=32), amp_dtype=None)
    return WithProjector(student, teacher, None, num_classes=4)


def checkpoint_of(distiller, *, ema: bool = False) -> dict:
    optimizer = torch.optim.SGD(distiller.parameters(), lr=0.1, momentum=0.9)
    distiller(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))[1]["loss_gt"].backward()
    optimizer.step()
    return make_checkpoint(
        distiller=distiller, optimizer=optimizer, scheduler=None, scaler=None,
        ema=ModelEmaV3(distiller.student, decay=0.5) if ema else None,
        position=TrainPosition(epoch=2, batch=3, global_step=7, best_top1=50.0, best_epoch=1),
        config=config_to_dict(load_config(None)), rng_states=[capture_rng_state()],
        epoch_meters={"loss_gt": torch.tensor(1.5), "_steps": torch.tensor(3)},
        student_info={"architecture": "test_resnet", "num_classes": 4, "model_kwargs": {}})


def test_checkpoint_holds_student_and_method_parts_but_no_teacher(tmp_path):
    distiller = tiny_distiller()
    atomic_save(checkpoint_of(distiller, ema=True), tmp_path / "last.pt")
    loaded = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=True)
    keys = set(loaded["distiller"])
    assert {"projector.weight", "projector.bias"} <= keys
    assert all(k.startswith(("student.", "projector.")) for k in keys)
    assert len(keys) == len(distiller.student.state_dict()) + 2, "teacher weights leaked in"
    assert loaded["optimizer"]["state"], "momentum buffers are saved"
    assert loaded["position"]["global_step"] == 7 and loaded["ema"] is not None
    assert load_checkpoint(tmp_path / "last.pt")["position"]["batch"] == 3


def test_load_checkpoint_rejects_foreign_files(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a fastkd checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


def test_atomic_save_keeps_the_previous_file_when_writing_fails(tmp_path):
    path = tmp_path / "last.pt"
    atomic_save({"version": 1, "value": torch.tensor(1)}, path)
    with pytest.raises(Exception):
        atomic_save({"unpicklable": lambda: None}, path)
    assert torch.load(path, weights_only=True)["value"].item() == 1
    assert not path.with_name("last.pt.tmp").exists(), "the failed write left its temporary file"


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    atomic_save({"rng": capture_rng_state()}, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert expected[:2] == again[:2] and torch.equal(expected[2], again[2])


def test_resume_allows_only_harmless_overrides():
    saved = config_to_dict(load_config(None, ["output.name=a", "output.dir=runs"]))
    longer = resume_config(saved, load_config(None, ["train.epochs=5", "output.name=other",
                                                     "data.num_workers=1"]))
    assert longer.train.epochs == 5 and longer.output.name == "a" and longer.output.dir == "runs"
    with pytest.raises(ConfigError, match="optim.lr") as error:
        resume_config(saved, load_config(None, ["optim.lr=0.3", "train.batch_size=7"]))
    assert "train.batch_size" in str(error.value) and "train.epochs" in str(error.value)
    with pytest.raises(ConfigError, match="distill.params"):
        resume_config(saved, load_config(None, ["distill.params={temperature: 2}"]))


def test_export_writes_student_or_ema_weights_loadable_by_timm(tmp_path):
    from safetensors.torch import load_file
    distiller = tiny_distiller()
    checkpoint = checkpoint_of(distiller, ema=True)
    with torch.no_grad():   # make the EMA differ from the student
        for value in checkpoint["ema"].values():
            if value.is_floating_point():
                value.add_(1.0)
    atomic_save(checkpoint, tmp_path / "last.pt")
    for ema in (False, True):
        export_student(tmp_path / "last.pt", tmp_path, ema=ema)
        weights = load_file(tmp_path / "student.safetensors")
        model = timm.create_model("test_resnet", num_classes=4)
        model.load_state_dict(weights, strict=True)
        expected = student_state_dict(checkpoint, ema=ema)
        assert all(torch.equal(weights[k], expected[k]) for k in expected)
        info = json.loads((tmp_path / "student.json").read_text())
        assert info["weights"] == ("ema" if ema else "student") and info["num_classes"] == 4
        assert info["epochs_completed"] == 1 and info["batches_into_next_epoch"] == 3
    assert not torch.equal(student_state_dict(checkpoint)["fc.weight"],
                           student_state_dict(checkpoint, ema=True)["fc.weight"])
    atomic_save(checkpoint_of(tiny_distiller()), tmp_path / "no_ema.pt")
    with pytest.raises(ConfigError, match="no EMA"):
        export_student(tmp_path / "no_ema.pt", tmp_path, ema=True)


def test_other_world_size_resumes_at_epoch_boundaries_only(tmp_path):
    from fastkd.engine import train
    from run_helpers import make_image_folder, write_config
    make_image_folder(tmp_path / "data")
    cfg = load_config(write_config(tmp_path, train={"epochs": 1, "max_steps_per_epoch": 2}))
    run_dir = train(cfg).run_dir
    checkpoint = load_checkpoint(run_dir / "last.pt")
    checkpoint["rng"] = checkpoint["rng"] * 2               # as if written by 2 processes
    atomic_save(checkpoint, run_dir / "last.pt")
    result = train(load_config(run_dir / "config.yaml", ["train.epochs=2"]), resume=run_dir)
    # the recorded global batch (2 x 8) is kept on 1 process, and with it the LR
    resumed = load_checkpoint(run_dir / "last.pt")
    assert resumed["config"]["train"]["batch_size"] == 16
    assert resumed["position"]["global_step"] == 4
    assert len(resumed["rng"]) == 1 and len(resumed["ranks"]) == 1
    env = json.loads((run_dir / "env.json").read_text())
    assert (env["global_batch"], env["resumes"][-1]["global_batch"]) == (8, 16)
    assert env["resumes"][-1]["lr"] == env["lr"]
    assert "per-process batch 8 -> 16, so the global batch 16" in (run_dir / "log.txt").read_text()
    assert result.final_top1 is not None

    checkpoint = load_checkpoint(run_dir / "last.pt")
    checkpoint["rng"] = checkpoint["rng"] * 2
    checkpoint["position"].update(epoch=2, batch=1)
    atomic_save(checkpoint, run_dir / "last.pt")
    with pytest.raises(ConfigError, match="same number of processes"):
        train(load_config(run_dir / "config.yaml"), resume=run_dir)


def test_a_global_batch_that_does_not_split_names_the_world_sizes_that_do():
    cfg = Config()
    checkpoint = {"rng": [{}] * 2, "config": {"train": {"batch_size": 6}}}
    assert keep_global_batch(cfg, checkpoint, 4).train.batch_size == 3
    assert keep_global_batch(cfg, checkpoint, 2) is cfg
    with pytest.raises(ConfigError, match="12 .* over 5 processes; resume it on 1, 2, 3, 4, 6, 12"):
        keep_global_batch(cfg, checkpoint, 5)


def test_cuda_rng_state_is_this_devices_only(monkeypatch):
    """Only the current GPU's generator is saved and restored: a run started with 8 GPUs
    visible must resume where fewer are (restoring 8 states would address missing devices)."""
    own, calls = torch.arange(16, dtype=torch.uint8), []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": own.clone())
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [own.clone() for _ in range(8)])
    monkeypatch.setattr(torch.cuda, "set_rng_state",
                        lambda state, device="cuda": calls.append(("one", state)))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: calls.append(("all", states)))
    state = capture_rng_state()
    assert torch.equal(state["cuda"], own)
    restore_rng_state(state)
    assert len(calls) == 1 and calls[0][0] == "one" and torch.equal(calls[0][1], own)


# ------------------------------------------------------------------------------ damaged files


def _trained_run(tmp_path):
    from fastkd.config import load_config
    from fastkd.engine import train
    from run_helpers import make_image_folder, write_config
    make_image_folder(tmp_path / "data")
    return train(load_config(write_config(tmp_path, train={"epochs": 2}))).run_dir


def test_a_flipped_byte_in_last_pt_is_refused_with_exit_2_naming_the_fallbacks(tmp_path, capsys):
    from fastkd.cli import main
    run_dir = _trained_run(tmp_path)
    assert (run_dir / "previous.pt").is_file()          # the checkpoint before the last one
    data = bytearray((run_dir / "last.pt").read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    (run_dir / "last.pt").write_bytes(bytes(data))
    assert main(["train", "--resume", str(run_dir), "train.epochs=3"]) == 2
    err = capsys.readouterr().err
    assert "damaged" in err and "previous.pt" in err and "best.pt" in err
    assert "Traceback" not in err
    assert main(["export", str(run_dir)]) == 2
    (run_dir / "last.pt").write_bytes(bytes(data[:1000]))      # truncated, checksum aside
    (run_dir / "last.pt.sha256").unlink()
    assert main(["eval", str(run_dir)]) == 2
    assert "cannot be read as a checkpoint" in capsys.readouterr().err


def test_non_finite_weights_are_refused_on_resume(tmp_path, capsys):
    from fastkd.cli import main
    run_dir = _trained_run(tmp_path)
    checkpoint = torch.load(run_dir / "last.pt", weights_only=True)
    name = next(k for k, v in checkpoint["distiller"].items() if v.is_floating_point())
    checkpoint["distiller"][name].fill_(float("nan"))
    from fastkd.checkpoint import atomic_save
    atomic_save(checkpoint, run_dir / "last.pt")
    assert main(["train", "--resume", str(run_dir), "train.epochs=3"]) == 2
    assert "non-finite weights" in capsys.readouterr().err


def test_the_export_loads_as_timm_loads_its_own_models(tmp_path):
    """`RUN/timm/` is what `timm.models.save_for_hf` writes: `timm.create_model("local-dir:...")`
    rebuilds the student (its kwargs and class count included) with the trained weights."""
    import timm
    from safetensors.torch import load_file
    run_dir = _trained_run(tmp_path)
    model = timm.create_model(f"local-dir:{run_dir / 'timm'}", pretrained=True).eval()
    reference = timm.create_model("test_resnet", num_classes=4).eval()
    reference.load_state_dict(load_file(run_dir / "student.safetensors"), strict=True)
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(images), reference(images))
    assert (run_dir / "timm" / "student.json").is_file()
