"""The teacher cache end to end on a tiny ImageFolder: precompute, records against the live
teacher on the replayed crops, training from the cache against the online teacher, crash
safety, refusals, verify/info, two-rank precompute and exact resume of a cached run."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from fastkd.build import build_teacher
from fastkd.cache import CacheError, build_cache
from fastkd.cache.layout import RecordLayout, ShardReader, read_manifest
from fastkd.cache.meta import student_data_config
from fastkd.cache.precompute import teacher_records
from fastkd.cache.tools import teacher_differences
from fastkd.cli import main as cli_main
from fastkd.config import load_config
from fastkd.engine import train
from fastkd.pipelines import CropPlan, build_loader
from fastkd.pipelines.settings import resolve_image_settings

from run_helpers import (NUM_CLASSES, make_image_folder, read_summary, teacher_checkpoint,
                         tiny_config)

TIMEOUT = 240
TEACHER = {"name": "test_vit", "kwargs": {"img_size": 32}}


def write(root: Path, name: str, **sections) -> Path:
    cfg = tiny_config(root, distill={"method": "kd"},
                      teacher={**TEACHER, "checkpoint": str(root / "teacher.pth")}, **sections)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Data, teacher weights and a full-logit fp32 cache of 2 epochs in shards of 12."""
    root = tmp_path_factory.mktemp("cache")
    make_image_folder(root / "data")
    teacher_checkpoint(root)
    config = write(root, "full", cache={"dir": str(root / "full"), "topk": 0, "dtype": "fp32",
                                        "shard_size": 12})
    build_cache(load_config(config))
    return root


def shard_hashes(directory: Path) -> dict[str, str]:
    return {e["file"]: e["sha256"] for e in read_manifest(directory)["shards"]}


# ------------------------------------------------------------------------------ the records


def test_crop_plan_cycle_replays_the_cached_epochs():
    plan, cycled = CropPlan(3), CropPlan(3, cycle=2)
    for epoch, replayed in ((1, 1), (2, 2), (3, 1), (6, 2)):
        a = cycled.windows(epoch, [0, 5, 9], [40, 50, 60], [60, 50, 40])
        b = plan.windows(replayed, [0, 5, 9], [40, 50, 60], [60, 50, 40])
        assert all(np.array_equal(x, y) for x, y in zip(a, b))


def live_and_cached(root: Path, directory: Path, epoch: int):
    """(live teacher fields, cached fields) over the training loader's shuffled batches."""
    cfg = load_config(root / "full.yaml")
    manifest = read_manifest(directory)
    layout = RecordLayout.from_json(manifest["layout"])
    model_cfg = student_data_config(cfg, NUM_CLASSES)
    settings = resolve_image_settings(cfg.data, model_cfg)
    loader = build_loader(cfg.data, split="train", train=True, batch_size=8, model_cfg=model_cfg,
                          seed=cfg.train.seed, num_classes=NUM_CLASSES)
    teacher = build_teacher(cfg, NUM_CLASSES, student_mean_std=(settings.mean, settings.std),
                            device=torch.device("cpu"))
    reader = ShardReader(directory, manifest)
    loader.set_epoch(epoch)
    for batch in loader:
        yield teacher_records(teacher, batch.images, layout), reader.gather(epoch, batch.indices.numpy())


@pytest.mark.parametrize("epoch", [1, 2])
def test_full_fp32_records_equal_the_live_teacher_on_the_replayed_crops(root, epoch):
    for live, cached in live_and_cached(root, root / "full", epoch):
        np.testing.assert_allclose(cached["logits"], live["logits"], rtol=1e-5, atol=1e-5)


def test_topk_fp16_records_are_the_live_top_k_within_fp16_rounding(root):
    directory = root / "top2"
    build_cache(load_config(root / "full.yaml", [f"cache.dir={directory}", "cache.topk=2"]))
    manifest = read_manifest(directory)
    assert manifest["record_bytes"] == 2 * 2 + 2 * 2 + 4       # fp16 values, int16 ids, fp32 lse
    for live, cached in live_and_cached(root, directory, 2):
        assert cached["values"].dtype == np.float16 and cached["ids"].dtype == np.int16
        np.testing.assert_array_equal(cached["ids"], live["ids"])
        np.testing.assert_allclose(cached["values"].astype(np.float32),
                                   live["values"].astype(np.float32), rtol=1e-3, atol=1e-3)
        full = torch.from_numpy(live["lse"])
        np.testing.assert_allclose(cached["lse"], full.numpy(), rtol=1e-5)
    worst = teacher_differences(directory, manifest, samples=4, overrides=[])
    assert worst["values"] < 1e-2 and worst["lse"] < 1e-4 and worst["ids"] == 0


# ------------------------------------------------------------------------------ training


def test_kd_from_a_full_fp32_cache_follows_the_online_teacher_step_for_step(root):
    online = train(load_config(root / "full.yaml", ["output.name=online", "cache.dir=null"]))
    cached = train(load_config(root / "full.yaml", ["output.name=cached"]))
    for row, ref in zip(read_summary(cached.run_dir), read_summary(online.run_dir)):
        for column in ("loss_gt", "loss_kd", "train_loss"):
            assert abs(float(row[column]) - float(ref[column])) < 1e-4, column
    ours, theirs = load_file(cached.run_dir / "student.safetensors"), load_file(online.run_dir / "student.safetensors")
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-5) for k in theirs)
    env = json.loads((cached.run_dir / "env.json").read_text())
    assert "teacher cache" in json.dumps(env)
    assert "from the teacher cache" in (cached.run_dir / "log.txt").read_text()


@pytest.fixture(scope="module")
def feature_caches(root) -> dict[str, Path]:
    """Top-k caches holding stage maps (built for fitnet) and pooled features (built for cc)."""
    out = {}
    for method in ("fitnet", "cc"):
        out[method] = root / f"top2-{method}"
        build_cache(load_config(root / "full.yaml", [f"cache.dir={out[method]}", "cache.topk=2",
                                                     f"distill.method={method}"]))
    return out


@pytest.mark.parametrize("method", ["kd", "dkd", "nkd", "wsld", "dist", "bkd", "ofa", "fitnet",
                                    "mgd", "crd", "rkd", "cc"])
def test_every_cacheable_method_trains_from_a_top_k_cache(root, feature_caches, method):
    source = "cc" if method in ("crd", "rkd", "cc") else "fitnet"
    result = train(load_config(root / "full.yaml", [
        f"cache.dir={feature_caches[source]}", f"distill.method={method}",
        f"output.name=topk-{method}", "train.epochs=1", "train.max_steps_per_epoch=2"]))
    losses = {k: float(v) for k, v in read_summary(result.run_dir)[0].items() if k.startswith("loss")}
    assert losses and all(np.isfinite(v) for v in losses.values()), losses
    assert read_summary(result.run_dir)[0]["skipped_steps"] == "0"


# ------------------------------------------------------------------------------ refusals


def refused(config: Path, overrides: list[str], capsys) -> str:
    assert cli_main(["train", str(config), *overrides]) == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("overrides, named", [
    (["teacher.name=test_convnext", "teacher.kwargs.img_size=null"], "teacher.name"),
    (["train.seed=1"], "train.seed"),
    (["data.scale=[0.5,1.0]"], "data.scale"),
    (["data.hflip=0.0"], "data.hflip"),
    (["data.img_size=48"], "data.img_size"),
    (["data.mean=[0.4,0.4,0.4]"], "data.mean"),
    (["data.interpolation=nearest"], "data.interpolation"),
    (["data.mixup=0.2"], "data.mixup"),
    (["data.auto_augment=rand-m9-mstd0.5"], "data.auto_augment"),
    (["data.reprob=0.25"], "data.reprob"),
    (["distill.method=crd"], "pooled features"),
    (["distill.method=mgd"], "stage(s)"),
    (["distill.method=scalekd"], "cannot be served"),
    (["distill.method=none"], "uses no teacher"),
    (["teacher.train_mode=true"], "teacher.train_mode"),
])
def test_a_run_that_the_cache_cannot_serve_stops_with_its_own_message(root, capsys, overrides,
                                                                       named):
    message = refused(root / "full.yaml", [*overrides, "output.name=refused"], capsys)
    assert named in message, message
    assert "Traceback" not in message


def test_other_teacher_weights_or_other_data_are_refused(root, tmp_path, capsys):
    torch.manual_seed(11)
    import timm
    other = timm.create_model("test_vit", num_classes=NUM_CLASSES, img_size=32)
    torch.save(other.state_dict(), tmp_path / "other.pth")
    message = refused(root / "full.yaml", [f"teacher.checkpoint={tmp_path / 'other.pth'}"], capsys)
    assert "teacher.checkpoint (sha256" in message
    data = shutil.copytree(root / "data", tmp_path / "data")
    shutil.copy(data / "train" / "class0" / "0.jpg", data / "train" / "class0" / "extra.jpg")
    message = refused(root / "full.yaml", [f"data.root={data}"], capsys)
    assert "training split differs" in message


def test_an_unfinished_or_missing_cache_is_refused(root, tmp_path, capsys):
    copy = shutil.copytree(root / "full", tmp_path / "unfinished")
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps(dict(manifest, complete=False)))
    assert "unfinished" in refused(root / "full.yaml", [f"cache.dir={copy}"], capsys)
    assert "no teacher cache" in refused(root / "full.yaml", [f"cache.dir={tmp_path / 'none'}"],
                                         capsys)


def test_precompute_refuses_when_the_disk_lacks_room(root, tmp_path, monkeypatch):
    import fastkd.cache.precompute as precompute
    monkeypatch.setattr(precompute.shutil, "disk_usage",
                        lambda path: shutil._ntuple_diskusage(10**9, 10**9, 100))
    with pytest.raises(CacheError, match="free"):
        build_cache(load_config(root / "full.yaml", [f"cache.dir={tmp_path / 'c'}"]))
    assert not list((tmp_path / "c").glob("*.npy"))


def test_a_cache_dir_of_another_configuration_is_not_overwritten(root, capsys):
    config = load_config(root / "full.yaml", ["cache.topk=2"])   # same dir, another layout
    with pytest.raises(CacheError, match="delete this one"):
        build_cache(config)
    assert read_manifest(root / "full")["complete"]


# ------------------------------------------------------------------------------ crash safety


KILL_DURING_THIRD_SHARD = """
import os, signal, sys
from fastkd.cache import layout
from fastkd.cache.precompute import build_cache
from fastkd.config import load_config
finished, write = layout.ShardWriter.finish, layout.ShardWriter.write
done = []
def finish(self):
    entry = finished(self)
    done.append(entry)
    return entry
def write_then_die(self, ids, fields):
    write(self, ids, fields)
    if len(done) == 2:
        os.kill(os.getpid(), signal.SIGKILL)   # mid-shard: a partial file is left behind
layout.ShardWriter.finish, layout.ShardWriter.write = finish, write_then_die
build_cache(load_config(sys.argv[1], sys.argv[2:]))
"""


def test_sigkill_during_precompute_then_a_rerun_finishes_only_what_is_missing(root, tmp_path):
    directory = tmp_path / "killed"
    overrides = [f"cache.dir={directory}", "cache.batch_size=4"]
    died = subprocess.run([sys.executable, "-c", KILL_DURING_THIRD_SHARD, str(root / "full.yaml"),
                           *overrides], capture_output=True, text=True, timeout=TIMEOUT)
    assert died.returncode == -signal.SIGKILL, died.stderr
    assert list(directory.glob(".*.partial")), "the kill should leave a half-written shard"
    assert not read_manifest(directory)["complete"]
    kept = {p.name: p.stat().st_mtime_ns for p in directory.glob("e*.npy")}
    assert len(kept) == 2

    build_cache(load_config(root / "full.yaml", overrides))
    assert all((directory / name).stat().st_mtime_ns == t for name, t in kept.items())
    assert shard_hashes(directory) == shard_hashes(root / "full")   # same bytes as one go
    assert cli_main(["cache", "verify", str(directory)]) == 0


def test_a_flipped_byte_fails_verify(root, tmp_path, capsys):
    copy = shutil.copytree(root / "full", tmp_path / "flipped")
    assert cli_main(["cache", "verify", str(copy)]) == 0
    shard = sorted(copy.glob("e*.npy"))[1]
    data = bytearray(shard.read_bytes())
    data[-7] ^= 0x01
    shard.write_bytes(bytes(data))
    assert cli_main(["cache", "verify", str(copy)]) == 1
    assert f"{shard.name}: checksum differs" in capsys.readouterr().out


def test_info_says_what_the_cache_holds_and_serves(root, capsys):
    assert cli_main(["cache", "info", str(root / "full")]) == 0
    out = capsys.readouterr().out
    assert "all 4 logits (fp32)" in out and "2 planned epochs" in out
    served = out.split("serves: ")[1].split("\n")[0].split(", ")
    assert {"kd", "dkd", "nkd", "ofa", "bkd"} <= set(served)
    assert "crd" not in served and "scalekd" not in served   # pooled / live teacher needed


# ------------------------------------------------------------------------------ scale and resume


@pytest.mark.distributed
def test_two_rank_precompute_writes_the_same_records_as_one(root, tmp_path):
    directory = tmp_path / "two"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--master_port=29517", "-m", "fastkd", "cache", "build",
                           str(root / "full.yaml"), f"cache.dir={directory}"],
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert shard_hashes(directory) == shard_hashes(root / "full")


@pytest.mark.slow
def test_a_cached_run_resumes_exactly(root):
    config = str(root / "full.yaml")
    reference = subprocess.run([sys.executable, "-m", "fastkd", "train", config,
                                "output.name=cached-reference", "train.epochs=3"],
                               capture_output=True, text=True, timeout=TIMEOUT)
    assert reference.returncode == 0, reference.stderr
    process = subprocess.Popen([sys.executable, "-m", "fastkd", "train", config,
                                "output.name=cached-preempted", "train.epochs=3",
                                "train.log_interval=1"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:
        if "epoch 2 [2/4]" in line:
            process.send_signal(signal.SIGTERM)
            break
    _, errors = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 143, errors
    run_dir = root / "runs" / "cached-preempted"
    resumed = subprocess.run([sys.executable, "-m", "fastkd", "train", "--resume", str(run_dir)],
                             capture_output=True, text=True, timeout=TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr
    ours = load_file(run_dir / "student.safetensors")
    theirs = load_file(root / "runs" / "cached-reference" / "student.safetensors")
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
