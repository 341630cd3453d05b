"""Every shipped recipe is a config that runs: it validates against the schema, its method
parameters validate against the method, its optimizer is a timm optimizer, and it passes the
engine's start-up checks once a data root is given (the only placeholder a user fills in
besides the teacher's weights)."""
from pathlib import Path

import pytest

from fastkd.build import check_runnable
from fastkd.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


def test_recipes_are_shipped_for_every_headline_pair():
    names = {str(p.relative_to(p.parents[2])) for p in CONFIGS if "imagenet" in p.parts}
    for method in ("ofa", "dkd", "nkd", "scalekd", "ufd", "cakd", "vitkd"):
        assert any(name.startswith(f"imagenet/{method}/") for name in names), method


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[2])))
def test_recipe_passes_the_start_up_checks(path, tmp_path):
    cfg = load_config(path, [f"data.root={tmp_path}"])
    check_runnable(cfg)
    if "imagenet" in path.parts:   # ImageNet recipes state their global batch and LR rule
        text = path.read_text().lower()
        assert "global" in text and "lr" in text
