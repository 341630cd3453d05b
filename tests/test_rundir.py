"""The run directory's own rules: one run at a time (the lock), stale locks taken over."""
from __future__ import annotations

import json

import pytest

from fastkd.cli import main
from fastkd.config import ConfigError, load_config
from fastkd.rundir import LOCK_FILE, RunDir

from run_helpers import make_image_folder, write_config


def test_a_second_run_on_a_directory_in_use_is_refused_naming_the_holder(tmp_path, capsys):
    make_image_folder(tmp_path / "data")
    config = write_config(tmp_path, train={"epochs": 1})
    holder = RunDir(tmp_path / "runs" / "run")
    holder.begin(load_config(config), None)            # a run that is still going
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "in use by a running fastkd" in err and "pid" in err and "Traceback" not in err
    holder.close()
    assert main(["train", str(config)]) == 0           # free again once the holder is done
    assert (tmp_path / "runs" / "run" / LOCK_FILE).read_text() == ""


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_warning(tmp_path):
    path = tmp_path / "run"
    path.mkdir()
    (path / LOCK_FILE).write_text("host gone, pid 999999, since yesterday\n")
    run_dir = RunDir(path)
    with pytest.warns(UserWarning, match="no longer running.*pid 999999"):
        run_dir.lock()
    with pytest.raises(ConfigError, match="in use"):
        RunDir(path).lock()
    run_dir.close()


def _finished_run(path, run_id: str):
    path.mkdir(parents=True)
    (path / "env.json").write_text(json.dumps({"launch": {"run_id": run_id, "restart_count": 0}}))
    (path / "last.pt").write_bytes(b"")


@pytest.mark.parametrize("name", [None, "named"])
def test_a_torchrun_restart_finds_the_run_it_continues(tmp_path, monkeypatch, name):
    """torchrun --max-restarts runs the same command line again: the restarted workers must
    continue their run (by output.name, or by the rendezvous id env.json records)."""
    from fastkd.config import Config, replace
    from fastkd.rundir import restarted_run
    cfg = replace(Config(), output={"dir": str(tmp_path), "name": name})
    _finished_run(tmp_path / ("named" if name else "kd-x-1"), "job-7")
    _finished_run(tmp_path / "kd-x-0", "job-6")          # another launch's run
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-7")
    assert restarted_run(cfg, 0) is None                  # a first start is a new run
    assert restarted_run(cfg, 1) == str(tmp_path / ("named" if name else "kd-x-1"))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")     # torchrun's default id names no run
    assert (restarted_run(cfg, 1) is None) == (name is None)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    assert restarted_run(cfg, 1) is None                  # not under torchrun


def test_a_restartable_group_on_a_shared_store_is_warned(monkeypatch):
    from fastkd.distributed import restart_store_warning
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "0")
    assert restart_store_warning() is None                 # no restart, nothing to meet again
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in restart_store_warning()
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")   # what the variable gives
    assert restart_store_warning() is None
