"""Image generators and config helpers for the pipeline tests (imported by name; see conftest)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from fastkd.config import DataConfig

MODEL_CFG = {"input_size": (3, 32, 32), "interpolation": "bilinear",
             "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "crop_pct": 0.875}


def data_config(root, **overrides) -> DataConfig:
    """A DataConfig for tests: no worker processes unless asked (2 shared cores)."""
    overrides.setdefault("num_workers", 0)
    return DataConfig(root=str(root), **overrides)


def smooth_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """An RGB image with gradients and blobs: JPEG-friendly, and crops of it differ."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for _ in range(3):
        fy, fx, phase = rng.uniform(0.02, 0.2), rng.uniform(0.02, 0.2), rng.uniform(0, 6)
        channels.append(127 + 100 * np.sin(fy * y + fx * x + phase))
    img = np.stack(channels, axis=-1) + rng.normal(0, 8, (height, width, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def write_image(path: Path, array: np.ndarray, fmt: str = "JPEG", mode: str = "RGB",
                quality: int = 90) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array).convert(mode)
    img.save(path, format=fmt, **({"quality": quality} if fmt in ("JPEG", "WEBP") else {}))
    return path


def jpeg_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_image_folder(root: Path, split: str = "train", classes: int = 3, per_class: int = 5,
                      seed: int = 0) -> Path:
    """root/split/class_k/img_i.JPEG with sizes between 24 and 64 pixels a side."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        for i in range(per_class):
            h, w = int(rng.integers(24, 65)), int(rng.integers(24, 65))
            write_image(root / split / f"class_{c}" / f"img_{i}.JPEG", smooth_image(rng, h, w))
    return root


def make_bad_and_odd_files(class_dir: Path, seed: int = 5) -> tuple[list[str], list[str]]:
    """The files a real crawl contains: (names that must decode, names that must be excluded)."""
    rng = np.random.default_rng(seed)
    class_dir.mkdir(parents=True, exist_ok=True)
    decodable = {"png_named.JPEG": ("PNG", "RGB"), "webp_named.JPEG": ("WEBP", "RGB"),
                 "cmyk.JPEG": ("JPEG", "CMYK"), "gray.JPEG": ("JPEG", "L"),
                 "rgba.png": ("PNG", "RGBA")}
    for name, (fmt, mode) in decodable.items():
        write_image(class_dir / name, smooth_image(rng, 40, 52), fmt=fmt, mode=mode)
    # A multi-picture JPEG (phone cameras): PIL calls its format MPO.
    first, second = (Image.fromarray(smooth_image(rng, 40, 52)) for _ in range(2))
    first.save(class_dir / "multi_picture.JPEG", format="MPO", save_all=True,
               append_images=[second])
    decodable["multi_picture.JPEG"] = ("MPO", "RGB")
    whole = jpeg_bytes(smooth_image(rng, 48, 64))
    (class_dir / "truncated.JPEG").write_bytes(whole[: len(whole) * 2 // 3])
    (class_dir / "empty.JPEG").write_bytes(b"")
    (class_dir / "notes.txt").write_text("downloaded from somewhere\n")
    return sorted(decodable), ["empty.JPEG", "notes.txt", "truncated.JPEG"]


def write_photograph_folder(root: Path, split: str = "val") -> Path:
    """One class of real photographs saved as JPEG q90: what the fidelity tests decode."""
    from fastkd.bench.loader import bundled_photographs
    for i, photo in enumerate(bundled_photographs()):
        write_image(root / split / "photos" / f"photo_{i}.JPEG", photo)
    return root
