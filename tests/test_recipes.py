"""Every shipped recipe is a config that runs: it validates against the schema, its method
parameters validate against the method, its optimizer is a timm optimizer, and it passes the
engine's start-up checks once a data root is given (the only placeholder a user fills in
besides the teacher's weights)."""
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from timm.optim import create_optimizer_v2
from torch import nn

from fastkd.build import check_runnable, resolve_lr
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


# ------------------------------------------------------------- solvers of the official recipes

@dataclass(frozen=True)
class OfficialSolver:
    """The solver of the official recipe a shipped recipe cites, as the official code builds
    it. `opt` is the timm name of that optimizer: torch `SGD(momentum=m)` without Nesterov is
    timm's `momentum`; timm 0.6.5's `sgd` (OFAKD, PAT) is Nesterov, as timm's `sgd` is now."""
    opt: str
    gpus: int
    per_gpu: int
    lr: float                  # at gpus × per_gpu
    weight_decay: float
    epochs: int
    sched: str
    steps: tuple               # decay_milestones (multistep) or (decay_epochs,) (step)
    warmup_epochs: int
    source: str


MDISTILLER = ("megvii-research/mdistiller configs/imagenet/r34_r18/{}.yaml SOLVER (BATCH_SIZE 512, "
              "LR 0.2, WEIGHT_DECAY 1e-4, EPOCHS 100, LR_DECAY_STAGES [30, 60, 90]); "
              "mdistiller/engine/trainer.py init_optimizer: optim.SGD(momentum=0.9), no nesterov")
MMCLS = ("{} configs/_base_/schedules/imagenet_bs256.py: SGD(lr=0.1, momentum=0.9, "
         "weight_decay=0.0001), MultiStepLR milestones [30, 60, 90], max_epochs 100; "
         "configs/_base_/datasets/imagenet_bs32.py batch_size 32 on 8 GPUs")
OFAKD_CNN = ("Hao840/OFAKD configs/imagenet/cnn.yaml (batch_size 64, lr 0.1, opt sgd, weight_decay "
             "1e-4, sched step, decay_epochs 30, warmup_epochs 3, epochs 100); timm 0.6.5 "
             "optim_factory: sgd → SGD(nesterov=True)")
OFFICIAL_SOLVERS = {
    "imagenet/kd/resnet34-resnet18.yaml": OfficialSolver(
        "momentum", 8, 64, 0.2, 1e-4, 100, "multistep", (30, 60, 90), 0, MDISTILLER.format("kd")),
    "imagenet/dkd/resnet34-resnet18.yaml": OfficialSolver(
        "momentum", 8, 64, 0.2, 1e-4, 100, "multistep", (30, 60, 90), 0, MDISTILLER.format("dkd")),
    "imagenet/nkd/resnet34-resnet18.yaml": OfficialSolver(
        "momentum", 8, 32, 0.1, 1e-4, 100, "multistep", (30, 60, 90), 0, MMCLS.format("yzd-v/cls_KD")),
    "imagenet/uskd/resnet18.yaml": OfficialSolver(
        "momentum", 8, 32, 0.1, 1e-4, 100, "multistep", (30, 60, 90), 0, MMCLS.format("yzd-v/cls_KD")),
    "imagenet/ufd/swin_tiny-resnet18.yaml": OfficialSolver(
        "momentum", 8, 32, 0.1, 1e-4, 100, "multistep", (30, 60, 90), 0,
        MMCLS.format("lusilili/UFD-KD")),
    "imagenet/scalekd/swin_small-resnet50.yaml": OfficialSolver(
        "momentum", 8, 32, 0.1, 1e-4, 100, "multistep", (30, 60, 90), 0,
        "deep-optimization/ScaleKD configs/resnet/resnet50_8xb32_in1k.py: SGD(lr=0.1, "
        "momentum=0.9, weight_decay=0.0001), MultiStepLR [30, 60, 90], max_epochs 100"),
    "imagenet/cakd/vit_base_patch16_224-resnet50.yaml": OfficialSolver(
        "momentum", 8, 32, 0.1, 2e-5, 120, "multistep", (35, 65, 95), 5,
        "yufanLIU/CrossArch_KD CAKD/experiments/run_cakd.sh (--batch-size 32 on 8, --lr 0.1, "
        "--weight-decay 2e-5, --epochs 120, --lr-warmup-epochs 5); dist_train_cakd.py: "
        "SGD(nesterov='nesterov' in 'sgd'), SequentialLR(LinearLR 5 epochs, StepLR 30): "
        "decays at 35, 65, 95"),
    "imagenet/ofa/deit_tiny-resnet18.yaml": OfficialSolver(
        "sgd", 8, 64, 0.1, 1e-4, 100, "step", (30,), 3, OFAKD_CNN),
    "imagenet/ofa/swin_tiny-resnet18.yaml": OfficialSolver(
        "sgd", 8, 64, 0.1, 1e-4, 100, "step", (30,), 3, OFAKD_CNN),
    "imagenet/pat/deit_tiny-resnet18.yaml": OfficialSolver(
        "sgd", 4, 64, 0.1, 1e-4, 100, "step", (30,), 3,
        "jimmylin0979/PAT command_imagenet.sh (nproc_per_node=4) with " + OFAKD_CNN),
    "cifar100/ofa/swin_tiny-resnet18.yaml": OfficialSolver(
        "sgd", 1, 128, 0.05, 2e-3, 300, "cosine", (), 3,
        "Hao840/OFAKD configs/cifar/cnn.yaml (batch_size 128, lr 0.05, opt sgd, weight_decay "
        "2e-3, cosine, warmup_epochs 3, epochs 300); PAT command_cifar.sh nproc_per_node=1"),
    "cifar100/ofa/swin_tiny-resmlp_12.yaml": OfficialSolver(
        "adamw", 1, 128, 5e-4, 0.05, 300, "cosine", (), 20,
        "Hao840/OFAKD configs/cifar/vit_mlp.yaml (lr 5e-4, adamw, weight_decay 0.05, warmup 20)"),
    "imagenet/ofa/convnext_tiny-deit_tiny.yaml": OfficialSolver(
        "adamw", 8, 128, 5e-4, 0.05, 300, "cosine", (), 20,
        "Hao840/OFAKD configs/imagenet/vit_mlp.yaml (batch_size 128, lr 5e-4, adamw, 0.05)"),
    "imagenet/vitkd/deit3_small-deit_tiny.yaml": OfficialSolver(
        "adamw", 4, 256, 1e-3, 0.05, 300, "cosine", (), 20,
        "yzd-v/cls_KD (master) configs/_base_/schedules/imagenet_bs1024_adamw_swin.py: "
        "AdamW lr 5e-4 * 1024 / 512, weight_decay 0.05, warmup_iters 20 (epochs), 300 epochs; "
        "configs/deit/deit-small_pt-4xb256_in1k.py samples_per_gpu 256"),
}


def test_every_shipped_recipe_has_its_official_solver_listed():
    recipes = {str(p.relative_to(p.parents[2])) for p in CONFIGS if "demo" not in p.parts}
    assert recipes == set(OFFICIAL_SOLVERS)


@pytest.mark.parametrize("name", sorted(OFFICIAL_SOLVERS))
def test_recipe_solver_is_the_official_one(name):
    """Each recipe's optimizer, LR at the official global batch, weight decay, epochs,
    schedule and warm-up against the official files (`OfficialSolver.source`)."""
    official = OFFICIAL_SOLVERS[name]
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / name)
    assert cfg.optim.opt == official.opt, official.source
    assert cfg.train.batch_size == official.per_gpu
    lr, _ = resolve_lr(cfg.optim, official.gpus * official.per_gpu)
    assert lr == pytest.approx(official.lr, rel=1e-9), official.source
    assert cfg.optim.weight_decay == pytest.approx(official.weight_decay)
    if official.opt in ("sgd", "momentum"):
        assert cfg.optim.momentum == 0.9
    assert cfg.train.epochs == official.epochs
    assert cfg.sched.sched == official.sched
    if official.sched == "multistep":
        assert tuple(cfg.sched.decay_milestones) == official.steps
    elif official.sched == "step":
        assert (cfg.sched.decay_epochs,) == official.steps
    assert cfg.sched.warmup_epochs == official.warmup_epochs


@pytest.mark.parametrize("opt, nesterov", [("momentum", False), ("sgd", True)])
def test_timm_momentum_is_plain_and_sgd_is_nesterov(opt, nesterov):
    """The mapping the table relies on, in the installed timm (torch.optim.SGD either way)."""
    optimizer = create_optimizer_v2(nn.Linear(2, 2), opt, lr=0.1, momentum=0.9)
    assert type(optimizer) is torch.optim.SGD
    assert optimizer.defaults["nesterov"] is nesterov
