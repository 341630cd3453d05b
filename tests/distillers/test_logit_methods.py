"""Logit methods kd, dkd, nkd, uskd, wsld, dist, bkd: the training contract on every family
pairing, the glue between each distiller and its `fastkd.losses` formula (weights, targets,
DKD's warm-up), USKD's own math against a per-sample re-statement of cls_KD's `USKDLoss`, and the
ImageNet recipes."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import IMG, NUM_CLASSES, tiny_model, tiny_pair, two_training_steps
from fastkd import losses
from fastkd.config import load_config
from fastkd.distillers import build_params, get_distiller_class
from fastkd.distillers.uskd import _uskd_losses, _zipf_non_target_labels
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


# ------------------------------------------------------------------------------------- USKD math


def test_zipf_labels_use_one_based_ranks_and_sum_to_one():
    scores = torch.tensor([[0.1, 0.5, 0.3, 0.2]])         # ranks: class 1, 2, 3, 0 → 1, 2, 3, 4
    labels = _zipf_non_target_labels(scores, torch.tensor([[1]]))
    # class 1 (rank 1) removed; classes 0, 2, 3 keep 1/4, 1/2, 1/3, renormalised by 13/12
    torch.testing.assert_close(labels, torch.tensor([[3 / 13, 6 / 13, 4 / 13]]))
    scores = torch.randn(6, 50)
    two_targets = torch.stack([torch.arange(6), torch.arange(6) + 10], dim=1)
    for targets in (torch.randint(0, 50, (6, 1)), two_targets):
        labels = _zipf_non_target_labels(scores, targets)
        assert labels.shape == (6, 50 - targets.shape[1])
        torch.testing.assert_close(labels.sum(1), torch.ones(6))
        assert torch.all(labels > 0)


def uskd_by_the_spec(z, w, labels, alpha, beta, mu, rank_on_log_probs):
    """yzd-v/cls_KD `mmcls/models/dis_losses/uskd.py` `USKDLoss.forward` restated one sample at
    a time (independent of uskd.py)."""
    batch_size, k = z.shape
    if labels.dim() == 2:   # the two largest label values (topk: same tie-break as uskd.py)
        values, classes = labels.topk(2, dim=1)
        targets, values = classes.tolist(), values.tolist()
    else:
        targets = [[labels[b].item()] for b in range(batch_size)]
        values = [[1.0] for _ in range(batch_size)]
    p = torch.softmax(z, 1)
    squared = torch.tensor([[p[b, c].item() ** 2 for c in targets[b]] for b in range(batch_size)])
    column_mean = squared.mean(0)
    total_t = total_non = total_weak = 0.0
    for b in range(batch_size):
        for j, c in enumerate(targets[b]):
            weight = 0.0 if values[b][j] == 0 else squared[b, j] + values[b][j] - column_mean[j]
            total_t += -weight * math.log(p[b, c])
        q = (0.9 * labels[b] if labels.dim() == 2 else 0.9 * F.one_hot(labels[b], k)) + 0.1 / k
        total_weak += -(mu * q * torch.log_softmax(w[b], 0)).sum()
        pw = torch.softmax(w[b], 0)
        student = torch.log(p[b]) if rank_on_log_probs else p[b]
        score = (pw / (1 - sum(pw[c] for c in targets[b]) + 1e-6)
                 + student / (1 - sum(student[c] for c in targets[b]) + 1e-6))
        ranked = sorted(range(k), key=lambda c: -score[c].item())
        zipf = {c: 1.0 / (position + 1) for position, c in enumerate(ranked)}
        others = [c for c in range(k) if c not in targets[b]]
        norm = sum(zipf[c] for c in others)
        log_q = torch.log_softmax(z[b, others], 0)
        total_non += -sum(zipf[c] / norm * log_q[i] for i, c in enumerate(others))
    return (alpha * total_t / batch_size + beta * total_non / batch_size, total_weak / batch_size)


@pytest.mark.parametrize("rank_on_log_probs", [True, False])
@pytest.mark.parametrize("soft", [False, True])
def test_uskd_losses_match_the_specification(soft, rank_on_log_probs):
    z, w = 2 * torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    if soft:
        labels = torch.softmax(3 * torch.randn(5, 7), 1)
        labels[0] = F.one_hot(torch.tensor(3), 7).float()  # second value 0: its target weight is 0
    else:
        labels = torch.randint(0, 7, (5,))
    loss_t, loss_non, loss_weak = _uskd_losses(z, w, labels, mu=0.3,
                                               rank_on_log_probs=rank_on_log_probs)
    kd, weak = uskd_by_the_spec(z, w, labels, 0.7, 0.2, 0.3, rank_on_log_probs)
    torch.testing.assert_close((0.7 * loss_t + 0.2 * loss_non).double(),
                               torch.as_tensor(kd).double())
    torch.testing.assert_close(loss_weak.double(), torch.as_tensor(weak).double())


def test_uskd_rank_flag_changes_the_non_target_labels():
    torch.manual_seed(3)
    z, w, labels = 3 * torch.randn(8, 20), 3 * torch.randn(8, 20), torch.randint(0, 20, (8,))
    shipped = _uskd_losses(z, w, labels, mu=0.005, rank_on_log_probs=True)
    intended = _uskd_losses(z, w, labels, mu=0.005, rank_on_log_probs=False)
    torch.testing.assert_close(shipped[0], intended[0])
    assert not torch.isclose(shipped[1], intended[1])


def test_uskd_distiller_terms_and_weights():
    distiller = build("uskd", tiny_model("cnn", seed=1), None, gt_weight=0.5,
                      alpha=0.7, beta=0.2, mu=0.3)
    distiller.eval()
    images, labels = batch()
    middle, logits = distiller.middle_and_logits(images)
    _, terms = distiller(images, labels)
    loss_t, loss_non, loss_weak = _uskd_losses(logits, distiller.weak_head(middle), labels,
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
