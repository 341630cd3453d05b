"""`fastkd bench loader`: train-loader img/s of DALI-CPU, DALI-GPU and torchvision, side by side.

The data set is ImageNet-like (JPEG q90, about 500x375, a few classes), generated once from the
photographs bundled with scikit-learn and scikit-image by random crops, scales and flips, and
cached in `--data`. Every provider produces the same thing: RandomResizedCrop + flip at 224,
normalized float, with the same thread/worker count. The providers run round-robin, one epoch
each in turn, so load from other processes on the machine affects them alike; the figure is
the median over the measured epochs, after one warm-up epoch each.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from fastkd.bench.report import bar_chart, default_out, write_report

DEFAULT_DATA = os.path.join("~", ".cache", "fastkd", "bench-imagenet-like")
_CLASSES = 10


def bundled_photographs() -> list[np.ndarray]:
    """Real photographs that ship with scikit-learn and scikit-image (no download)."""
    import skimage.data as photos
    from sklearn.datasets import load_sample_images
    return list(load_sample_images().images) + [photos.astronaut(), photos.chelsea(),
                                                photos.coffee(), photos.rocket()]


def _imagenet_like(photo: np.ndarray, rng: np.random.Generator):
    """A random crop of `photo`, flipped at random, resized to about 500x375 (or 375x500)."""
    from PIL import Image
    h, w = photo.shape[:2]
    area = rng.uniform(0.3, 1.0) * h * w
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    ch, cw = min(h, int(np.sqrt(area / aspect))), min(w, int(np.sqrt(area * aspect)))
    top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    img = Image.fromarray(photo[top:top + ch, left:left + cw])
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    long_side, short_side = int(rng.integers(440, 561)), int(rng.integers(330, 421))
    size = (long_side, short_side) if rng.random() < 0.8 else (short_side, long_side)
    return img.resize(size, Image.BICUBIC)


def generate_dataset(root: Path, num_images: int, seed: int = 0) -> Path:
    """ImageFolder `root/train/class_k/*.JPEG`; reused when already generated with these args."""
    stamp = root / "generated.json"
    params = {"images": num_images, "seed": seed, "classes": _CLASSES}
    if stamp.exists() and json.loads(stamp.read_text()) == params:
        return root
    print(f"generating {num_images} ImageNet-like JPEGs in {root} (once)")
    rng = np.random.default_rng(seed)
    photos = bundled_photographs()
    for i in range(num_images):
        out = root / "train" / f"class_{i % _CLASSES}" / f"img_{i:06d}.JPEG"
        out.parent.mkdir(parents=True, exist_ok=True)
        _imagenet_like(photos[rng.integers(len(photos))], rng).save(out, quality=90)
    stamp.write_text(json.dumps(params))
    return root


def torchvision_baseline(root: Path, args):
    """The plain torchvision recipe every DataLoader user starts from."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms
    tf = transforms.Compose([transforms.RandomResizedCrop(args.img_size),
                             transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                             transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    return DataLoader(datasets.ImageFolder(str(root / "train"), tf), batch_size=args.batch_size,
                      shuffle=True, num_workers=args.threads, persistent_workers=True)


def fastkd_loader(root: Path, args, loader: str, device: str):
    from fastkd.config import DataConfig
    from fastkd.pipelines import build_loader
    data = DataConfig(root=str(root), loader=loader, num_workers=args.threads)
    cfg = {"input_size": (3, args.img_size, args.img_size), "interpolation": "bilinear"}
    return build_loader(data, split="train", train=True, batch_size=args.batch_size,
                        model_cfg=cfg, seed=0, device=device)


def providers(root: Path, args) -> dict:
    """The providers to measure; only those chosen by `--only` are built (a DALI-GPU pipeline
    preallocates hundreds of MB, a DataLoader starts worker processes)."""
    from fastkd.pipelines.build import dali_available
    builders = {}
    if dali_available():
        builders["dali-cpu"] = lambda: fastkd_loader(root, args, "dali", "cpu")
        if torch.cuda.is_available():
            builders["dali-gpu"] = lambda: fastkd_loader(root, args, "dali", "cuda")
    builders["fastkd-torch-fallback"] = lambda: fastkd_loader(root, args, "torch", "cpu")
    builders["torchvision DataLoader"] = lambda: torchvision_baseline(root, args)
    return {name: build() for name, build in builders.items()
            if not args.only or name in args.only}


def time_epoch(loader, epoch: int) -> tuple[int, float]:
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    start, images = time.perf_counter(), 0
    for batch in loader:
        images += len(batch[0])
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return images, time.perf_counter() - start


def measure(loaders: dict, epochs: int) -> dict[str, list[float]]:
    """img/s per measured epoch; epoch 0 is the warm-up (page cache, thread pools, workers)."""
    rates = {name: [] for name in loaders}
    for epoch in range(epochs + 1):
        for name, loader in loaders.items():
            images, seconds = time_epoch(loader, epoch)
            if epoch > 0:
                rates[name].append(images / seconds)
    return rates


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastkd bench loader", description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=DEFAULT_DATA, help="where the generated set is cached")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2,
                        help="DALI threads = DataLoader workers")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=3, help="measured epochs (after a warm-up)")
    parser.add_argument("--only", nargs="+", default=None, help="run only these providers")
    parser.add_argument("--out", default=default_out("loader"), help="results folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    root = generate_dataset(Path(os.path.expanduser(args.data)), args.images)
    rates = measure(providers(root, args), args.epochs)
    baseline = statistics.median(rates.get("torchvision DataLoader") or [float("nan")])
    rows = []
    for name, values in rates.items():
        median = statistics.median(values)
        rows.append({"provider": name, "threads": args.threads, "batch": args.batch_size,
                     "img_size": args.img_size, "images": args.images, "epochs": args.epochs,
                     "img/s (median)": median, "min": min(values), "max": max(values),
                     "vs torchvision": median / baseline})
    notes = ("Train loader only (RandomResizedCrop + flip, normalized float32), no model. "
             "Providers run round-robin, one epoch each; median of the measured epochs after "
             "one warm-up epoch each.")
    json_path, md_path = write_report(
        "loader", rows, args.out, notes=notes,
        chart=lambda path: bar_chart(path, [r["provider"] for r in rows],
                                     [r["img/s (median)"] for r in rows],
                                     title=f"train loader, {args.img_size} px, {args.threads} threads",
                                     ylabel="img/s (median)",
                                     annotations=[f"{r['vs torchvision']:.2f}x" for r in rows]))
    print(md_path.read_text())
    print(f"written: {json_path}, {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
