"""The engine end to end on tiny models and a generated ImageFolder: train, evaluate,
checkpoint, export, the non-finite guard, start-up errors.

The helpers shared with the other engine-side tests live in `run_helpers.py`
(test_checkpoint, test_resume, test_cli, test_distributed import them from there).
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from fastkd.checkpoint import load_checkpoint, student_state_dict
from fastkd.config import ConfigError, load_config
from fastkd.distillers import DISTILLERS, UnsupportedPair
from fastkd.distillers.base import Vanilla
from fastkd.engine import NonFiniteLoss, RunResult, evaluate_config, top_k_hits, train

from run_helpers import (StepHookMethod, assert_student_loads_into_timm, make_image_folder,
                         read_summary, teacher_checkpoint, write_config)


@pytest.fixture
def data_dir(tmp_path) -> Path:
    return make_image_folder(tmp_path / "data")


def run(tmp_path: Path, overrides: list[str] = (), **sections) -> RunResult:
    return train(load_config(write_config(tmp_path, **sections), list(overrides)))


# ------------------------------------------------------------------------------ round trips


def test_train_eval_export_round_trip(tmp_path, data_dir):
    result = run(tmp_path, train={"ema": True, "ema_decay": 0.5}, output={"tensorboard": True})
    run_dir = result.run_dir
    for name in ("config.yaml", "env.json", "summary.csv", "log.txt", "last.pt", "best.pt",
                 "student.safetensors", "student.json"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tensorboard").iterdir()), "no TensorBoard events"
    # config.yaml is a valid config that reproduces the run
    assert load_config(run_dir / "config.yaml").output.name == "run"

    rows = (run_dir / "summary.csv").read_text().splitlines()
    header = rows[0].split(",")
    for column in ("epoch", "loss_gt", "train_loss", "eval_top1", "eval_top5", "ema_top1",
                   "ema_top5", "lr", "img_per_sec", "data_wait", "epoch_seconds"):
        assert column in header
    assert len(rows) == 3
    assert result.final_top1 == result.metrics["eval_top1"]
    # 13 validation images: every top-1 is a whole number of them
    assert math.isclose(result.final_top1 * 13 / 100, round(result.final_top1 * 13 / 100), abs_tol=1e-6)

    checkpoint = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
    assert checkpoint["position"]["epoch"] == 3 and checkpoint["position"]["batch"] == 0
    assert checkpoint["position"]["global_step"] == 8
    assert checkpoint["ema"] is not None and checkpoint["config"]["model"]["name"] == "test_resnet"
    assert_student_loads_into_timm(run_dir)

    # the export equals the trained student; eval of the run dir reproduces the final metric
    final = {k: v for k, v in result.student.state_dict().items()}
    exported = student_state_dict(checkpoint)
    assert all(torch.equal(final[k], exported[k]) for k in final)
    metrics = evaluate_config(load_config(run_dir / "config.yaml"), run_dir / "last.pt")
    assert metrics["eval_top1"] == pytest.approx(result.final_top1)
    assert metrics["ema_top1"] == pytest.approx(result.metrics["ema_top1"])
    from_safetensors = evaluate_config(load_config(run_dir / "config.yaml"),
                                       run_dir / "student.safetensors")
    assert from_safetensors["eval_top1"] == pytest.approx(result.final_top1)


def test_kd_from_vit_teacher_keeps_teacher_out_of_checkpoint(tmp_path, data_dir):
    teacher = teacher_checkpoint(tmp_path)
    result = run(tmp_path, distill={"method": "kd", "params": {"temperature": 4.0}},
                 teacher={"name": "test_vit", "checkpoint": str(teacher),
                          "kwargs": {"img_size": 32}},
                 train={"amp": "bf16", "channels_last": True, "clip_grad": 5.0, "epochs": 1})
    assert {"loss_gt", "loss_kd"} <= set(result.metrics)
    checkpoint = load_checkpoint(result.run_dir / "last.pt")
    teacher_keys = set(torch.load(teacher, weights_only=True))
    saved = set(checkpoint["distiller"])
    assert all(key.startswith("student.") for key in saved), "only student keys for plain KD"
    assert not saved & teacher_keys and not any("teacher" in key for key in saved)
    n_student = len(result.student.state_dict())
    optimized = sum(len(group["params"]) for group in checkpoint["optimizer"]["param_groups"])
    assert optimized == sum(1 for p in result.student.parameters() if p.requires_grad)
    assert n_student == len(saved)
    assert_student_loads_into_timm(result.run_dir)


def test_fp16_with_grad_scaler_trains(tmp_path, data_dir):
    result = run(tmp_path, train={"amp": "fp16", "epochs": 1, "clip_grad": 1.0,
                                  "max_steps_per_epoch": 2})
    checkpoint = load_checkpoint(result.run_dir / "last.pt")
    assert checkpoint["scaler"] is not None and checkpoint["position"]["global_step"] == 2


def test_lr_rule_and_epoch_schedule(tmp_path, data_dir):
    result = run(tmp_path, optim={"lr": None, "lr_base": 0.1, "lr_base_size": 256},
                 sched={"step_on_epochs": True, "sched": "step", "decay_epochs": 1,
                        "decay_rate": 0.5}, train={"max_steps_per_epoch": 1})
    env = yaml.safe_load((result.run_dir / "env.json").read_text())
    assert env["lr"] == pytest.approx(0.1 * 8 / 256) and "lr_base" in env["lr_rule"]
    lrs = [float(row["lr"]) for row in read_summary(result.run_dir)]
    assert lrs == pytest.approx([0.1 * 8 / 256, 0.1 * 8 / 256 * 0.5])


# ------------------------------------------------------------------------------ metrics


def test_top_k_hits_excludes_padding_and_reads_soft_labels():
    logits = torch.tensor([[5.0, 1, 0, 0, 0, 0], [0, 5.0, 1, 0, 0, 0], [0, 0, 5.0, 0, 0, 0]])
    labels = torch.tensor([0, 2, 0])
    indices = torch.tensor([7, 8, -1])   # the third sample is padding
    assert top_k_hits(logits, labels, indices).tolist() == [1, 2, 2]
    soft = torch.nn.functional.one_hot(labels, 6).float()
    assert top_k_hits(logits, soft, indices).tolist() == [1, 2, 2]


# ------------------------------------------------------------------------------ non-finite guard


class FlakyLoss(StepHookMethod):
    """The student alone plus a term that is NaN for the first `bad_steps` calls."""
    name = "flaky_test"
    bad_steps = 0

    def at_step(self, step, logits, terms):
        value = float("nan") if step <= self.bad_steps else 0.0
        return {**terms, "loss_flaky": torch.tensor(value, device=logits.device)}


@pytest.fixture
def flaky(monkeypatch):
    monkeypatch.setitem(DISTILLERS, FlakyLoss.name, FlakyLoss)
    return FlakyLoss


def test_nonfinite_steps_are_skipped_without_touching_weights(tmp_path, data_dir, flaky, monkeypatch):
    monkeypatch.setattr(flaky, "bad_steps", 4)      # the whole first epoch
    result = run(tmp_path, distill={"method": "flaky_test"},
                 train={"max_nonfinite": 5, "epochs": 1})
    assert result.metrics["skipped_steps"] == 4
    assert "4 of the 4 steps" in result.warning and "warning:" in (result.run_dir / "log.txt").read_text()
    checkpoint = load_checkpoint(result.run_dir / "last.pt")
    buffers = [state["momentum_buffer"] for state in checkpoint["optimizer"]["state"].values()]
    assert buffers and all(not b.any() for b in buffers), "a skipped step reached the optimizer"


def test_nonfinite_streak_stops_the_run_naming_the_term(tmp_path, data_dir, flaky, monkeypatch):
    monkeypatch.setattr(flaky, "bad_steps", 100)
    with pytest.raises(NonFiniteLoss, match="loss_flaky") as error:
        run(tmp_path, distill={"method": "flaky_test"}, train={"max_nonfinite": 3})
    # read at the logging steps (every 2 here): the streak of 3 is seen at step 4
    assert "loss_flaky for 4 consecutive steps (by epoch 1, step 4)" in str(error.value)


def test_nonfinite_skips_reset_by_a_finite_step(tmp_path, data_dir, flaky, monkeypatch):
    monkeypatch.setattr(flaky, "bad_steps", 2)
    result = run(tmp_path, distill={"method": "flaky_test"},
                 train={"max_nonfinite": 3, "epochs": 1})
    assert result.metrics["skipped_steps"] == 2 and result.metrics["loss_flaky"] == 0.0


# ------------------------------------------------------------------------------ start-up errors


def test_a_teacher_cache_that_cannot_serve_is_refused_before_any_work(tmp_path, data_dir):
    from fastkd.cache import CacheError
    kd = {"distill": {"method": "kd"}, "teacher": {"name": "test_vit", "kwargs": {"img_size": 32}}}
    with pytest.raises(ConfigError, match="uses no teacher"):
        run(tmp_path, cache={"dir": str(tmp_path / "cache")})
    with pytest.raises(ConfigError, match="data.mixup"):
        run(tmp_path, cache={"dir": str(tmp_path / "cache")}, data={"mixup": 0.8}, **kd)
    with pytest.raises(CacheError, match="no teacher cache"):
        run(tmp_path, cache={"dir": str(tmp_path / "cache")}, **kd)
    assert not (tmp_path / "runs").exists()


def test_method_without_teacher_name_is_a_config_error(tmp_path, data_dir):
    with pytest.raises(ConfigError, match="needs a teacher"):
        run(tmp_path, distill={"method": "kd"})


def test_unsupported_pair_is_raised_at_start(tmp_path, data_dir, monkeypatch):
    class VitStudentsOnly(Vanilla):
        name = "vit_only_test"
        student_families = ("vit",)
    monkeypatch.setitem(DISTILLERS, VitStudentsOnly.name, VitStudentsOnly)
    with pytest.raises(UnsupportedPair, match="cnn student"):
        run(tmp_path, distill={"method": "vit_only_test"})


def test_existing_run_directory_is_not_overwritten(tmp_path, data_dir):
    run(tmp_path, train={"epochs": 1, "max_steps_per_epoch": 1})
    with pytest.raises(ConfigError, match="--resume"):
        run(tmp_path, train={"epochs": 1, "max_steps_per_epoch": 1})


# ------------------------------------------------------------------------------ run directory


def test_summary_widens_for_new_columns_and_truncates_on_resume(tmp_path):
    from fastkd.rundir import RunDir
    run_dir = RunDir(tmp_path)
    run_dir.append_summary({"epoch": 1, "loss_gt": 0.5})
    run_dir.append_summary({"epoch": 2, "loss_gt": 0.25, "eval_top1": 75.0})
    run_dir.append_summary({"epoch": 3, "loss_gt": 0.125})
    assert read_summary(tmp_path) == [
        {"epoch": "1", "loss_gt": "0.5", "eval_top1": ""},
        {"epoch": "2", "loss_gt": "0.25", "eval_top1": "75.0"},
        {"epoch": "3", "loss_gt": "0.125", "eval_top1": ""}]
    run_dir.truncate_summary(last_epoch=2)
    assert [row["epoch"] for row in read_summary(tmp_path)] == ["1", "2"]
    RunDir(tmp_path / "other", writer=False).append_summary({"epoch": 1})
    assert not (tmp_path / "other").exists(), "ranks > 0 write nothing"


def test_progress_lines_and_tqdm_both_reach_the_log(tmp_path, caplog):
    from fastkd.meters import Progress
    from fastkd.rundir import RunDir
    caplog.set_level("INFO", logger="fastkd")
    run_dir = RunDir(tmp_path)
    for interactive in (False, True):
        progress = Progress(run_dir, interactive=interactive)
        progress.start_epoch(3, total_steps=10, done_steps=4)
        progress.advance()
        progress.report(5, {"loss_kd": 0.5, "lr": 0.1, "img_per_sec": 1234.4, "data_wait": 0.031})
        progress.end_epoch()
    line = "epoch 3 [ 5/10] loss_kd 0.5 lr 1.00e-01 1234 img/s data 3.1%"
    logged = [record.getMessage() for record in caplog.records]
    assert sum(line in message for message in logged) == 1   # logged once, by the plain mode
    assert (tmp_path / "log.txt").read_text().count(line) == 2


def test_resume_with_more_epochs_follows_the_longer_schedule(tmp_path, data_dir):
    first = run(tmp_path, train={"epochs": 1})
    train(load_config(first.run_dir / "config.yaml", ["train.epochs=3"]), resume=first.run_dir)
    rows = read_summary(first.run_dir)
    assert [row["epoch"] for row in rows] == ["1", "2", "3"]
    # per-update cosine over 3 x 4 steps: after step 8 the LR is 0.05 * (1 + cos(8/12 pi)) / 2
    assert float(rows[1]["lr"]) == pytest.approx(0.05 * (1 + math.cos(math.pi * 8 / 12)) / 2)
    assert yaml.safe_load((first.run_dir / "config.yaml").read_text())["train"]["epochs"] == 3
    env = yaml.safe_load((first.run_dir / "env.json").read_text())
    assert env["resumes"][0]["resumed_at"] == {"epoch": 2, "batch": 0}


def test_checkpoint_interval_saves_mid_epoch_positions(tmp_path, data_dir, monkeypatch):
    import fastkd.engine
    saved = []
    original = fastkd.engine.save_training_checkpoint

    def recording(setup, run_path, position, meters, **kwargs):
        saved.append((position.epoch, position.batch, position.global_step))
        return original(setup, run_path, position, meters, **kwargs)

    monkeypatch.setattr(fastkd.engine, "save_training_checkpoint", recording)
    run(tmp_path, train={"epochs": 2, "checkpoint_interval": 3})
    # every 3 steps, except where an epoch ends anyway (step 8 = end of epoch 2)
    assert saved == [(1, 3, 3), (2, 0, 4), (2, 2, 6), (3, 0, 8)]


def test_dali_is_the_default_loader_and_is_recorded(tmp_path, data_dir):
    import importlib.util
    import json
    result = run(tmp_path, data={"loader": "auto"}, train={"epochs": 1})
    env = json.loads((result.run_dir / "env.json").read_text())
    has_dali = importlib.util.find_spec("nvidia.dali") is not None
    assert env["loader"] == ("dali-cpu" if has_dali else "torch")
    assert f"{env['loader']} loader" in (result.run_dir / "log.txt").read_text()


# ------------------------------------------------------------------------------ DDP buffers


def test_ddp_leaves_the_methods_own_buffers_to_the_method(tmp_path):
    """State a method keeps identical on every rank itself (CRD's memory banks, ~1.3 GB on
    ImageNet) and constant tables are neither broadcast by DDP before every forward nor
    averaged at epoch ends; the student's buffers and norm-layer statistics still are."""
    import timm
    import torch.distributed as dist

    from fastkd.build import wrap_ddp
    from fastkd.distillers.base import NoParams
    from fastkd.distributed import World, average_buffers_

    class Banked(Vanilla):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.proj = torch.nn.Sequential(torch.nn.BatchNorm1d(4))
            self.register_buffer("bank", torch.ones(100, 4))

    student = timm.create_model("test_resnet", num_classes=4)
    distiller = Banked(student, None, NoParams(), num_classes=4)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0,
                            world_size=1)
    try:
        world = World(world_size=2)   # a group of one stands in: all-reduce is the identity
        synced = {id(b) for b in wrap_ddp(distiller, world).modules_buffers}
        assert id(distiller.bank) not in synced
        assert id(distiller.proj[0].running_var) in synced
        assert all(id(b) in synced for b in student.buffers())
        average_buffers_(distiller, world)   # identity sum, then / 2
        assert torch.equal(distiller.bank, torch.ones(100, 4))
        assert torch.equal(distiller.proj[0].running_var, torch.full((4,), 0.5))
    finally:
        dist.destroy_process_group()
