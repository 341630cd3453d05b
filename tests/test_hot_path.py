"""The training step's hot path: no host read of a device value on a step that does not log,
fused optimizers that skip a bad step on the device, and the apex names refused clearly."""
from __future__ import annotations

import importlib.util

import pytest
import torch

import fastkd.engine as engine
from fastkd.build import build_optimizer, uses_fused_torch_optimizer
from fastkd.config import ConfigError, load_config
from fastkd.meters import LossSums
from fastkd.step_guard import optimizer_step

from run_helpers import make_image_folder, teacher_checkpoint, write_config

SYNCS = ("item", "tolist", "__bool__", "cpu", "numpy", "nonzero")


def instrument(monkeypatch, calls: list, inside: list) -> None:
    """Record every Tensor method that forces a device→host copy while `inside` is set."""
    for name in SYNCS:
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _name=name, _original=original, **kwargs):
            if inside:
                calls.append((inside[0], _name))
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, spy)
    to = torch.Tensor.to

    def spy_to(self, *args, **kwargs):
        if inside and ("cpu" in args or kwargs.get("device") == "cpu"):
            calls.append((inside[0], "to('cpu')"))
        return to(self, *args, **kwargs)
    monkeypatch.setattr(torch.Tensor, "to", spy_to)


def wrap_inside(monkeypatch, owner, name: str, inside: list, step_of) -> None:
    original = getattr(owner, name)

    def wrapped(*args, **kwargs):
        inside.append(step_of(*args))
        try:
            return original(*args, **kwargs)
        finally:
            inside.pop()
    monkeypatch.setattr(owner, name, wrapped)


@pytest.mark.parametrize("ema", [False, True])
def test_no_host_read_on_a_step_that_does_not_log(tmp_path, monkeypatch, ema):
    make_image_folder(tmp_path / "data")
    config = write_config(tmp_path, distill={"method": "kd"},
                          teacher={"name": "test_vit", "checkpoint": str(teacher_checkpoint(tmp_path)),
                                   "kwargs": {"img_size": 32}},
                          train={"log_interval": 4, "epochs": 1, "ema": ema, "clip_grad": 1.0})
    calls, inside = [], []
    wrap_inside(monkeypatch, engine, "train_step", inside,
                lambda setup, state, *rest: state.position.global_step + 1)
    wrap_inside(monkeypatch, LossSums, "add", inside, lambda self, *rest: "add")
    instrument(monkeypatch, calls, inside)
    engine.train(load_config(config))
    assert calls == [], f"host reads inside the step: {calls[:10]}"


def test_the_spies_do_see_a_host_read(monkeypatch):
    calls, inside = [], ["probe"]
    instrument(monkeypatch, calls, inside)
    torch.ones(2).sum().item()
    bool(torch.ones(()))
    torch.ones(2).to("cpu")
    assert [name for _, name in calls] == ["item", "__bool__", "to('cpu')"]


@pytest.mark.parametrize("name", ["sgd", "momentum", "adamw"])
def test_a_skipped_first_step_leaves_the_fused_optimizer_as_new(name):
    """torch's fused SGD creates its momentum with `empty_like` on the first step: skipped
    through `found_inf`, that step would leave garbage (`build_optimizer` zeroes them)."""
    import timm
    from fastkd.distillers.base import Vanilla
    assert uses_fused_torch_optimizer(name)
    cfg = load_config(None, [f"optim.opt={name}"])
    distiller = Vanilla(timm.create_model("test_resnet", num_classes=4), None, None,
                        num_classes=4)
    optimizer = build_optimizer(cfg, distiller, 0.1)
    assert optimizer.defaults["fused"]
    before = [p.detach().clone() for p in distiller.parameters()]
    distiller(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))[1]["loss_gt"].backward()
    optimizer_step(optimizer, torch.zeros(()))           # a bad step: skipped on the device
    assert all(torch.equal(a, p) for a, p in zip(before, distiller.parameters()))
    assert all(not v.any() for state in optimizer.state.values() for v in state.values())
    optimizer_step(optimizer, torch.ones(()))            # a good step moves the weights
    assert not all(torch.equal(a, p) for a, p in zip(before, distiller.parameters()))
    assert all(torch.isfinite(v).all() for s in optimizer.state.values() for v in s.values())


@pytest.mark.skipif(importlib.util.find_spec("apex") is not None, reason="apex is installed")
def test_apex_optimizers_without_apex_are_refused_naming_apex(tmp_path):
    from fastkd.build import check_runnable
    make_image_folder(tmp_path / "data")
    cfg = load_config(write_config(tmp_path), ["optim.opt=fusedsgd"])
    with pytest.raises(ConfigError, match="apex is not installed"):
        check_runnable(cfg)


@pytest.mark.parametrize("name, kwargs", [("test_resnet", {}), ("test_vit", {"img_size": 32}),
                                          ("test_convnext", {})])
def test_the_teacher_is_cast_once_and_its_logits_stay_within_bf16_rounding(name, kwargs):
    import copy
    import timm
    from fastkd.models import Teacher, is_norm_layer
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **kwargs).eval()
    reference = copy.deepcopy(model)
    teacher = Teacher(model, amp_dtype=torch.bfloat16)
    for module in teacher.model.modules():
        expected = torch.float32 if is_norm_layer(module) else torch.bfloat16
        for param in module.parameters(recurse=False):
            assert param.dtype == expected, (type(module).__name__, param.dtype)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = reference(images).float()      # fp32 weights, cast by autocast every call
    after = teacher.logits(images)
    assert (after - before).abs().max() <= 4 * 2**-8 * before.abs().max()


def test_a_torch_loader_run_leaves_no_worker_behind(tmp_path):
    """Persistent DataLoader workers used to outlive `train()` and hold the process exit for
    about 20 s; the engine now shuts them down itself."""
    import multiprocessing
    make_image_folder(tmp_path / "data")
    engine.train(load_config(write_config(tmp_path, data={"num_workers": 2},
                                          train={"epochs": 1})))
    assert multiprocessing.active_children() == []


@pytest.mark.parametrize("tf32", [True, False])
def test_a_gpu_run_turns_on_cudnn_autotuning_and_tf32_unless_asked_not_to(monkeypatch, tf32):
    from fastkd.build import configure_backends
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", not tf32)
    precision = torch.get_float32_matmul_precision()
    try:
        configure_backends(load_config(None, [f"train.tf32={str(tf32).lower()}"]),
                           torch.device("cuda"))
        assert torch.backends.cudnn.benchmark and torch.backends.cudnn.allow_tf32 == tf32
        assert torch.get_float32_matmul_precision() == ("high" if tf32 else "highest")
    finally:
        torch.set_float32_matmul_precision(precision)


@pytest.mark.gpu
def test_steady_state_steps_on_a_gpu_never_synchronize(tmp_path, monkeypatch):
    """torch's own detector: any synchronizing CUDA call inside a non-logging step raises."""
    make_image_folder(tmp_path / "data")
    config = write_config(tmp_path, distill={"method": "kd"},
                          teacher={"name": "test_vit", "kwargs": {"img_size": 32}},
                          data={"loader": "auto"},
                          train={"device": "cuda", "amp": "bf16", "log_interval": 4,
                                 "epochs": 2, "ema": True})
    original = engine.train_step

    def strict(setup, state, *args):
        warm = state.position.global_step >= 2        # first steps: cuDNN autotuning, allocations
        torch.cuda.set_sync_debug_mode("error" if warm else "default")
        try:
            return original(setup, state, *args)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    monkeypatch.setattr(engine, "train_step", strict)
    engine.train(load_config(config))


@pytest.mark.parametrize("cores, workers, on_gpu, loader, threads", [
    (2, 4, False, 1, 1), (8, 4, False, 4, 4), (16, 8, False, 8, 8), (2, 0, False, 0, 2),
    (16, 4, True, 4, 12), (1, 2, False, 1, 1), (16, None, True, 15, 1), (2, None, False, 1, 1),
    (8, None, False, 4, 4)])
def test_the_thread_budget_never_oversubscribes(cores, workers, on_gpu, loader, threads):
    from fastkd.threads import plan_threads
    budget = plan_threads(workers, None, on_gpu=on_gpu, cores=cores, passive=False)
    assert (budget.loader, budget.torch) == (loader, threads)
    assert budget.loader + budget.torch <= max(cores, 2)
    passive = plan_threads(workers, None, on_gpu=on_gpu, cores=cores, passive=True)
    assert passive.torch == cores and passive.loader == (workers if workers is not None else loader)


def test_the_thread_budget_is_recorded_and_can_be_overridden(tmp_path):
    import json
    from fastkd.threads import usable_cores
    make_image_folder(tmp_path / "data")
    run = engine.train(load_config(write_config(tmp_path, data={"num_workers": 8},
                                                train={"epochs": 1})))
    record = json.loads((run.run_dir / "env.json").read_text())
    record = record.get("threads") or record["runs"][-1]["threads"]
    cores = usable_cores()
    assert record["cores"] == cores and record["torch"] <= cores
    assert "torch + " in (run.run_dir / "log.txt").read_text()
    run = engine.train(load_config(write_config(tmp_path, train={"epochs": 1, "cpu_threads": 1}),
                                   ["output.name=override"]))
    record = json.loads((run.run_dir / "env.json").read_text())
    record = record.get("threads") or record["runs"][-1]["threads"]
    assert record["torch"] == 1 and record["rule"] == "train.cpu_threads"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answer")
def test_sync_bn_without_a_gpu_is_refused(tmp_path):
    from fastkd.build import check_runnable
    make_image_folder(tmp_path / "data")
    with pytest.raises(ConfigError, match="train.sync_bn"):
        check_runnable(load_config(write_config(tmp_path), ["train.sync_bn=true"]))
