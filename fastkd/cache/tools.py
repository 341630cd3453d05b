"""`fastkd cache build | verify | info`: the command line of the teacher cache.

    fastkd cache build CONFIG [key=value ...] [--batch-size N]
    fastkd cache verify DIR [--teacher] [--samples N] [key=value ...]
    fastkd cache info DIR

`verify` checks the manifest, every shard's record count, size and sha256; with `--teacher` it
also recomputes N random records with the live teacher (rebuilt from the config stored in the
manifest; `key=value` overrides, e.g. a moved `data.root` or `teacher.checkpoint`) and prints
the largest difference per field. Exit 0: the cache is sound; 1: a shard is damaged or differs.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from .layout import RecordLayout, ShardReader, read_manifest, sha256_file

EXIT_DAMAGED = 1


def check_shards(directory: Path, manifest: dict) -> list[str]:
    """Problems with the shard files the manifest lists (missing, size, count, checksum)."""
    problems = []
    dtype = RecordLayout.from_json(manifest["layout"]).numpy_dtype()
    for entry in manifest["shards"]:
        path = directory / entry["file"]
        if not path.is_file():
            problems.append(f"{entry['file']}: missing")
            continue
        if path.stat().st_size != entry["bytes"]:
            problems.append(f"{entry['file']}: {path.stat().st_size} bytes, manifest says "
                            f"{entry['bytes']}")
            continue
        if sha256_file(path) != entry["sha256"]:
            problems.append(f"{entry['file']}: checksum differs from the manifest (corrupted)")
            continue
        records = np.load(path, mmap_mode="r")
        if records.shape != (entry["count"],) or records.dtype != dtype:
            problems.append(f"{entry['file']}: holds {records.shape[0]} records of another layout "
                            f"than the manifest's {entry['count']}")
    return problems


def teacher_differences(directory: Path, manifest: dict, samples: int, overrides: list[str],
                        seed: int = 0) -> dict[str, float]:
    """Largest |cached − live| per field over `samples` random (epoch, sample) records."""
    import torch

    from fastkd.build import amp_dtype, build_teacher
    from fastkd.config import Config, from_dict, merge, parse_overrides
    from fastkd.pipelines import build_loader
    from fastkd.pipelines.settings import resolve_image_settings

    from .meta import student_data_config
    from .precompute import ShardBatches, teacher_records
    from .layout import ShardSpec

    cfg = from_dict(Config, merge(manifest["config"], parse_overrides(overrides)))
    layout = RecordLayout.from_json(manifest["layout"])
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.train.device != "cpu"
                          else "cpu")
    model_cfg = student_data_config(cfg, layout.num_classes)
    settings = resolve_image_settings(cfg.data, model_cfg)
    teacher = build_teacher(cfg, layout.num_classes, device=device,
                            student_mean_std=(settings.mean, settings.std))
    rng = np.random.default_rng(seed)
    n = manifest["data"]["num_samples"]
    picks = {}
    for _ in range(samples):
        picks.setdefault(int(rng.integers(1, manifest["epochs"] + 1)), set()).add(
            int(rng.integers(0, n)))
    plan = ShardBatches(max(len(v) for v in picks.values()), seed=cfg.train.seed, rank=0)
    loader = build_loader(cfg.data, split=cfg.data.train_split, train=True,
                          batch_size=plan.batch_size, model_cfg=model_cfg, seed=cfg.train.seed,
                          device=device, amp_dtype=amp_dtype(cfg),
                          channels_last=cfg.train.channels_last, num_classes=layout.num_classes,
                          plan=plan)
    reader = ShardReader(directory, manifest)
    worst: dict[str, float] = {}
    for epoch, ids in sorted(picks.items()):
        plan.select([ShardSpec(epoch, 0, i, 1) for i in sorted(ids)])   # batches of one
        loader.set_epoch(epoch)
        for batch in loader:
            index = batch.indices.cpu().numpy()
            live = teacher_records(teacher, batch.images, layout)
            cached = reader.gather(epoch, index)
            for name, values in live.items():
                diff = _field_difference(name, cached[name], values)
                worst[name] = max(worst.get(name, 0.0), diff)
    return worst


def _field_difference(name: str, cached: np.ndarray, live: np.ndarray) -> float:
    if name == "ids":   # top-k ids: the share of positions whose class differs (ties may swap)
        return float(np.mean(cached != live))
    return float(np.max(np.abs(cached.astype(np.float64) - live.astype(np.float64))))


def servable_methods(layout: RecordLayout) -> list[str]:
    """Registered methods whose default-parameter `Needs` this cache's records satisfy."""
    from fastkd.distillers import DISTILLERS, build_params

    from .replay import missing_fields
    names = []
    for name, cls in sorted(DISTILLERS.items()):
        needs = cls.needs_for(build_params(name, {}))
        if needs.teacher and needs.cacheable and not missing_fields(layout, needs, name):
            names.append(name)
    return names


def info_text(directory: Path, manifest: dict) -> str:
    layout = RecordLayout.from_json(manifest["layout"])
    t, p, img = manifest["teacher"], manifest["plan"], manifest["image"]
    n, epochs = manifest["data"]["num_samples"], manifest["epochs"]
    total = sum(e["bytes"] for e in manifest["shards"])
    lines = [
        f"teacher cache {directory} ({'complete' if manifest.get('complete') else 'UNFINISHED'})",
        f"  teacher: {t['name']} (weights sha256 {str(t['checkpoint_sha256'])[:12]}, "
        f"pretrained={t['pretrained']}, kwargs={t['kwargs']})",
        f"  data: split '{manifest['data']['split']}', {n} samples, fingerprint "
        f"{manifest['data']['fingerprint'][:12]}",
        f"  views: {epochs} planned epochs, seed {p['seed']}, scale {p['scale']}, ratio "
        f"{[round(r, 4) for r in p['ratio']]}, hflip {p['hflip']}; {img['img_size']} px "
        f"{img['interpolation']}, mean {img['mean']}, std {img['std']}",
        f"  records: {layout.describe()}; {manifest['record_bytes']} B per sample-epoch, "
        f"{len(manifest['shards'])} shards, {total / 1e6:.1f} MB on disk",
        f"  serves: {', '.join(servable_methods(layout)) or 'no registered method'}",
    ]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastkd cache", description=__doc__.split("\n\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="build|verify|info")
    build = verbs.add_parser("build", help="precompute the teacher over cache.epochs planned epochs")
    build.add_argument("config", metavar="CONFIG")
    build.add_argument("overrides", nargs="*", metavar="key=value")
    build.add_argument("--batch-size", type=int, help="precompute batch (default: cache."
                       "batch_size, else the largest that fits on a GPU, train.batch_size on CPU)")
    verify = verbs.add_parser("verify", help="check manifest, counts and checksums")
    verify.add_argument("dir", metavar="DIR")
    verify.add_argument("overrides", nargs="*", metavar="key=value",
                        help="with --teacher: overrides of the config stored in the manifest")
    verify.add_argument("--teacher", action="store_true",
                        help="also recompute random records with the live teacher")
    verify.add_argument("--samples", type=int, default=8, help="records to recompute (8)")
    info = verbs.add_parser("info", help="what the cache holds and which methods it serves")
    info.add_argument("dir", metavar="DIR")
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.verb == "build":
        from fastkd.config import load_config

        from .precompute import build_cache
        build_cache(load_config(args.config, args.overrides), batch_size=args.batch_size)
        return 0
    directory = Path(args.dir)
    manifest = read_manifest(directory)
    if args.verb == "info":
        print(info_text(directory, manifest))
        return 0
    problems = [] if manifest.get("complete") else ["the manifest is unfinished (precompute "
                                                    "stopped early; rerun fastkd cache build)"]
    problems += check_shards(directory, manifest)
    for problem in problems:
        print(f"fastkd cache verify: {problem}")
    if not problems:
        print(f"fastkd cache verify: {len(manifest['shards'])} shards, counts and checksums ok")
    if args.teacher and not problems:
        worst = teacher_differences(directory, manifest, args.samples, args.overrides)
        print("largest |cached - live| over "
              f"{args.samples} records: " + ", ".join(f"{k} {v:.3g}" for k, v in worst.items()))
    return EXIT_DAMAGED if problems else 0
