"""Fixtures for the pipeline tests; the generators live in `pipelines_imagegen`."""
from pathlib import Path

import pytest

from pipelines_imagegen import make_image_folder


@pytest.fixture
def image_root(tmp_path) -> Path:
    """15 train images (3 classes) and 7 val images."""
    root = tmp_path / "data"
    make_image_folder(root, "train", classes=3, per_class=5, seed=0)
    make_image_folder(root, "val", classes=3, per_class=2, seed=1)
    (root / "val" / "class_0" / "img_1.JPEG").unlink()  # an odd count for padding tests
    return root
