"""The `fastkd` command: every verb's --help, the pass-through verbs, exit statuses, and a
train → eval → export session driven through `fastkd.cli.main` in-process."""
from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
import timm
import torch

from fastkd import __version__
from fastkd.cli import VERBS, cmd_bench, main, methods_table
from fastkd.distillers import DISTILLERS
from fastkd.distillers.base import Vanilla

from run_helpers import NUM_CLASSES, make_image_folder, write_config

VERBS = ("train", "eval", "export", "methods", "data", "bench")


@pytest.fixture
def cfg_path(tmp_path):
    make_image_folder(tmp_path / "data")
    return write_config(tmp_path, train={"epochs": 1, "max_steps_per_epoch": 2})


def exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as stop:   # argparse's --help / --version / usage errors
        return stop.code


def test_version_and_help_on_every_verb(capsys):
    assert exit_code(["--version"]) == 0
    assert __version__ in capsys.readouterr().out
    for verb in VERBS:
        assert exit_code([verb, "--help"]) == 0, verb
        assert "usage: fastkd " + verb in capsys.readouterr().out
    assert exit_code(["data", "check", "--help"]) == 0        # the checker's own parser
    assert "--full" in capsys.readouterr().out
    assert exit_code(["demo", "--help"]) == 0                  # the demo's own parser
    assert "usage: fastkd demo" in capsys.readouterr().out


def test_console_script_runs_as_a_module():
    done = subprocess.run([sys.executable, "-m", "fastkd", "--version"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == f"fastkd {__version__}"


def test_methods_lists_every_registered_method_with_its_needs(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert out == methods_table() + "\n"
    rows = {line.split("|")[1].strip(): line for line in out.splitlines()[2:]}
    assert set(rows) == set(DISTILLERS)
    assert "| none | no | no | - | - | no | n/a |" in rows["none"]
    assert "| crd | yes | no | pooled | pooled | no | yes |" in rows["crd"]
    assert "| scalekd | yes | yes | stage 3,4 | stage 3,4 | yes | no |" in rows["scalekd"]


def test_missing_bench_scenario_fails_clearly(capsys):
    assert cmd_bench(argparse.Namespace(scenario="no_such_scenario", rest=[])) == 1
    assert "not available" in capsys.readouterr().err


@pytest.mark.parametrize("line, prog", [
    (["train"], "fastkd train"), (["eval"], "fastkd eval"), (["export"], "fastkd export"),
    (["methods"], "fastkd methods"), (["data"], "fastkd data"), (["data", "check"], "fastkd data check"),
    (["cache"], "fastkd cache"), (["cache", "build"], "fastkd cache build"),
    (["bench"], "fastkd bench"), (["bench", "step"], "fastkd bench step"), (["demo"], "fastkd demo"),
])
def test_every_verb_help_is_its_own(line, prog, capsys):
    """One dispatch: `--help` after any verb (or sub-verb) reaches the parser that owns it."""
    with pytest.raises(SystemExit) as stop:
        main(line + ["--help"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: {prog} ")


def test_top_level_help_lists_every_verb(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in VERBS)


@pytest.mark.parametrize("line", [["nope"], ["bench", "nope"], ["data", "nope"],
                                  ["train", "--bogus"], ["export"], []])
def test_bad_command_lines_exit_2(line, capsys):
    with pytest.raises(SystemExit) as stop:
        main(line)
    assert stop.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_data_check_passes_through(tmp_path, capsys):
    make_image_folder(tmp_path / "data")
    assert main(["data", "check", str(tmp_path / "data")]) == 0
    assert main(["data", "check", str(tmp_path / "nowhere")]) == 2


def test_train_eval_export_session(cfg_path, tmp_path, capsys):
    assert main(["train", str(cfg_path), "train.ema=true"]) == 0
    out = capsys.readouterr().out
    run_dir = tmp_path / "runs" / "run"
    assert f"done: {run_dir}" in out and "epoch 1 done" in out

    assert main(["eval", str(run_dir)]) == 0
    shown = capsys.readouterr().out
    assert "student: top-1" in shown and "ema: top-1" in shown
    assert main(["eval", str(cfg_path), "--checkpoint", str(run_dir / "student.safetensors")]) == 0
    assert "student: top-1" in capsys.readouterr().out
    assert main(["eval", str(run_dir), "--checkpoint", str(tmp_path / "missing.pt")]) == 2

    (run_dir / "student.safetensors").unlink()
    assert main(["export", str(run_dir), "--ema", "--checkpoint", "best"]) == 0
    assert "EMA weights of best.pt" in capsys.readouterr().out
    assert (run_dir / "student.safetensors").is_file()

    # resuming a finished run with a harmless change trains the extra epoch only
    assert main(["train", "--resume", str(run_dir), "train.epochs=2"]) == 0
    assert "resumed at epoch 2" in capsys.readouterr().out
    # ... and a change that would train another run is refused, config.yaml untouched
    before = (run_dir / "config.yaml").read_text()
    assert main(["train", "--resume", str(run_dir), "optim.lr=0.5"]) == 2
    err = capsys.readouterr().err
    assert "optim.lr" in err and "Traceback" not in err
    assert (run_dir / "config.yaml").read_text() == before


def test_user_errors_exit_2_without_traceback(cfg_path, tmp_path, capsys, monkeypatch):
    class VitStudentsOnly(Vanilla):
        name = "vit_only_cli_test"
        student_families = ("vit",)
    monkeypatch.setitem(DISTILLERS, VitStudentsOnly.name, VitStudentsOnly)
    assert main(["train", str(cfg_path), "distill.method=vit_only_cli_test"]) == 2
    assert "cnn student" in capsys.readouterr().err

    if "kd" in DISTILLERS:   # a teacher trained for 10 classes on 4-class data
        teacher = tmp_path / "teacher10.pth"
        torch.save(timm.create_model("test_vit", num_classes=10, img_size=32).state_dict(), teacher)
        assert main(["train", str(cfg_path), "distill.method=kd", "teacher.name=test_vit",
                     f"teacher.checkpoint={teacher}", "teacher.kwargs={img_size: 32}",
                     "output.name=mismatch"]) == 2
        err = capsys.readouterr().err
        assert f"{NUM_CLASSES} classes" in err and "10-class head" in err

    assert main(["train"]) == 2
    assert "CONFIG" in capsys.readouterr().err
    assert main(["train", str(cfg_path), "data.root=" + str(tmp_path / "nowhere"),
                 "output.name=nodata"]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_unreadable_weights_are_a_usage_error_not_a_traceback(cfg_path, tmp_path, capsys):
    assert main(["train", str(cfg_path), "train.epochs=1"]) == 0
    run_dir = next((tmp_path / "runs").iterdir())
    junk = tmp_path / "junk.pt"
    torch.save({"not": "weights"}, junk)
    assert main(["export", str(run_dir), "--checkpoint", str(junk)]) == 2
    assert main(["eval", str(run_dir), "--checkpoint", str(junk)]) == 2
    err = capsys.readouterr().err
    assert "junk.pt" in err and "Traceback" not in err


# ------------------------------------------------------------------------------ exit 2, one line


@pytest.mark.parametrize("override, message", [
    ("model.name=resnet_18", "is not a timm model; did you mean"),
    ("model.kwargs={depth_multiplier: 2}", "model.kwargs"),
    ("teacher.name=not_a_model", "teacher.name"),
])
def test_model_mistakes_exit_2_with_one_line(cfg_path, capsys, override, message):
    assert main(["train", str(cfg_path), override]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_eval_with_a_checkpoint_of_another_architecture_exits_2(cfg_path, tmp_path, capsys):
    import timm
    import torch
    other = tmp_path / "other.pth"
    torch.save(timm.create_model("test_vit", num_classes=4).state_dict(), other)
    assert main(["eval", str(cfg_path), "--checkpoint", str(other)]) == 2
    err = capsys.readouterr().err
    assert "does not fit test_resnet" in err and "Traceback" not in err


def test_a_full_disk_exits_2_saying_so(cfg_path, capsys, monkeypatch):
    import errno
    import fastkd.checkpoint as checkpoint

    def no_space(obj, handle):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(checkpoint.torch, "save", no_space)
    assert main(["train", str(cfg_path)]) == 2
    err = capsys.readouterr().err
    assert "the disk is full" in err and "last.pt" in err and "Traceback" not in err
