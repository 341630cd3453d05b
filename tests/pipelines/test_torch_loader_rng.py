"""The fallback loader never touches the global torch RNG (exact resume depends on it)."""
import torch

from fastkd.pipelines import build_loader


def test_starting_workers_leaves_the_global_rng_alone(tmp_path):
    from run_helpers import make_image_folder, tiny_config
    from fastkd.config import from_dict, DataConfig

    make_image_folder(tmp_path / "data")
    data = from_dict(DataConfig, {**tiny_config(tmp_path)["data"], "num_workers": 1})
    loader = build_loader(data, split="train", train=True, batch_size=8, model_cfg={
        "mean": (0.5,) * 3, "std": (0.5,) * 3, "input_size": (3, 32, 32), "crop_pct": 1.0,
        "interpolation": "bilinear"}, seed=0)
    loader.set_epoch(1)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    next(iter(loader))
    assert torch.equal(torch.rand(3), expected)
