import json

from fastkd.bench import loader as bench_loader


def test_bench_loader_writes_a_report(tmp_path):
    out = tmp_path / "results"
    argv = ["--data", str(tmp_path / "set"), "--images", "12", "--threads", "1", "--epochs", "1",
            "--batch-size", "4", "--img-size", "32", "--out", str(out),
            "--only", "dali-cpu", "torchvision DataLoader"]
    assert bench_loader.main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["loader.png", "results.json", "results.md"]
    report = json.loads((out / "results.json").read_text())
    rows = {row["provider"]: row for row in report["rows"]}
    assert "torchvision DataLoader" in rows and rows["torchvision DataLoader"]["vs torchvision"] == 1
    assert all(row["img/s (median)"] > 0 for row in rows.values())
    generated = list((tmp_path / "set" / "train").glob("*/*.JPEG"))
    assert len(generated) == 12
    # Cached: a second run reuses the generated files instead of writing new ones.
    before = {p: p.stat().st_mtime_ns for p in generated}
    bench_loader.generate_dataset(tmp_path / "set", 12)
    assert before == {p: p.stat().st_mtime_ns for p in generated}


def test_only_the_chosen_providers_are_built(tmp_path, monkeypatch):
    built = []
    monkeypatch.setattr(bench_loader, "fastkd_loader",
                        lambda root, args, loader, device: built.append((loader, device)))
    monkeypatch.setattr(bench_loader, "torchvision_baseline",
                        lambda root, args: built.append("torchvision"))
    args = bench_loader._parser().parse_args(["--only", "fastkd-torch-fallback"])
    assert list(bench_loader.providers(tmp_path, args)) == ["fastkd-torch-fallback"]
    assert built == [("torch", "cpu")]
