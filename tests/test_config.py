"""Config errors as users meet them: in files, in overrides, and through the CLI (status 2,
one message, no traceback)."""
from __future__ import annotations

import pytest
import yaml

from fastkd.cli import main
from fastkd.config import ConfigError, config_to_dict, dump_config, load_config
from fastkd.distillers import DISTILLERS
from fastkd.engine import train


def test_unknown_key_names_the_closest_valid_one(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"train": {"epoch": 3}}))
    with pytest.raises(ConfigError, match=r"'train\.epoch'.*did you mean 'train\.epochs'"):
        load_config(path)
    with pytest.raises(ConfigError, match="did you mean 'optim.weight_decay'"):
        load_config(None, ["optim.weight_decy=0.1"])
    with pytest.raises(ConfigError, match="did you mean 'teacher'"):
        load_config(None, ["teachr.name=resnet50"])


def test_bad_type_names_key_value_and_what_is_allowed():
    with pytest.raises(ConfigError) as error:
        load_config(None, ["train.epochs=ten"])
    assert "train.epochs" in str(error.value) and "'ten'" in str(error.value)
    assert "integer" in str(error.value)
    with pytest.raises(ConfigError,
                       match=r"train\.amp: 'fp8' is not allowed; choose one of bf16, fp16, fp32"):
        load_config(None, ["train.amp=fp8"])
    with pytest.raises(ConfigError, match=r"data\.scale.*2 values"):
        load_config(None, ["data.scale=[0.1]"])


def test_method_params_are_validated_before_anything_runs(tmp_path):
    if "kd" not in DISTILLERS:
        pytest.skip("the kd method is not registered yet")
    (tmp_path / "data").mkdir()
    cfg = load_config(None, [f"data.root={tmp_path / 'data'}", "distill.method=kd",
                             "teacher.name=test_vit", "distill.params={temperatur: 4}",
                             f"output.dir={tmp_path / 'runs'}"])
    with pytest.raises(ConfigError, match="did you mean 'distill.params.temperature'"):
        train(cfg)
    with pytest.raises(ConfigError, match="unknown method 'kdd'; did you mean 'kd'"):
        train(load_config(None, [f"data.root={tmp_path / 'data'}", "distill.method=kdd"]))
    assert not (tmp_path / "runs").exists()


def test_dumped_config_reloads_identically(tmp_path):
    cfg = load_config(None, ["optim.lr=0.2", "data.scale=[0.35, 1.0]", "model.kwargs={img_size: 32}"])
    dump_config(cfg, tmp_path / "config.yaml")
    assert config_to_dict(load_config(tmp_path / "config.yaml")) == config_to_dict(cfg)


@pytest.mark.parametrize("argv, message", [
    (["train.epoch=3"], "did you mean 'train.epochs'"),
    (["train.batch_size=big"], "train.batch_size: 'big' is not an integer"),
    (["train.amp=fp8"], "choose one of bf16, fp16, fp32"),
])
def test_cli_exits_2_with_the_message_and_no_traceback(tmp_path, capsys, argv, message):
    path = tmp_path / "cfg.yaml"
    path.write_text("train: {epochs: 1}\n")
    assert main(["train", str(path), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert err.startswith("fastkd: error: ") and len(err.strip().splitlines()) == 1


def test_cli_reports_a_missing_or_broken_config_file(tmp_path, capsys):
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    (tmp_path / "broken.yaml").write_text("train: {epochs: [1\n")
    assert main(["eval", str(tmp_path / "broken.yaml")]) == 2
    assert "not valid YAML" in capsys.readouterr().err


@pytest.mark.parametrize("override, message", [
    ("train.log_interval=0", "train.log_interval: 0 is not allowed; it must be at least 1"),
    ("optim.opt=sgdd", "optim.opt: 'sgdd' is not a timm optimizer"),
    ("sched.sched=plateau", "sched.sched: 'plateau' needs a metric"),
    ("data.root=/nonexistent/fastkd-data", "data.root: '/nonexistent/fastkd-data' is not a directory"),
])
def test_values_the_schema_accepts_but_a_run_cannot_use(tmp_path, capsys, override, message):
    (tmp_path / "data").mkdir()
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"data": {"root": str(tmp_path / "data")},
                                    "output": {"dir": str(tmp_path / "runs")}}))
    assert main(["train", str(path), override]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_numbers_as_people_write_them(tmp_path):
    """YAML 1.1 reads `1e-3` (no dot) as a string: every float key accepts it, from a file, an
    override and inside a tuple."""
    path = tmp_path / "cfg.yaml"
    path.write_text("optim:\n  lr: 1e-3\n  betas: [0.9, 9.99e-1]\n")
    cfg = load_config(path, ["optim.weight_decay=5E-2", "sched.min_lr=-1e-6", "data.hflip=.5"])
    assert cfg.optim.lr == 1e-3 and cfg.optim.betas == (0.9, 0.999)
    assert cfg.optim.weight_decay == 0.05 and cfg.sched.min_lr == -1e-6 and cfg.data.hflip == 0.5
    with pytest.raises(ConfigError, match="optim.lr"):
        load_config(None, ["optim.lr=1e-3x"])


@pytest.mark.parametrize("override, key", [
    ("train.epochs=0", "train.epochs"), ("data.auto_augment=rand-m9-zz", "data.auto_augment"),
    ("data.auto_augment=augmix-m5", "data.auto_augment"), ("data.num_workers=-1", "data.num_workers"),
    ("train.cpu_threads=0", "train.cpu_threads")])
def test_values_are_refused_when_the_config_is_loaded(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])
