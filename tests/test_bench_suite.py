"""The throughput suite's whole-step scenarios at their smallest settings: `fastkd bench e2e`
(conventional loop, fastkd online, fastkd from a teacher cache), `fastkd bench step` and
`fastkd bench all` write results.json, results.md and a chart holding every lane or part."""
from __future__ import annotations

import json

from fastkd.bench import all as bench_all
from fastkd.bench import e2e, step
from fastkd.cli import main as cli_main

TINY_E2E = ["--student", "test_resnet", "--teacher", "test_convnext", "--img-size", "32",
            "--batch-size", "4", "--steps", "1", "--warmup-steps", "1", "--repeats", "1",
            "--images", "20", "--device", "cpu"]
TINY_STEP = ["--pairs", "test_vit:test_resnet", "--methods", "kd,ofa", "--teacher-weights", "amp,fp32", "--img-size", "32",
             "--batch-size", "2", "--repeats", "1", "--classes", "10", "--device", "cpu"]


def report(folder) -> dict:
    assert (folder / "results.md").is_file()
    return json.loads((folder / "results.json").read_text())


def test_e2e_races_every_lane_and_projects_imagenet(tmp_path):
    out = tmp_path / "e2e"
    assert cli_main(["bench", "e2e", *TINY_E2E, "--data", str(tmp_path / "data"), "--out",
                     str(out), "--project", "imagenet"]) == 0
    rows = {row["lane"]: row for row in report(out)["rows"]}
    assert set(rows) == {"conventional", "online", "cached"}
    assert rows["conventional"]["vs conventional"] == 1
    for row in rows.values():
        assert row["img/s (median)"] > 0 and 0 <= row["data_wait"] <= 1
        assert row["peak_mem_mb"] > 0 and row["of compute floor"] > 0
    assert rows["cached"]["precompute_s"] > 0 and rows["cached"]["cached/online"] > 0
    text = (out / "results.md").read_text()
    assert "100 epochs of ImageNet-1k" in text and "OFAKD issue #2" in text
    assert (out / "e2e.png").stat().st_size > 1000


def test_e2e_lanes_can_be_chosen(tmp_path):
    args = e2e.parse_args(["--lanes", "online,cached", "--device", "cpu"])
    assert args.lanes == ["online", "cached"] and args.img_size == 112 and args.batch_size == 32


def test_step_splits_the_step_into_its_parts(tmp_path):
    assert step.main([*TINY_STEP, "--out", str(tmp_path)]) == 0
    rows = report(tmp_path)["rows"]
    assert [(row["method"], row["teacher_weights"]) for row in rows] == [
        ("kd", "amp"), ("kd", "fp32"), ("ofa", "amp"), ("ofa", "fp32")]
    for row in rows:
        parts = sum(row[f"{part}_ms"] for part in step.PARTS)
        assert parts >= row["step_ms"] - 1e-6 and row["student_ms"] > 0
    assert (tmp_path / "step.png").is_file()


def test_all_runs_every_scenario_into_its_own_folder(tmp_path, monkeypatch):
    data = ["--data", str(tmp_path / "data")]
    monkeypatch.setattr(bench_all, "SETTINGS", {
        "e2e": (TINY_E2E[:-2] + ["--lanes", "conventional,online"] + data, None),
        "step": (TINY_STEP[:-2], None),
        "kernels": (None, None)})
    assert bench_all.main(["--device", "cpu", "--out", str(tmp_path / "all")]) == 0
    assert {p.name for p in (tmp_path / "all").iterdir()} == {"e2e", "step"}
    assert {row["lane"] for row in report(tmp_path / "all" / "e2e")["rows"]} == {
        "conventional", "online"}
