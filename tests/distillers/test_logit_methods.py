"""Logit methods kd, dkd, nkd, uskd, wsld, dist, bkd: the training contract on every family
pairing, the glue between each distiller and its `fastkd.losses` formula (weights, targets,
DKD's warm-up, USKD's weak head and middle feature), and the ImageNet recipes."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import IMG, NUM_CLASSES, tiny_model, tiny_pair, two_training_steps
from fastkd import losses
from fastkd.config import load_config
from fastkd.distillers import build_params, get_distiller_class
from fastkd.models import stage_info

REPO = Path(__file__).resolve().parents[2]
TEACHER_METHODS = ("kd", "dkd", "nkd", "wsld", "dist", "bkd")
# (student family, teacher family): CNN→CNN, ViT→CNN, CNN→ViT, MLP→ViT as teacher→student
PAIRS = (("cnn", "cnn"), ("cnn", "vit"), ("vit", "cnn"), ("vit", "mlp"))


def build(method: str, student, teacher, *, gt_weight: float = 1.0, **params):
    cls = get_distiller_class(method)
    return cls(student, teacher, build_params(method, params), num_classes=NUM_CLASSES,
               gt_weight=gt_weight)


def batch(soft: bool = False, size: int = 4):
    images = torch.randn(size, 3, IMG, IMG)
    if soft:
        return images, torch.softmax(3 * torch.randn(size, NUM_CLASSES), dim=-1)
    return images, torch.randint(0, NUM_CLASSES, (size,))


# ----------------------------------------------------------------------------- training contract


@pytest.mark.parametrize("student_family,teacher_family", PAIRS)
@pytest.mark.parametrize("method", TEACHER_METHODS)
def test_two_training_steps_on_every_pair(method, student_family, teacher_family):
    student, teacher = tiny_pair(student_family, teacher_family)
    terms = two_training_steps(build(method, student, teacher), epoch=3.0)
    assert set(terms) == {"loss_gt", "loss_kd"}


@pytest.mark.parametrize("method", TEACHER_METHODS)
def test_soft_labels(method):
    student, teacher = tiny_pair("cnn", "vit")
    terms = two_training_steps(build(method, student, teacher), soft_labels=True)
    assert set(terms) == {"loss_gt", "loss_kd"}


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("family", ["cnn", "vit", "mlp"])
def test_uskd_two_training_steps(family, soft):
    distiller = build("uskd", tiny_model(family, seed=1), None)
    assert distiller.teacher is None and distiller.extra_parameter_count() > 0
    terms = two_training_steps(distiller, soft_labels=soft)
    assert set(terms) == {"loss_gt", "loss_kd", "loss_weak"}
    assert distiller.weak_head.weight.grad is not None


def test_declared_needs_and_defaults():
    for method in TEACHER_METHODS:
        cls = get_distiller_class(method)
        assert cls.needs.teacher and cls.needs.teacher_logits and cls.needs.cacheable, method
        assert cls.student_families is None and cls.teacher_families is None, method
        assert cls.paper, method
    assert not get_distiller_class("uskd").needs.teacher
    # official defaults (OFAKD train.py, cls_KD loss classes, mdistiller engine/cfg.py): a change
    # here changes results
    defaults = {"kd": dict(temperature=1.0, kd_weight=1.0),
                "dkd": dict(alpha=1.0, beta=8.0, temperature=4.0, warmup_epochs=20),
                "nkd": dict(temperature=1.0, gamma=1.5),
                "uskd": dict(alpha=1.0, beta=0.1, mu=0.005, rank_on_log_probs=True),
                "wsld": dict(temperature=2.0, alpha=2.5),
                "dist": dict(beta=1.0, gamma=1.0, tau=1.0, kd_weight=1.0),
                "bkd": dict(kd_weight=1.0)}
    for method, expected in defaults.items():
        assert vars(build_params(method, {})) == expected, method


# ------------------------------------------------------------------ glue: terms equal the formula


def terms_and_teacher(distiller, labels_soft=False, epoch=1.0):
    images, labels = batch(labels_soft)
    distiller.eval()   # BN in eval: the student forward is a pure function of the images
    logits, terms = distiller(images, labels, epoch=epoch, indices=torch.arange(len(labels)))
    return logits.detach(), terms, distiller.teacher.logits(images), labels


def expected_ce(logits, labels, weight):
    if labels.dim() == 2:
        return weight * -(labels * F.log_softmax(logits, dim=1)).sum(1).mean()
    return weight * F.cross_entropy(logits, labels)


GLUE = {   # method → (params, expected loss_kd from (logits, teacher logits, integer target))
    "kd": (dict(temperature=3.0, kd_weight=0.7),
           lambda s, t, y: 0.7 * losses.kd_loss(s, t, temperature=3.0)),
    "nkd": (dict(temperature=2.0, gamma=1.2),
            lambda s, t, y: losses.nkd_loss(s, t, y, temperature=2.0, gamma=1.2)),
    "wsld": (dict(temperature=3.0, alpha=1.5),
             lambda s, t, y: losses.wsld_loss(s, t, y, temperature=3.0, alpha=1.5)),
    "dist": (dict(beta=2.0, gamma=0.5, tau=2.0, kd_weight=0.3),
             lambda s, t, y: 0.3 * losses.dist_loss(s, t, beta=2.0, gamma=0.5, tau=2.0)),
    "bkd": (dict(kd_weight=0.4), lambda s, t, y: 0.4 * losses.bkd_loss(s, t)),
    "dkd": (dict(alpha=0.5, beta=2.0, temperature=2.0, warmup_epochs=0),
            lambda s, t, y: losses.dkd_loss(s, t, y, alpha=0.5, beta=2.0, temperature=2.0)),
}


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("method", sorted(GLUE))
def test_terms_equal_the_loss_functions(method, soft):
    params, expected_kd = GLUE[method]
    distiller = build(method, *tiny_pair("cnn", "vit"), gt_weight=0.6, **params)
    logits, terms, teacher_logits, labels = terms_and_teacher(distiller, soft)
    target = labels.argmax(1) if soft else labels   # mixup labels → argmax target
    torch.testing.assert_close(terms["loss_kd"], expected_kd(logits, teacher_logits, target))
    torch.testing.assert_close(terms["loss_gt"], expected_ce(logits, labels, 0.6))


def test_gt_weight_zero_drops_the_ce_term():
    _, terms, _, _ = terms_and_teacher(build("kd", *tiny_pair("cnn", "cnn"), gt_weight=0.0))
    assert set(terms) == {"loss_kd"}


@pytest.mark.parametrize("epoch,factor", [(1, 0.05), (10, 0.5), (20, 1.0), (25, 1.0), (1.5, 0.075)])
def test_dkd_warmup(epoch, factor):
    distiller = build("dkd", *tiny_pair("cnn", "cnn"), warmup_epochs=20)
    logits, terms, teacher_logits, labels = terms_and_teacher(distiller, epoch=epoch)
    full = losses.dkd_loss(logits, teacher_logits, labels, alpha=1.0, beta=8.0, temperature=4.0)
    assert distiller.warmup_factor(epoch) == pytest.approx(factor)
    torch.testing.assert_close(terms["loss_kd"], factor * full)


def test_dkd_without_warmup_is_full_weight_at_once():
    assert build("dkd", *tiny_pair("cnn", "cnn"), warmup_epochs=0).warmup_factor(1.0) == 1.0


def test_uskd_distiller_terms_and_weights():
    distiller = build("uskd", tiny_model("cnn", seed=1), None, gt_weight=0.5,
                      alpha=0.7, beta=0.2, mu=0.3)
    distiller.eval()
    images, labels = batch()
    middle, logits = distiller.middle_and_logits(images)
    _, terms = distiller(images, labels)
    loss_t, loss_non, loss_weak = losses.uskd_losses(logits, distiller.weak_head(middle), labels,
                                                     mu=0.3, rank_on_log_probs=True)
    torch.testing.assert_close(terms["loss_kd"], 0.7 * loss_t + 0.2 * loss_non)
    torch.testing.assert_close(terms["loss_weak"], loss_weak)
    torch.testing.assert_close(terms["loss_gt"], expected_ce(logits, labels, 0.5))


def _output_of(module, images, model):
    seen = []
    handle = module.register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        model(images)
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("family", ["cnn", "vit", "mlp"])
def test_uskd_middle_feature(family):
    """CNN: GAP of stage 3; ViT: class token after block depth/2; Mixer: token mean there."""
    student = tiny_model(family, seed=1).eval()
    distiller = build("uskd", student, None)
    images, _ = batch()
    with torch.no_grad():
        middle, logits = distiller.middle_and_logits(images)
        torch.testing.assert_close(logits, student(images))
        if family == "cnn":
            info = stage_info(student)[3]
            expected = _output_of(student.get_submodule(info.module), images, student).mean((2, 3))
        else:
            block = student.blocks[len(student.blocks) // 2 - 1]
            tokens = _output_of(block, images, student)
            expected = tokens[:, 0] if family == "vit" else tokens.mean(1)
    torch.testing.assert_close(middle, expected)
    assert distiller.weak_head.in_features == middle.shape[1]
    assert distiller.weak_head.out_features == NUM_CLASSES


# --------------------------------------------------------------------------------------- recipes


RECIPES = {   # path → (method, params, gt_weight, per-GPU batch, LR at 8 GPUs)
    "configs/imagenet/kd/resnet34-resnet18.yaml":
        ("kd", dict(temperature=1.0, kd_weight=0.5), 0.5, 64, 0.2),
    "configs/imagenet/dkd/resnet34-resnet18.yaml":
        ("dkd", dict(alpha=1.0, beta=0.5, temperature=1.0, warmup_epochs=1.0), 1.0, 64, 0.2),
    "configs/imagenet/nkd/resnet34-resnet18.yaml":
        ("nkd", dict(temperature=1.0, gamma=1.5), 1.0, 32, 0.1),
    "configs/imagenet/uskd/resnet18.yaml":
        ("uskd", dict(alpha=1.0, beta=0.1, mu=0.005, rank_on_log_probs=True), 1.0, 32, 0.1),
}


@pytest.mark.parametrize("path", sorted(RECIPES))
def test_imagenet_recipes(path):
    method, params, gt_weight, per_gpu, lr = RECIPES[path]
    cfg = load_config(REPO / path, ["data.root=/imagenet", "teacher.checkpoint=/ckpt/t.pth"])
    assert cfg.distill.method == method and cfg.distill.gt_weight == gt_weight
    assert vars(build_params(method, cfg.distill.params)) == params
    assert cfg.model.name == "resnet18" and cfg.data.num_classes == 1000
    assert cfg.teacher.name == (None if method == "uskd" else "resnet34")
    assert cfg.train.epochs == 100 and cfg.train.batch_size == per_gpu
    # mdistiller and mmcls build torch's SGD without Nesterov: timm's `momentum`
    assert cfg.optim.opt == "momentum" and cfg.optim.weight_decay == 1e-4 and cfg.optim.momentum == 0.9
    assert cfg.optim.lr is None   # the linear rule, so other GPU counts scale the LR
    assert cfg.optim.lr_base * 8 * per_gpu / cfg.optim.lr_base_size == pytest.approx(lr)
    assert cfg.sched.sched == "multistep" and cfg.sched.decay_milestones == (30, 60, 90)
    assert cfg.sched.decay_rate == 0.1 and cfg.sched.warmup_epochs == 0
    bare = load_config(REPO / path)   # placeholders left null still validate
    assert bare.data.root is None and bare.teacher.checkpoint is None
