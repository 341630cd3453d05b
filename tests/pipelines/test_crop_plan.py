import math

import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp
from torchvision.transforms import RandomResizedCrop

from fastkd.pipelines.counter_rng import uniforms
from fastkd.pipelines.crop_plan import CropPlan, center_crop_rois


def test_uniforms_depend_only_on_coordinates():
    a = uniforms(7, 2, 3, np.array([5, 1, 9]), 4)
    b = uniforms(7, 2, 3, np.array([9, 5]), 4)
    assert np.array_equal(a[0], b[1]) and np.array_equal(a[2], b[0])
    assert (a >= 0).all() and (a < 1).all()
    assert not np.array_equal(uniforms(7, 2, 4, [5], 4), uniforms(7, 2, 3, [5], 4))
    assert not np.array_equal(uniforms(8, 2, 3, [5], 4), uniforms(7, 2, 3, [5], 4))


def test_uniforms_look_uniform():
    u = uniforms(0, 1, 0, np.arange(20000), 2).ravel()
    assert abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 1 / 12) < 0.003
    counts = np.histogram(u, bins=10, range=(0, 1))[0]
    assert counts.min() > 0.9 * len(u) / 10


def test_windows_independent_of_batching_and_order():
    plan = CropPlan(seed=3)
    idx = np.array([4, 17, 2, 99, 50])
    H, W = np.array([375, 500, 64, 1000, 333]), np.array([500, 375, 48, 700, 333])
    together = plan.windows(5, idx, H, W)
    for k in [3, 0, 4, 1, 2]:
        one = plan.window(5, int(idx[k]), int(H[k]), int(W[k]))
        assert one == tuple(int(x) if i < 4 else bool(x) for i, x in
                            enumerate(f[k] for f in together))


def test_epochs_and_seeds_change_windows():
    idx, H, W = np.arange(64), np.full(64, 375), np.full(64, 500)
    a = CropPlan(0).windows(0, idx, H, W)
    assert not np.array_equal(a.top, CropPlan(0).windows(1, idx, H, W).top)
    assert not np.array_equal(a.top, CropPlan(1).windows(0, idx, H, W).top)
    again = CropPlan(0).windows(0, idx, H, W)
    assert all(np.array_equal(x, y) for x, y in zip(a, again))


def test_windows_inside_image_and_within_ranges():
    n = 4000
    plan = CropPlan(11, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5)
    H, W = np.full(n, 375), np.full(n, 500)
    w = plan.windows(0, np.arange(n), H, W)
    assert (w.top >= 0).all() and (w.left >= 0).all()
    assert (w.top + w.height <= H).all() and (w.left + w.width <= W).all()
    area = w.height * w.width / (375 * 500)
    assert area.min() >= 0.07 and area.max() <= 1.0
    ratio = w.width / w.height
    assert ratio.min() > 0.7 and ratio.max() < 1.4
    assert abs(w.flip.mean() - 0.5) < 0.03
    assert not CropPlan(0, hflip=0.0).windows(0, np.arange(100), H[:100], W[:100]).flip.any()


def test_same_law_as_torchvision():
    """Two-sample KS tests against torchvision's RandomResizedCrop.get_params."""
    n, (H, W) = 3000, (300, 520)
    ours = CropPlan(5).windows(0, np.arange(n), np.full(n, H), np.full(n, W))
    torch.manual_seed(0)
    img = torch.empty(3, H, W)
    theirs = np.array([RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3])
                       for _ in range(n)])  # (top, left, h, w)
    for ours_values, theirs_values in [(ours.height * ours.width, theirs[:, 2] * theirs[:, 3]),
                                       (ours.width / ours.height, theirs[:, 3] / theirs[:, 2]),
                                       (ours.top, theirs[:, 0]), (ours.left, theirs[:, 1])]:
        assert ks_2samp(ours_values, theirs_values).pvalue > 1e-3


def test_center_fallback_clamps_ratio():
    # A 1000x10 strip: no try fits (the window is always wider than 10), so torchvision's
    # fallback takes the full width and the height of the most extreme allowed ratio.
    top, left, h, w, _ = CropPlan(0).window(0, 0, 1000, 10)
    assert (h, w) == (round(10 / (3 / 4)), 10)
    assert (top, left) == ((1000 - h) // 2, 0)
    top, left, h, w, _ = CropPlan(0).window(0, 0, 10, 1000)
    assert (h, w) == (10, round(10 * 4 / 3)) and left == (1000 - w) // 2


@pytest.mark.parametrize("height,width", [(375, 500), (500, 375), (256, 256), (301, 451)])
def test_center_crop_rois_match_torchvision_geometry(height, width):
    size, resize = 224, 256
    start, end = center_crop_rois([height], [width], size, resize)
    short = min(height, width)
    new_h = resize if height <= width else int(resize * height / short)
    new_w = resize if width < height or height == width else int(resize * width / short)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    assert start[0] == pytest.approx([top * height / new_h, left * width / new_w], rel=1e-6)
    span = end[0] - start[0]
    assert span == pytest.approx([size * height / new_h, size * width / new_w], rel=1e-6)
    assert math.isclose(end[0][0], (top + size) * height / new_h, rel_tol=1e-6)
