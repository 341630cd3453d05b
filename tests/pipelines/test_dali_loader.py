"""DALI-specific checks: fidelity to timm's eval transform, replay of the crop plan, GPU output."""
import pytest
import torch
from PIL import Image
from timm.data import create_transform

from fastkd.pipelines import build_loader
from pipelines_imagegen import data_config, write_photograph_folder

pytestmark = pytest.mark.dali

# mean 0, std 1/255: normalized outputs are in gray levels, so differences read as 0..255.
GRAY_LEVELS = {"mean": (0.0, 0.0, 0.0), "std": (1 / 255,) * 3}


@pytest.fixture(scope="module")
def photo_root(tmp_path_factory):
    return write_photograph_folder(tmp_path_factory.mktemp("photos"))


def model_cfg(size, interpolation, crop_pct):
    return {"input_size": (3, size, size), "interpolation": interpolation,
            "crop_pct": crop_pct, **GRAY_LEVELS}


def first_epoch(root, *, loader, train, cfg, device="cpu", **kw):
    ld = build_loader(data_config(root, loader=loader), split="val", train=train, batch_size=8,
                      model_cfg=cfg, seed=0, device=device, **kw)
    ld.set_epoch(0)
    return ld, [b for b in ld]


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("crop_pct", [0.875, 0.95])
def test_eval_matches_timm_pil_transform(photo_root, interpolation, crop_pct):
    """Mean absolute pixel difference to timm's PIL eval transform on real photographs."""
    cfg = model_cfg(224, interpolation, crop_pct)
    ld, batches = first_epoch(photo_root, loader="dali", train=False, cfg=cfg)
    timm_eval = create_transform(224, is_training=False, interpolation=interpolation,
                                 crop_pct=crop_pct, use_prefetcher=True)   # uint8, no normalize
    diffs = []
    for b in batches:
        for image, i in zip(b.images, b.indices.tolist()):
            reference = timm_eval(Image.open(ld.index.full_path(i)).convert("RGB")).float()
            diffs.append((image - reference).abs().mean().item())
    print(f"\nDALI-CPU eval vs timm ({interpolation}, crop_pct={crop_pct}): mean abs diff per "
          f"photo, gray levels: {[round(d, 3) for d in diffs]}")
    assert len(diffs) == 6
    assert max(diffs) < 0.5     # measured about 0.1-0.2: rounding, not geometry


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_train_replays_the_same_windows_as_torch(photo_root, interpolation):
    cfg = model_cfg(96, interpolation, 0.875)
    _, dali = first_epoch(photo_root, loader="dali", train=True, cfg=cfg)
    _, torch_fallback = first_epoch(photo_root, loader="torch", train=True, cfg=cfg)
    for x, y in zip(dali, torch_fallback):
        assert torch.equal(x.indices, y.indices)
        per_sample = (x.images - y.images).abs().mean(dim=(1, 2, 3))
        assert per_sample.max() < 0.5, per_sample   # a wrong window or flip costs tens of levels


def test_auto_picks_dali_cpu_on_cpu_device(photo_root):
    ld, _ = first_epoch(photo_root, loader="auto", train=False, cfg=model_cfg(32, "bilinear", 0.9))
    assert ld.kind == "dali-cpu"


@pytest.mark.gpu
@pytest.mark.parametrize("amp_dtype,channels_last", [(torch.float16, True), (torch.bfloat16, False),
                                                      (None, True)])
def test_gpu_pipeline_dtype_layout_and_device(photo_root, amp_dtype, channels_last):
    cfg = model_cfg(224, "bicubic", 0.875)
    ld, batches = first_epoch(photo_root, loader="dali", train=True, cfg=cfg, device="cuda",
                              amp_dtype=amp_dtype, channels_last=channels_last)
    assert ld.kind == "dali-gpu"
    b = batches[0]
    assert b.images.device.type == "cuda" and b.labels.device.type == "cuda"
    assert b.images.dtype == (amp_dtype or torch.float32)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert b.images.is_contiguous(memory_format=fmt)
    _, cpu = first_epoch(photo_root, loader="dali", train=True, cfg=cfg, device="cpu")
    # nvJPEG and libjpeg-turbo differ in IDCT rounding and chroma upsampling, a little.
    diff = (b.images.float().cpu() - cpu[0].images).abs().mean()
    assert diff < 3.0, diff


@pytest.mark.gpu
def test_gpu_eval_matches_timm(photo_root):
    cfg = model_cfg(224, "bicubic", 0.875)
    ld, batches = first_epoch(photo_root, loader="dali", train=False, cfg=cfg, device="cuda")
    timm_eval = create_transform(224, is_training=False, interpolation="bicubic",
                                 crop_pct=0.875, use_prefetcher=True)
    for image, i in zip(batches[0].images.cpu(), batches[0].indices.tolist()):
        reference = timm_eval(Image.open(ld.index.full_path(i)).convert("RGB")).float()
        assert (image - reference).abs().mean() < 2.0
