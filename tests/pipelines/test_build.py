import subprocess
import sys

import pytest
import torch

from fastkd.pipelines import build, replayable
from fastkd.pipelines.datasets import DataError
from fastkd.pipelines.settings import parse_rand_augment, resolve_image_settings
from pipelines_imagegen import MODEL_CFG, data_config


def make(root, **kw):
    return build.build_loader(data_config(root, **kw), split="val", train=False, batch_size=2,
                              model_cfg=MODEL_CFG, seed=0)


def test_auto_falls_back_to_torch_with_one_notice(image_root, monkeypatch, caplog):
    caplog.set_level("INFO", logger="fastkd")
    monkeypatch.setattr(build, "dali_available", lambda: False)
    monkeypatch.setattr(build, "_notice_printed", False)
    kinds = [make(image_root).kind, make(image_root).kind]
    assert kinds == ["torch", "torch"]
    lines = [r.getMessage() for r in caplog.records if r.name == "fastkd.pipelines.build"]
    assert len(lines) == 1 and "DALI" in lines[0]
    with pytest.raises(RuntimeError, match="DALI"):
        make(image_root, loader="dali")


def test_choose_kind_rules():
    ns = lambda **kw: data_config("/x", **kw)   # noqa: E731
    assert build.choose_kind(ns(loader="torch"), torch.device("cpu")) == "torch"
    if build.dali_available():
        assert build.choose_kind(ns(), torch.device("cpu")) == "dali-cpu"
        assert build.choose_kind(ns(), torch.device("cuda", 1)) == "dali-gpu"
        assert build.choose_kind(ns(dali_device="cpu"), torch.device("cuda")) == "dali-cpu"
        with pytest.raises(ValueError, match="CUDA"):
            build.choose_kind(ns(dali_device="gpu"), torch.device("cpu"))


def test_import_does_not_load_dali():
    code = ("import sys, fastkd.pipelines; "
            "assert not any(m.startswith('nvidia.dali') for m in sys.modules), 'DALI imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_num_classes_and_label_range(image_root):
    ld = build.build_loader(data_config(image_root, loader="torch"), split="val", train=False,
                            batch_size=2, model_cfg=MODEL_CFG, seed=0, num_classes=10)
    assert ld.num_classes == 10
    with pytest.raises(DataError, match="out of range"):
        build.build_loader(data_config(image_root, loader="torch"), split="val", train=False,
                           batch_size=2, model_cfg=MODEL_CFG, seed=0, num_classes=2)


def test_replayable_only_with_plain_crop_and_flip():
    assert replayable(data_config("/x"))
    for extra in [dict(auto_augment="rand-m9-mstd0.5-inc1"), dict(color_jitter=0.4),
                  dict(reprob=0.25), dict(mixup=0.8), dict(cutmix=1.0)]:
        assert not replayable(data_config("/x", **extra)), extra
    assert replayable(data_config("/x", label_smoothing=0.1, hflip=0.0))


def test_image_settings_resolution():
    s = resolve_image_settings(data_config("/x"), MODEL_CFG)
    assert (s.img_size, s.crop_pct, s.interpolation, s.eval_resize) == (32, 0.875, "bilinear", 36)
    s = resolve_image_settings(data_config("/x", img_size=224, crop_pct=0.95, mean=(0.5,) * 3,
                                           interpolation="random"), MODEL_CFG)
    assert (s.img_size, s.eval_resize, s.mean, s.std) == (224, 235, (0.5,) * 3, MODEL_CFG["std"])
    assert s.interpolation == "bicubic"
    assert resolve_image_settings(data_config("/x"), {}).img_size == 224


def test_parse_rand_augment():
    spec = parse_rand_augment("rand-m9-mstd0.5-inc1")
    assert (spec.magnitude, spec.num_ops, spec.magnitude_std, spec.increasing) == (9, 2, 0.5, True)
    assert parse_rand_augment("rand-n3-m7").num_ops == 3
    with pytest.raises(ValueError):
        parse_rand_augment("augmix-m5")
