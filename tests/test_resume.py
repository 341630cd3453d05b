"""Exact resume, for real: `fastkd train` in a subprocess, killed (SIGKILL after its first
checkpoint; SIGTERM mid-epoch), resumed with `--resume`, compared with an uninterrupted run.

CPU, fixed seed, torch loader with num_workers 0: the final student weights must be equal
bit for bit, and the deterministic summary columns equal (loss means up to float summation
order, see `assert_same_summary`).
"""
from __future__ import annotations

import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from run_helpers import make_image_folder, read_summary, tiny_config

pytestmark = pytest.mark.slow

EPOCHS = 3
EXACT_COLUMNS = ("epoch", "skipped_steps", "eval_top1", "eval_top5", "ema_top1", "ema_top5", "lr")
TIMEOUT = 240


def fastkd(*args: str) -> list[str]:
    return [sys.executable, "-m", "fastkd", *args]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """Data, config and the uninterrupted reference run, shared by the tests below."""
    root = tmp_path_factory.mktemp("resume")
    make_image_folder(root / "data")
    cfg = tiny_config(root, train={"epochs": EPOCHS, "ema": True, "ema_decay": 0.9,
                                   "log_interval": 1},
                      sched={"warmup_epochs": 1})
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    done = subprocess.run(fastkd("train", str(root / "cfg.yaml"), "output.name=reference"),
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    return root


def assert_same_run(run_dir: Path, reference: Path) -> None:
    ours, theirs = load_file(run_dir / "student.safetensors"), load_file(reference / "student.safetensors")
    assert ours.keys() == theirs.keys()
    different = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not different, f"weights differ after resume: {different[:5]}"
    ours_ckpt = torch.load(run_dir / "last.pt", weights_only=True)
    theirs_ckpt = torch.load(reference / "last.pt", weights_only=True)
    assert all(torch.equal(ours_ckpt["ema"][k], theirs_ckpt["ema"][k]) for k in theirs_ckpt["ema"])
    assert ours_ckpt["position"] == theirs_ckpt["position"]
    assert_same_summary(read_summary(run_dir), read_summary(reference))


def assert_same_summary(rows: list[dict], expected: list[dict]) -> None:
    """Exact columns compare as text; loss means to 1e-6, since a mid-epoch checkpoint may
    split the same per-step values into differently grouped partial sums."""
    assert [r["epoch"] for r in rows] == [r["epoch"] for r in expected]
    for row, ref in zip(rows, expected):
        for column in EXACT_COLUMNS:
            assert row[column] == ref[column], (column, row, ref)
        for column in (c for c in ref if c.startswith("loss_") or c == "train_loss"):
            assert math.isclose(float(row[column]), float(ref[column]), rel_tol=1e-6), column


def test_resume_after_sigkill_is_exact(workspace):
    run_dir = workspace / "runs" / "killed"
    process = subprocess.Popen(fastkd("train", str(workspace / "cfg.yaml"), "output.name=killed"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + TIMEOUT
    while not (run_dir / "last.pt").exists():
        assert process.poll() is None, f"run ended before its first checkpoint: {process.stderr.read()}"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    position = torch.load(run_dir / "last.pt", weights_only=True)["position"]
    assert position["epoch"] <= EPOCHS, "the run finished before it was killed"
    assert not (run_dir / "student.safetensors").exists()

    resumed = subprocess.run(fastkd("train", "--resume", str(run_dir)), capture_output=True,
                             text=True, timeout=TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed at epoch {position['epoch']}" in resumed.stdout
    assert_same_run(run_dir, workspace / "runs" / "reference")


def test_sigterm_writes_a_mid_epoch_checkpoint_and_resumes_exactly(workspace):
    run_dir = workspace / "runs" / "preempted"
    process = subprocess.Popen(
        fastkd("train", str(workspace / "cfg.yaml"), "output.name=preempted"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:   # progress lines come once per step (log_interval: 1)
        if "epoch 2 [2/4]" in line:
            process.send_signal(signal.SIGTERM)
            break
    else:
        pytest.fail(f"no progress line seen: {process.stderr.read()}")
    rest, errors = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 143, errors
    assert "stop requested (SIGTERM)" in rest
    position = torch.load(run_dir / "last.pt", weights_only=True)["position"]
    assert position["epoch"] == 2 and 2 <= position["batch"] <= 4, position
    assert len(read_summary(run_dir)) == 1

    resumed = subprocess.run(fastkd("train", "--resume", str(run_dir)), capture_output=True,
                             text=True, timeout=TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(run_dir, workspace / "runs" / "reference")

