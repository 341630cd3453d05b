import numpy as np
import torch
from PIL import Image
from timm.data import create_transform

from fastkd.pipelines import CropPlan, build_loader
from fastkd.pipelines.torch_loader import open_rgb, planned_crop
from pipelines_imagegen import data_config

CFG = {"input_size": (3, 32, 32), "interpolation": "bicubic", "crop_pct": 0.9,
       "mean": (0.0, 0.0, 0.0), "std": (1 / 255,) * 3}


def first_epoch(root, train, epoch=0):
    ld = build_loader(data_config(root, loader="torch"), split="train", train=train,
                      batch_size=6, model_cfg=CFG, seed=42)
    ld.set_epoch(epoch)
    return ld, list(ld)


def test_train_images_are_the_planned_crops(image_root):
    ld, batches = first_epoch(image_root, train=True, epoch=2)
    plan = CropPlan(42)
    for b in batches:
        for image, i in zip(b.images, b.indices.tolist()):
            img = open_rgb(ld.index.full_path(i))
            window = plan.window(2, i, img.height, img.width)
            expected = np.asarray(planned_crop(img, window, 32, "bicubic")).transpose(2, 0, 1)
            torch.testing.assert_close(image, torch.from_numpy(expected.copy()).float(),
                                       atol=1e-3, rtol=0)


def test_eval_images_are_timms_transform(image_root):
    ld, batches = first_epoch(image_root, train=False)
    timm_eval = create_transform(32, is_training=False, interpolation="bicubic", crop_pct=0.9,
                                 use_prefetcher=True)
    for b in batches:
        for image, i in zip(b.images, b.indices.tolist()):
            expected = timm_eval(Image.open(ld.index.full_path(i)).convert("RGB")).float()
            torch.testing.assert_close(image, expected, atol=1e-3, rtol=0)


def test_flip_is_applied():
    img = Image.fromarray(np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3))
    flipped = np.asarray(planned_crop(img, (0, 0, 2, 3, True), 3, "nearest"))
    plain = np.asarray(planned_crop(img, (0, 0, 2, 3, False), 3, "nearest"))
    assert np.array_equal(flipped, plain[:, ::-1])
