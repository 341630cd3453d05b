"""fastkd's input pipelines: NVIDIA DALI (default) and the plain PyTorch fallback.

`build_loader(...)` returns a loader yielding `Batch(images, labels, indices)`; see
`pipelines/build.py`. Importing this package never imports DALI: the DALI modules load only
when a DALI loader is built, so `import fastkd.pipelines` works where DALI is not installed.
"""
from .batch import Batch
from .build import build_loader
from .crop_plan import CropPlan, CropWindows
from .data_check import data_check_main
from .datasets import DataError, DatasetIndex, load_index
from .sampling import ShardPlan, epoch_order
from .settings import replayable

__all__ = ["Batch", "build_loader", "CropPlan", "CropWindows", "data_check_main", "DataError",
           "DatasetIndex", "load_index", "ShardPlan", "epoch_order", "replayable"]
