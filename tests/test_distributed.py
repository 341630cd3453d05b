"""Two processes under torchrun with gloo on CPU: DDP around the distiller, sharded data,
non-finite agreement across ranks, metrics summed over ranks, only rank 0 writing."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml

from run_helpers import make_image_folder, read_summary, tiny_config

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

# Registered inside each worker: rank 1 alone returns a NaN loss on its first step, so the
# ranks must agree to skip (one skipping while the other steps would desynchronise DDP).
WORKER = textwrap.dedent('''
    import os, sys
    import torch
    from fastkd.config import load_config
    from fastkd.distillers import DISTILLERS
    from fastkd.distillers.base import Vanilla
    from fastkd.engine import train

    class NanOnRankOne(Vanilla):
        name = "nan_on_rank_one_test"

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.calls = 0

        def forward(self, images, labels, *, epoch=1.0, indices=None):
            logits, terms = super().forward(images, labels, epoch=epoch, indices=indices)
            self.calls += 1
            if self.calls == 1 and os.environ["RANK"] == "1":
                terms = {name: value * float("nan") for name, value in terms.items()}
            return logits, terms

    DISTILLERS[NanOnRankOne.name] = NanOnRankOne
    result = train(load_config(sys.argv[1]))
    state = {"student": result.student.state_dict(), "metrics": result.metrics}
    torch.save(state, os.path.join(sys.argv[2], "rank%s.pt" % os.environ["RANK"]))
''')


def test_two_process_gloo_training_agrees_across_ranks(tmp_path):
    make_image_folder(tmp_path / "data")
    cfg = tiny_config(tmp_path, distill={"method": "nan_on_rank_one_test"},
                      train={"batch_size": 4, "epochs": 2, "ema": True, "ema_decay": 0.5},
                      optim={"lr": None, "lr_base": 0.1, "lr_base_size": 8})
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "worker.py").write_text(WORKER)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(tmp_path / "worker.py"), str(tmp_path / "cfg.yaml"), str(tmp_path)],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    weights = [r["student"] for r in ranks]
    differ = [k for k in weights[0] if not torch.equal(weights[0][k], weights[1][k])]
    assert not differ, f"ranks disagree on {differ[:5]}"
    timings = ("img_per_sec", "data_wait", "epoch_seconds")   # each rank's own clock
    agreed = [{k: v for k, v in r["metrics"].items() if k not in timings} for r in ranks]
    assert agreed[0] == agreed[1], "losses and accuracies must be all-reduced"
    assert {"loss_gt", "eval_top1", "ema_top1"} <= set(agreed[0])

    run_dir = tmp_path / "runs" / "run"
    rows = read_summary(run_dir)
    assert [row["skipped_steps"] for row in rows] == ["1", "0"]
    # 4 steps per epoch: 32 images, 2 ranks x 4 per batch
    assert torch.load(run_dir / "last.pt", weights_only=True)["position"]["global_step"] == 8
    for row in rows:  # 13 val images over 2 ranks (one padded slot): whole images only
        seen = float(row["eval_top1"]) * 13 / 100
        assert math.isclose(seen, round(seen), abs_tol=1e-6), row["eval_top1"]
    env = json.loads((run_dir / "env.json").read_text())
    assert env["world_size"] == 2 and env["global_batch"] == 8 and env["lr"] == pytest.approx(0.1)
    log = (run_dir / "log.txt").read_text()
    assert log.count("epoch 1 done") == 1, "only rank 0 writes"
    from safetensors.torch import load_file
    exported = load_file(run_dir / "student.safetensors")
    assert all(torch.equal(exported[k], weights[0][k]) for k in exported)


def test_each_task_with_one_visible_gpu_uses_it(monkeypatch):
    """SLURM --gpus-per-task=1: local rank 3 sees one GPU, cuda:0, and must not ask for cuda:3."""
    from fastkd.distributed import init_world
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "1")
    world = init_world("cuda")
    assert world.device == torch.device("cuda", 0) and chosen == [world.device]
