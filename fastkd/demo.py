"""`fastkd demo`: distillation on real data with nothing to download.

scikit-learn ships 1,797 real handwritten digits (8×8 grey scans, 10 classes). The demo writes
them as an ImageFolder of 32×32 JPEGs with a fixed stratified train/val split, trains a CNN
teacher, then trains a student of another family (a small ViT) alone, with KD, and with KD
from a teacher cache (the teacher's outputs on every planned view precomputed once, then
replayed: no teacher forward in the training step), and prints what it measured: top-1, the
img/s of each run and the one-off precompute time. The runs are ordinary `fastkd train` runs of
`configs/demo/*.yaml`; their run directories and the cache are kept under the output folder.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "demo"
IMAGE_SIZE = 32
EXIT_PREEMPTED = 143   # as the signal would, like `fastkd train`
VAL_FRACTION = 0.2
SPLIT_SEED = 0


def write_digits_imagefolder(root: Path) -> Path:
    """Write sklearn's digits as `root/{train,val}/<digit>/<n>.jpg` (skipped if already there)."""
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    done = root / ".complete"
    if done.exists():
        return root
    digits = load_digits()
    images = (digits.images / 16.0 * 255.0).clip(0, 255).astype(np.uint8)
    indices = np.arange(len(images))
    train_idx, val_idx = train_test_split(indices, test_size=VAL_FRACTION, random_state=SPLIT_SEED,
                                          stratify=digits.target)
    for split, split_idx in (("train", train_idx), ("val", val_idx)):
        for i in split_idx:
            folder = root / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            grey = Image.fromarray(images[i], mode="L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
            grey.convert("RGB").save(folder / f"{i:04d}.jpg", quality=95)
    done.write_text(f"{len(train_idx)} train, {len(val_idx)} val\n")
    return root


def run_step(config_name: str, overrides: list[str]):
    """One `fastkd train` run of a demo config; returns the engine's RunResult."""
    from fastkd.config import load_config
    from fastkd.engine import train

    cfg = load_config(CONFIG_DIR / config_name, overrides)
    return train(cfg)


def build_teacher_cache(config_name: str, overrides: list[str]) -> float:
    """`fastkd cache build` for a demo config; returns its wall time in seconds."""
    from fastkd.cache import build_cache
    from fastkd.config import load_config

    start = time.perf_counter()
    build_cache(load_config(CONFIG_DIR / config_name, overrides))
    return time.perf_counter() - start


def format_table(rows: list[tuple]) -> str:
    """Rows of (run, model, top-1, img/s, wall s[, precompute s])."""
    lines = ["| run | model | top-1 (%) | img/s (train) | wall (s) | teacher precompute (s) |",
             "|---|---|---|---|---|---|"]
    for name, model, top1, ips, wall, *precompute in rows:
        once = f"{precompute[0]:.0f}" if precompute else "—"
        lines.append(f"| {name} | {model} | {top1:.2f} | {ips:.0f} | {wall:.0f} | {once} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastkd demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo",
                        help="folder for the data, the teacher cache and the four runs")
    parser.add_argument("--epochs-scale", type=float, default=1.0,
                        help="multiply every run's epochs (e.g. 0.25 for a quick look)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    data_root = write_digits_imagefolder(out / "digits")
    common = [f"data.root={data_root}", f"output.dir={out}"]

    def epochs(config_name: str) -> list[str]:
        import yaml
        base = yaml.safe_load((CONFIG_DIR / config_name).read_text())["train"]["epochs"]
        return [f"train.epochs={max(1, round(base * args.epochs_scale))}"]

    rows = []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    # Ten classes: all logits in fp32 cost 40 bytes per image and epoch, and make the cached
    # run the online KD run without the teacher's forward (fp16 or top-k records perturb the
    # targets slightly, which over 40 epochs moves the final top-1 by seed-level noise).
    cache = f"cache.dir={out / f'teacher-cache-{stamp}'}"
    cache_format = ["cache.topk=0", "cache.dtype=fp32"]
    steps = [("teacher (CNN)", "teacher.yaml", [], "teacher"),
             ("student alone (ViT, 4 blocks × 96)", "student.yaml", [], "student"),
             ("student + KD (same ViT ← CNN teacher)", "student_kd.yaml", None, "student_kd"),
             ("student + KD from the teacher cache", "student_kd.yaml", [cache, *cache_format],
              "student_kd_cached")]
    teacher_weights = None
    for label, config_name, extra, run_name in steps:
        extra = list(extra or []) + ([f"teacher.checkpoint={teacher_weights}"]
                                     if config_name == "student_kd.yaml" else [])
        overrides = common + epochs(config_name) + extra
        precompute = [build_teacher_cache(config_name, overrides)] if cache in extra else []
        start = time.perf_counter()
        name = f"output.name={run_name}-{stamp}"  # a rerun never meets an old run
        result = run_step(config_name, overrides + [name])
        if result.preempted:      # SIGTERM: the run wrote its checkpoint; stop the demo too
            print(f"[demo] stopped by SIGTERM during '{label}'; its checkpoint is in "
                  f"{result.run_dir}: continue that run with `fastkd train --resume "
                  f"{result.run_dir}`, or run `fastkd demo --out {out}` again", flush=True)
            return EXIT_PREEMPTED
        wall = time.perf_counter() - start
        if teacher_weights is None:
            teacher_weights = Path(result.run_dir) / "student.safetensors"
        rows.append((label, result.model_name, result.final_top1, result.img_per_sec, wall,
                     *precompute))
        print(f"[demo] {label}: top-1 {result.final_top1:.2f}% ({wall:.0f} s)", flush=True)
    print("\nfastkd demo — sklearn digits (1,797 real 8×8 scans → 32×32 JPEG), "
          f"{int((1 - VAL_FRACTION) * 100)}/{int(VAL_FRACTION * 100)} split, final-epoch top-1 on val\n")
    print(format_table(rows))
    return 0
