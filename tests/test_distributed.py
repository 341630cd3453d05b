"""Two processes under torchrun with gloo on CPU: DDP around the distiller, sharded data,
non-finite agreement across ranks, metrics summed over ranks, only rank 0 writing."""
from __future__ import annotations

import json
import os
import math
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml

from run_helpers import TESTS_DIR, make_image_folder, read_summary, tiny_config

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

# Registered inside each worker: rank 1 alone returns a NaN loss on its first step, so the
# ranks must agree to skip (one skipping while the other steps would desynchronise DDP).
WORKER = textwrap.dedent('''
    import os, sys
    sys.path.insert(0, os.environ["FASTKD_TESTS_DIR"])
    import torch
    from fastkd.config import load_config
    from fastkd.distillers import DISTILLERS
    from fastkd.engine import train
    from run_helpers import StepHookMethod

    class NanOnRankOne(StepHookMethod):
        name = "nan_on_rank_one_test"

        def at_step(self, step, logits, terms):
            if step == 1 and os.environ["RANK"] == "1":
                return {name: value * float("nan") for name, value in terms.items()}
            return terms

    DISTILLERS[NanOnRankOne.name] = NanOnRankOne
    result = train(load_config(sys.argv[1]))
    state = {"student": result.student.state_dict(), "metrics": result.metrics}
    torch.save(state, os.path.join(sys.argv[2], "rank%s.pt" % os.environ["RANK"]))
''')
# Worker scripts import the test helpers from here.
WORKER_ENV = {**os.environ, "FASTKD_TESTS_DIR": str(TESTS_DIR)}


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
        capture_output=True, text=True, timeout=300, env=WORKER_ENV)
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


TORCHRUN_VARS = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def test_slurm_variables_give_the_world_when_torchrun_is_absent(monkeypatch):
    """`srun python -m fastkd train` (no torchrun): the ranks come from SLURM's variables, and
    the missing rendezvous address is a clear error, not a hang."""
    from fastkd.config import ConfigError
    from fastkd.distributed import init_world, world_info_from_env
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_PROCID", "9")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    assert world_info_from_env() == (1, 9, 16)
    with pytest.raises(ConfigError, match="MASTER_ADDR"):
        init_world("cpu")


def test_torchrun_variables_win_over_slurm(monkeypatch):
    """scripts/slurm_2nodes_8gpus.sbatch: one SLURM task per node runs torchrun, so SLURM says
    2 tasks while torchrun's 16 processes must use torchrun's ranks."""
    from fastkd.distributed import world_info_from_env
    monkeypatch.setenv("SLURM_LOCALID", "0")
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("LOCAL_RANK", "5")
    monkeypatch.setenv("RANK", "13")
    monkeypatch.setenv("WORLD_SIZE", "16")
    assert world_info_from_env() == (5, 13, 16)


EVAL_WORKER = textwrap.dedent('''
    import json, sys
    from fastkd.config import load_config
    from fastkd.distributed import is_primary_process
    from fastkd.engine import evaluate_config

    results = evaluate_config(load_config(sys.argv[1]), sys.argv[2])
    if is_primary_process():
        with open(sys.argv[3], "w") as out:
            json.dump({k: repr(v) for k, v in results.items()}, out)
''')


def test_evaluation_counts_every_sample_once_on_any_world_size(tmp_path):
    """13 validation images: 2 ranks pad one sample, 3 ranks pad two; the padded ones must not
    count, so 2- and 3-process evaluation of one checkpoint equal the 1-process one exactly.
    The weights are random but fixed: a count that lets a padded duplicate in moves top-1."""
    import timm
    from fastkd.config import load_config
    from fastkd.engine import evaluate_config
    make_image_folder(tmp_path / "data")
    torch.manual_seed(3)
    weights = tmp_path / "student.pth"
    torch.save(timm.create_model("test_resnet", num_classes=4).state_dict(), weights)
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tmp_path, train={"batch_size": 2})))
    (tmp_path / "eval.py").write_text(EVAL_WORKER)
    single = {k: repr(v) for k, v in evaluate_config(load_config(config), weights).items()}
    for nproc in (2, 3):
        out = tmp_path / f"eval{nproc}.json"
        done = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone",
             f"--nproc_per_node={nproc}", str(tmp_path / "eval.py"), str(config), str(weights),
             str(out)], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-4000:]
        assert json.loads(out.read_text()) == single, nproc


@pytest.mark.parametrize("method", ["kd", "ofa"])
def test_two_processes_reach_the_weights_of_one_on_the_same_global_batch(tmp_path, method):
    """1 process × batch 8 and 2 processes × batch 4, same seed and LR: DDP's averaged gradient
    equals the full batch's, so after 4 steps the students agree to float tolerance. test_vit
    has no batch statistics (LayerNorm), so per-rank batches change nothing else."""
    from safetensors.torch import load_file
    from run_helpers import teacher_checkpoint
    make_image_folder(tmp_path / "data")
    teacher = teacher_checkpoint(tmp_path)
    common = dict(model={"name": "test_vit", "kwargs": {"img_size": 32}},
                  teacher={"name": "test_vit", "checkpoint": str(teacher),
                           "kwargs": {"img_size": 32}},
                  distill={"method": method})
    weights = {}
    # (2, 8): a global batch of 16 must end elsewhere, or the comparison proves nothing
    for nproc, batch in ((1, 8), (2, 4), (2, 8)):
        name = f"world{nproc}x{batch}"
        cfg = tiny_config(tmp_path, train={"batch_size": batch, "epochs": 1},
                          output={"dir": str(tmp_path / "runs"), "name": name,
                                  "tensorboard": False}, **common)
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                     f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable])
        done = subprocess.run(launcher + ["-m", "fastkd", "train", str(tmp_path / f"{name}.yaml")],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-4000:]
        weights[nproc, batch] = load_file(tmp_path / "runs" / name / "student.safetensors")
    for key, value in weights[1, 8].items():
        torch.testing.assert_close(weights[2, 4][key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert any(not torch.allclose(weights[2, 8][k], v, rtol=1e-4, atol=1e-5)
               for k, v in weights[1, 8].items())


BANK_WORKER = textwrap.dedent('''
    import os, sys
    import torch
    import fastkd.engine as engine
    from fastkd.config import load_config

    built = {}
    def keep_setup(*args, **kwargs):   # the distiller, to read this rank's memory banks
        built["setup"] = engine_build(*args, **kwargs)
        built["start"] = {name: buffer.clone() for name, buffer
                          in built["setup"].distiller.named_buffers() if "memory" in name}
        return built["setup"]
    engine_build, engine.build_training = engine.build_training, keep_setup
    engine.train(load_config(sys.argv[1]))
    banks = {name: buffer.clone() for name, buffer in built["setup"].distiller.named_buffers()
             if "memory" in name}
    torch.save({"end": banks, "start": built["start"]}, os.path.join(sys.argv[2], "banks%s.pt" % os.environ["RANK"]))
''')


def test_crd_memory_banks_stay_identical_across_ranks(tmp_path):
    """Each rank updates the rows of the samples of every rank (gathered embeddings), so after
    training both ranks hold the same banks, and the banks have moved from their random start."""
    from run_helpers import teacher_checkpoint
    make_image_folder(tmp_path / "data")
    cfg = tiny_config(tmp_path, train={"batch_size": 4, "epochs": 1},
                      model={"name": "test_vit", "kwargs": {"img_size": 32}},
                      teacher={"name": "test_vit", "checkpoint": str(teacher_checkpoint(tmp_path)),
                               "kwargs": {"img_size": 32}},
                      distill={"method": "crd", "params": {"num_negatives": 8, "feat_dim": 16}})
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "banks.py").write_text(BANK_WORKER)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(tmp_path / "banks.py"), str(tmp_path / "cfg.yaml"), str(tmp_path)],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    banks = [torch.load(tmp_path / f"banks{r}.pt", weights_only=True) for r in (0, 1)]
    assert {"memory_s", "memory_t"} <= {name.split(".")[-1] for name in banks[0]["end"]}
    for name, bank in banks[0]["end"].items():
        assert torch.equal(bank, banks[1]["end"][name]), name
        if name.split(".")[-1] in ("memory_s", "memory_t"):
            assert not torch.equal(bank, banks[0]["start"][name]), f"{name} never updated"


def _free_port() -> int:
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_two_agents(command: list[str], *, env: dict | None = None, extra: tuple = ()) -> None:
    """Two torchrun agents (`--nnodes=2`, one process each) that meet over c10d on localhost,
    as two cluster nodes would; both must exit 0."""
    endpoint = f"127.0.0.1:{_free_port()}"
    agents = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
         "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", "--rdzv-id=fastkd-test", *extra,
         *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**WORKER_ENV, **(env or {})}) for _ in range(2)]
    outputs = [agent.communicate(timeout=300) for agent in agents]
    for agent, (_, err) in zip(agents, outputs):
        assert agent.returncode == 0, err[-4000:]


def test_two_nodes_over_c10d_rendezvous_write_one_run(tmp_path):
    """Two torchrun agents meet over c10d on localhost, as two cluster nodes would: one run
    directory, trained and evaluated by a world of 2."""
    make_image_folder(tmp_path / "data")
    cfg = tiny_config(tmp_path, train={"batch_size": 4, "epochs": 1})
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    run_two_agents(["-m", "fastkd", "train", str(tmp_path / "cfg.yaml")])
    runs = list((tmp_path / "runs").iterdir())
    assert [run.name for run in runs] == ["run"]
    env = json.loads((runs[0] / "env.json").read_text())
    assert env["world_size"] == 2 and env["global_batch"] == 8
    rows = read_summary(runs[0])
    assert len(rows) == 1 and float(rows[0]["eval_top1"]) >= 0
    assert (runs[0] / "student.safetensors").is_file()


# A worker that torchrun restarts: rank 1 kills itself (SIGKILL, no handler runs) at its
# KILL_AT-th training step of the first attempt; torchrun --max-restarts=1 restarts both.
KILLED_ONCE_WORKER = textwrap.dedent('''
    import os, signal, sys
    sys.path.insert(0, os.environ["FASTKD_TESTS_DIR"])
    from fastkd.cli import main
    from fastkd.distillers import DISTILLERS
    from run_helpers import StepHookMethod

    class KilledOnce(StepHookMethod):
        name = "killed_once_test"

        def at_step(self, step, logits, terms):
            first_attempt = os.environ["TORCHELASTIC_RESTART_COUNT"] == "0"
            if first_attempt and os.environ["RANK"] == "1" and step == int(os.environ["KILL_AT"]):
                os.kill(os.getpid(), signal.SIGKILL)
            return terms

    DISTILLERS[KilledOnce.name] = KilledOnce
    sys.exit(main(["train"] + sys.argv[1:]))
''')

TIMINGS = ("img_per_sec", "data_wait", "epoch_seconds")


def test_a_rank_killed_mid_epoch_is_restarted_by_torchrun_and_resumes_exactly(tmp_path):
    """Two nodes (torchrun agents over c10d), BatchNorm student with EMA, a checkpoint every 3
    steps (4 per epoch): rank 1 is SIGKILLed at step 7, torchrun (--max-restarts=1) restarts
    the group, and the restarted group resumes the same run from step 6 (mid-epoch 2), even
    when rank 0's own agent counts no restart. Weights, EMA (its BatchNorm statistics are per
    rank until the epoch ends) and every logged loss equal those of an uninterrupted run.
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 gives each round a fresh store (see README)."""
    make_image_folder(tmp_path / "data")
    (tmp_path / "worker.py").write_text(KILLED_ONCE_WORKER)
    runs = {}
    for name, kill_at in (("uninterrupted", 0), ("killed", 7)):
        cfg = tiny_config(tmp_path, distill={"method": "killed_once_test"},
                          train={"batch_size": 4, "epochs": 2, "ema": True, "ema_decay": 0.5,
                                 "checkpoint_interval": 3},
                          output={"dir": str(tmp_path / "runs"), "name": name, "tensorboard": False})
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        run_two_agents([str(tmp_path / "worker.py"), str(tmp_path / f"{name}.yaml")],
                       env={"KILL_AT": str(kill_at), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"},
                       extra=("--max-restarts=1", "--monitor-interval=0.2"))
        runs[name] = tmp_path / "runs" / name
    log = (runs["killed"] / "log.txt").read_text()
    assert "resumed at epoch 2, batch 2" in log, log[-2000:]
    env = json.loads((runs["killed"] / "env.json").read_text())
    assert len(env["resumes"]) == 1 and env["resumes"][0]["launch"]["run_id"] == "fastkd-test"
    final = {name: torch.load(run / "last.pt", weights_only=True) for name, run in runs.items()}
    for part in ("distiller", "ema"):
        reference = final["uninterrupted"][part]
        differ = [k for k, v in final["killed"][part].items() if not torch.equal(v, reference[k])]
        assert not differ, f"{part}: {differ[:5]}"
    rows = {name: [{k: v for k, v in row.items() if k not in TIMINGS} for row in read_summary(run)]
            for name, run in runs.items()}
    assert rows["killed"] == rows["uninterrupted"]


def test_resume_on_another_world_size_keeps_the_global_batch_and_lr(tmp_path):
    """Epoch 1 on one process (batch 8), epoch 2 resumed on two (batch 4 each, said in the
    log): the global batches hold the same samples on any world size, so with a student
    without batch statistics (test_vit) and a constant LR the weights are those of an
    uninterrupted one-process run, to float tolerance."""
    from safetensors.torch import load_file
    from fastkd.config import load_config
    from fastkd.engine import train
    make_image_folder(tmp_path / "data")
    common = dict(model={"name": "test_vit", "kwargs": {"img_size": 32}},
                  optim={"opt": "sgd", "lr": None, "lr_base": 0.1, "lr_base_size": 16},
                  sched={"sched": "step", "decay_epochs": 30})
    reference = train(load_config(write_yaml(tmp_path, "reference", epochs=2, **common))).run_dir
    split = train(load_config(write_yaml(tmp_path, "split", epochs=1, **common))).run_dir
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "fastkd", "train", "--resume", str(split), "train.epochs=2"],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert ("on 2 process(es) instead of 1: per-process batch 8 -> 4, so the global batch 8"
            in (split / "log.txt").read_text())
    env = json.loads((split / "env.json").read_text())
    resumed = env["resumes"][-1]
    assert (resumed["world_size"], resumed["global_batch"]) == (2, 8)
    assert resumed["lr"] == env["lr"] == pytest.approx(0.05)
    expected = load_file(reference / "student.safetensors")
    for key, value in load_file(split / "student.safetensors").items():
        torch.testing.assert_close(value, expected[key], rtol=1e-4, atol=1e-5, msg=key)
    assert [r["epoch"] for r in read_summary(split)] == ["1", "2"]


def write_yaml(tmp_path, name: str, *, epochs: int, **sections) -> "Path":
    cfg = tiny_config(tmp_path, train={"batch_size": 8, "epochs": epochs},
                      output={"dir": str(tmp_path / "runs"), "name": name, "tensorboard": False},
                      **sections)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
