"""`fastkd demo`'s data: sklearn's real digits as a fixed, stratified ImageFolder.

The full demo (three training runs, a few minutes) is what `make demo` runs; here only its
data and its table are checked, so the suite stays fast.
"""
from collections import Counter

from PIL import Image

from fastkd.demo import IMAGE_SIZE, format_table, write_digits_imagefolder


def test_digits_imagefolder_is_complete_stratified_and_reused(tmp_path):
    root = write_digits_imagefolder(tmp_path / "digits")
    files = {split: sorted((root / split).rglob("*.jpg")) for split in ("train", "val")}
    assert len(files["train"]) + len(files["val"]) == 1797
    assert len(files["val"]) == 360                       # 20 % of 1,797, rounded up by sklearn
    names = [f.name for f in files["train"] + files["val"]]
    assert len(set(names)) == len(names)                  # no sample in both splits
    val_per_class = Counter(f.parent.name for f in files["val"])
    all_per_class = Counter(f.parent.name for f in files["train"] + files["val"])
    assert sorted(val_per_class) == [str(d) for d in range(10)]
    for digit, total in all_per_class.items():          # stratified: 20 % of every class
        assert abs(val_per_class[digit] - 0.2 * total) <= 1
    with Image.open(files["val"][0]) as image:
        assert image.size == (IMAGE_SIZE, IMAGE_SIZE) and image.mode == "RGB"
    stamp = (root / ".complete").stat().st_mtime_ns
    write_digits_imagefolder(root)                        # second call: nothing rewritten
    assert (root / ".complete").stat().st_mtime_ns == stamp


def test_table_lists_every_run():
    table = format_table([("teacher", "resnet18", 99.2, 400.0, 40.0),
                          ("student", "vit", 60.0, 500.0, 50.0),
                          ("cached", "vit", 61.0, 900.0, 30.0, 12.0)])
    assert table.splitlines()[2] == "| teacher | resnet18 | 99.20 | 400 | 40 | — |"
    assert table.splitlines()[4] == "| cached | vit | 61.00 | 900 | 30 | 12 |"
    assert len(table.splitlines()) == 5


def test_demo_runs_end_to_end_and_can_run_again(tmp_path, capsys):
    """The whole `fastkd demo` at one epoch per run (the real one trains 8/40/40/40 epochs)."""
    from fastkd.demo import main
    args = ["--out", str(tmp_path), "--epochs-scale", "0.01"]
    assert main(args) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [row.split("|")[1].strip().split(" ")[0] for row in rows[1:]] == [
        "teacher", "student", "student", "student"]
    assert "KD" in rows[3] and "teacher cache" in rows[4]
    assert rows[4].split("|")[6].strip().isdigit()      # the one-off precompute time
    assert main(args) == 0          # a second demo in the same folder starts new runs


def test_demo_stops_with_143_on_sigterm(tmp_path, capsys, monkeypatch):
    """A preempted step ends the demo (exit 143, how to continue) instead of recording its
    partial accuracy and starting the next step."""
    import fastkd.demo as demo
    from fastkd.engine import RunResult
    calls = []

    def preempted(config_name, overrides):
        calls.append(config_name)
        return RunResult(run_dir=tmp_path / "teacher-run", model_name="resnet18", metrics={},
                         final_top1=None, best_top1=None, img_per_sec=0.0, preempted=True)
    monkeypatch.setattr(demo, "run_step", preempted)
    assert demo.main(["--out", str(tmp_path)]) == 143
    assert calls == ["teacher.yaml"]
    assert "--resume" in capsys.readouterr().out
