"""Feature and projector methods: OFA, FitNet, MGD, SRRL, ViTKD, CRD, RKD, CC.

Every method trains two steps on each family pairing its paper allows; ViTKD refuses the
others at start-up; logit terms equal the `fastkd.losses` functions; OFA's ε broadcast and
class-token readout; the method-specific pieces (masks, memory bank, teacher classifier).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
from conftest import IMG, NUM_CLASSES, tiny_model, tiny_pair, two_training_steps

from fastkd.config import load_config
from fastkd.distillers import UnsupportedPair, build_params, get_distiller_class
from fastkd.distillers.crd import ContrastMemory, OtherClassNegatives, nce_loss
from fastkd.distillers.mgd import random_channel_mask
from fastkd.distillers.ofa import CnnBranch, TokenBranch, broadcast_eps
from fastkd.distillers.srrl import teacher_classifier_logits
from fastkd.distillers.vitkd import random_token_mask
from fastkd.losses import correlation_loss, kd_loss, nkd_loss, ofa_loss, rkd_loss
from fastkd.models import Teacher, forward_taps, model_family

SMALL = {"crd": {"num_samples": 16, "num_negatives": 8}}   # a 16-sample bank for batch 4
# what the engine passes besides the params: CRD's training labels by dataset index
BY_INDEX = {"crd": {"sample_labels": torch.arange(16) % NUM_CLASSES}}
ANY_PAIR_METHODS = ("ofa", "fitnet", "mgd", "srrl", "crd", "rkd", "cc")
# (student, teacher): CNN→CNN, ViT→CNN, CNN→ViT, MLP→ViT written teacher→student
PAIRS = [("cnn", "cnn"), ("cnn", "vit"), ("vit", "cnn"), ("vit", "mlp")]
ROOT = Path(__file__).resolve().parents[2]


def build(method: str, student_family: str = "cnn", teacher_family: str = "vit", **params):
    student, teacher = tiny_pair(student_family, teacher_family)
    return build_on(method, student, teacher, **params)


def build_on(method: str, student: nn.Module, teacher: Teacher, **params):
    cls = get_distiller_class(method)
    cls.check_pair(model_family(student), teacher.family)
    return cls(student, teacher, build_params(method, {**SMALL.get(method, {}), **params}),
               num_classes=NUM_CLASSES, **BY_INDEX.get(method, {}))


def batch(size: int = 4):
    torch.manual_seed(5)
    return torch.randn(size, 3, IMG, IMG), torch.randint(0, NUM_CLASSES, (size,))


# ------------------------------------------------------------------ the training contract


@pytest.mark.parametrize("method", ANY_PAIR_METHODS)
@pytest.mark.parametrize("student_family, teacher_family", PAIRS,
                         ids=[f"{t}->{s}" for s, t in PAIRS])
def test_two_training_steps(method, student_family, teacher_family):
    terms = two_training_steps(build(method, student_family, teacher_family))
    assert "loss_gt" in terms and len(terms) >= 2


def test_vitkd_two_training_steps_with_aligners_and_soft_labels():
    student = tiny_model("vit", seed=1)
    wider = timm.create_model("test_vit", num_classes=NUM_CLASSES, img_size=IMG, embed_dim=96)
    distiller = build_on("vitkd", student, Teacher(wider.eval(), amp_dtype=None))
    assert isinstance(distiller.align_deep, nn.Linear) and distiller.align_deep.out_features == 96
    terms = two_training_steps(distiller, soft_labels=True)
    assert set(terms) == {"loss_gt", "loss_mimic", "loss_gen", "loss_kd"}
    assert distiller.mask_token.grad is not None and distiller.mask_token.grad.abs().sum() > 0


def test_vitkd_same_width_has_no_aligners():
    distiller = build("vitkd", "vit", "vit", logit_loss="none")
    assert isinstance(distiller.align_deep, nn.Identity)
    assert "loss_kd" not in two_training_steps(distiller)


@pytest.mark.parametrize("student_family, teacher_family",
                         [("cnn", "vit"), ("vit", "cnn"), ("mlp", "vit"), ("vit", "mlp"),
                          ("cnn", "cnn")])
def test_vitkd_refuses_non_vit_pairs(student_family, teacher_family):
    student, teacher = tiny_pair(student_family, teacher_family)
    cls = get_distiller_class("vitkd")
    with pytest.raises(UnsupportedPair, match="vitkd"):
        cls.check_pair(model_family(student), teacher.family)
    with pytest.raises(UnsupportedPair):
        cls(student, teacher, build_params("vitkd", {}), num_classes=NUM_CLASSES)


def test_vitkd_refuses_different_patch_grids():
    finer = timm.create_model("test_vit", num_classes=NUM_CLASSES, img_size=IMG, patch_size=8)
    with pytest.raises(UnsupportedPair, match="patch grid"):
        build_on("vitkd", tiny_model("vit"), Teacher(finer.eval(), amp_dtype=None))


# ------------------------------------------------------------------ OFA


def test_ofa_eps_broadcast():
    assert broadcast_eps((1.5,), 4) == (1.5,) * 5
    assert broadcast_eps((1.0, 1.1, 1.2), 2) == (1.0, 1.1, 1.2)
    with pytest.raises(ValueError, match="len\\(stages\\) \\+ 1"):
        broadcast_eps((1.0, 2.0), 4)
    with pytest.raises(ValueError):
        build("ofa", eps=[1.0, 2.0])


@pytest.mark.parametrize("student_family, teacher_family", [("cnn", "vit"), ("vit", "cnn")])
def test_ofa_terms_equal_ofa_loss_with_each_eps(student_family, teacher_family):
    eps = (1.0, 1.5, 2.0)
    distiller = build("ofa", student_family, teacher_family, stages=[2, 4], eps=list(eps),
                      temperature=2.0, kd_weight=0.7, ofa_weight=0.3).eval()
    images, labels = batch()
    with torch.no_grad():
        logits, terms = distiller(images, labels)
        teacher_logits = distiller.teacher.logits(images)
        feats = forward_taps(distiller.student, images, (2, 4))
        branch = distiller.branch_logits(feats.stages, feats.prefix)
    assert torch.allclose(logits, feats.logits)
    expected_kd = 0.7 * ofa_loss(logits, teacher_logits, labels, 2.0, 2.0)   # ε_last, T
    assert torch.allclose(terms["loss_kd"], expected_kd)
    expected = 0.3 * (ofa_loss(branch[2], teacher_logits, labels, 1.0, 2.0)
                      + ofa_loss(branch[4], teacher_logits, labels, 1.5, 2.0))
    assert torch.allclose(terms["loss_ofa"], expected)
    assert distiller.needs.student_stages == (2, 4) and set(distiller.branches) == {"2", "4"}


def test_ofa_mixup_labels_use_their_argmax():
    distiller = build("ofa", "cnn", "cnn").eval()
    images, _ = batch()
    soft = torch.softmax(torch.randn(4, NUM_CLASSES) * 3, dim=-1)
    with torch.no_grad():
        logits, terms = distiller(images, soft)
        expected = ofa_loss(logits, distiller.teacher.logits(images), soft.argmax(-1), 1.0, 1.0)
    assert torch.allclose(terms["loss_kd"], expected)


def test_ofa_token_branch_reads_out_the_class_token():
    """Prefix split off, carried past the merges, re-attached in front, read out: with the
    blocks removed, the branch sees the class token only."""
    branch = TokenBranch(stage=1, channels=16, grid=(28, 28), num_prefix=1, width=32, num_classes=5)
    assert len(branch.merge) == 2 and len(branch.blocks) == 3       # 28 → 14 → 7; 4 − 1 blocks
    assert isinstance(branch.merge[0].act, nn.GELU) and isinstance(branch.merge[1].act, nn.Identity)
    patches, cls_token = torch.randn(2, 16, 28, 28), torch.randn(2, 1, 16)
    assert branch(patches, cls_token).shape == (2, 5)
    branch.blocks = nn.Identity()
    out = branch(patches, cls_token)
    assert torch.allclose(out, branch(torch.randn(2, 16, 28, 28), cls_token))      # patches ignored
    assert torch.allclose(out, branch.head(branch.prefix_proj(cls_token).flatten(1)))
    assert not torch.allclose(out, branch(patches, torch.randn(2, 1, 16)))


def test_ofa_token_branch_without_prefix_reads_the_token_mean():
    branch = TokenBranch(stage=4, channels=8, grid=(7, 7), num_prefix=0, width=8, num_classes=3)
    assert len(branch.merge) == 0 and len(branch.blocks) == 1
    branch.blocks = nn.Identity()
    x = torch.randn(2, 8, 7, 7)
    assert torch.allclose(branch(x), branch.head(x.mean(dim=(2, 3))), atol=1e-6)


def test_ofa_cnn_branch_as_ofakd():
    branch = CnnBranch(stage=1, channels=64, width=768, num_classes=7)
    convs = [m for m in branch if type(m).__name__ == "SepConv"]
    assert len(convs) == 3 and convs[-1][5].out_channels == 768      # 64 → 128 → 256 → D*
    assert branch(torch.randn(2, 64, 56, 56)).shape == (2, 7)
    assert isinstance(CnnBranch(4, 512, 768, 7)[0], nn.Conv2d)


def test_ofa_vit_student_branches_carry_the_class_token():
    distiller = build("ofa", "vit", "cnn")
    assert all(b.num_prefix == 1 for b in distiller.branches.values())
    assert all(b.num_prefix == 0 for b in build("ofa", "mlp", "vit").branches.values())


# ------------------------------------------------------------------ FitNet


def test_fitnet_kd_term_equals_kd_loss():
    distiller = build("fitnet", "vit", "cnn", temperature=2.0, kd_weight=0.5).eval()
    images, labels = batch()
    with torch.no_grad():
        logits, terms = distiller(images, labels)
        expected = 0.5 * kd_loss(logits, distiller.teacher.logits(images), 2.0)
    assert torch.allclose(terms["loss_kd"], expected)


def test_fitnet_ofakd_special_case():
    """CNN→CNN, kd_weight 0: bias-free 1×1 convs on equal grids, no KD term (OFAKD FitNet)."""
    student, teacher = tiny_model("cnn", seed=1), tiny_model("cnn", seed=2).eval()
    distiller = build_on("fitnet", student, Teacher(teacher, amp_dtype=None), kd_weight=0.0)
    for aligner in distiller.aligners.values():
        assert aligner.proj.kernel_size == (1, 1) and aligner.proj.bias is None
    assert "loss_kd" not in two_training_steps(distiller)
    assert not distiller.needs.teacher_logits


# ------------------------------------------------------------------ pooled-feature methods


def test_rkd_term_equals_rkd_loss():
    distiller = build("rkd", "cnn", "vit", distance_weight=5.0, angle_weight=7.0,
                      kd_weight=2.0).eval()
    images, labels = batch()
    with torch.no_grad():
        _, terms = distiller(images, labels)
        pooled_s = forward_taps(distiller.student, images, ()).pooled
        pooled_t = distiller.teacher.features(images, ()).pooled
    assert torch.allclose(terms["loss_kd"], 2.0 * rkd_loss(pooled_s, pooled_t, 5.0, 7.0))


def test_cc_term_equals_correlation_loss():
    distiller = build("cc", "vit", "cnn", scale=0.1, feat_dim=16).eval()
    images, labels = batch()
    with torch.no_grad():
        _, terms = distiller(images, labels)
        e_s = distiller.embed_s(forward_taps(distiller.student, images, ()).pooled)
        e_t = distiller.embed_t(distiller.teacher.features(images, ()).pooled)
    assert e_s.shape == (4, 16)
    assert torch.allclose(terms["loss_kd"], correlation_loss(e_s, e_t, 0.1))


def test_nce_loss_known_value():
    # K = 1, N = 2 → K·P_n = 0.5; P⁺ = P⁻ = 0.5: L = −2·log(0.5 / 1.0) = 2 log 2
    loss = nce_loss(torch.tensor([[0.5, 0.5]]), 2)
    assert torch.isclose(loss, torch.tensor(2 * 0.6931472), atol=1e-5)


def test_crd_memory_scores_and_update():
    torch.manual_seed(0)
    memory = ContrastMemory(dim=4, num_samples=10, num_negatives=3, temperature=0.5, momentum=0.5)
    bank_s, bank_t = memory.memory_s.clone(), memory.memory_t.clone()
    v_s = torch.nn.functional.normalize(torch.randn(2, 4), dim=1)
    v_t = torch.nn.functional.normalize(torch.randn(2, 4), dim=1)
    indices = torch.tensor([3, 7])
    scores_s, scores_t = memory(v_s, v_t, indices)
    assert scores_s.shape == (2, 4) and memory.z_s > 0 and memory.z_t > 0
    positive = torch.exp((bank_t[indices] * v_s).sum(1) / 0.5) / memory.z_s   # own row first
    assert torch.allclose(scores_s[:, 0], positive)
    moved = torch.nn.functional.normalize(0.5 * bank_s[indices] + 0.5 * v_s, dim=1)
    assert torch.allclose(memory.memory_s[indices], moved)
    untouched = [i for i in range(10) if i not in (3, 7)]
    assert torch.equal(memory.memory_s[untouched], bank_s[untouched])
    z = memory.z_s.clone()
    memory(v_s, v_t, indices)
    assert torch.equal(memory.z_s, z)                                          # Z fixed once


def test_crd_padded_samples_neither_move_the_banks_nor_add_to_the_loss():
    # Without drop_last the sampler pads a rank's last batch with index −1 (pipelines/sampling).
    torch.manual_seed(0)
    memory = ContrastMemory(dim=4, num_samples=10, num_negatives=3, temperature=0.5, momentum=0.5)
    bank_s = memory.memory_s.clone()
    v = torch.nn.functional.normalize(torch.randn(3, 4), dim=1)
    scores_s, _ = memory(v, v, torch.tensor([3, 0, -1]))                  # pad reads row 0
    moved = torch.nn.functional.normalize(0.5 * bank_s[[3, 0]] + 0.5 * v[:2], dim=1)
    assert torch.allclose(memory.memory_s[[3, 0]], moved)     # the real row 0 moved once
    untouched = [i for i in range(10) if i not in (0, 3)]
    assert torch.equal(memory.memory_s[untouched], bank_s[untouched])    # row N−1 included
    valid = torch.tensor([True, True, False])
    assert torch.allclose(nce_loss(scores_s, 10, valid), nce_loss(scores_s[:2], 10) * 2 / 3)
    distiller = build("crd")
    images, labels = batch()
    _, terms = distiller(images, labels, indices=torch.tensor([0, 1, 2, -1]))
    assert torch.isfinite(terms["loss_kd"])


def test_crd_non_finite_embeddings_leave_the_banks_alone():
    """The engine skips a non-finite step after the forward: the bank update has run by then."""
    memory = ContrastMemory(dim=4, num_samples=10, num_negatives=3, temperature=0.5, momentum=0.5)
    bank_s = memory.memory_s.clone()
    v = torch.nn.functional.normalize(torch.randn(2, 4), dim=1)
    v[1] = float("nan")
    memory(v, v, torch.tensor([3, 5]))
    assert torch.isfinite(memory.memory_s).all() and torch.equal(memory.memory_s[5], bank_s[5])
    assert not torch.equal(memory.memory_s[3], bank_s[3])     # the finite sample still moved


def _official_cls_negative(labels: list[int], num_classes: int) -> list[list[int]]:
    """Restates OFAKD's contrastive index (Hao840/OFAKD `utils.py`, `ImageNetInstanceSample.
    __init__`, lines 26-38): `cls_positive[c]` = the samples of class c; `cls_negative[c]` =
    the samples of every other class j != c, concatenated."""
    cls_positive = [[i for i, y in enumerate(labels) if y == c] for c in range(num_classes)]
    return [[i for j in range(num_classes) if j != c for i in cls_positive[j]]
            for c in range(num_classes)]


def test_crd_negatives_are_drawn_uniformly_from_the_other_classes_as_ofakd():
    """OFAKD trains CRD with the dataset's `contrast_index` (`utils.py` line 53,
    `np.random.choice(self.cls_negative[target], self.k, replace=True)`; `train.py` lines
    481-493 build that dataset for `--distiller crd`): every negative has another class than
    the sample, each such sample equally likely, the positive's own row never a negative."""
    torch.manual_seed(0)
    labels = [2, 0, 1, 2, 2, 0, 3, 1, 2, 3, 0, 2]          # uneven classes, unsorted
    allowed = _official_cls_negative(labels, 4)
    sampler = OtherClassNegatives(torch.tensor(labels))
    draws = 40_000
    indices = torch.tensor([0, 1, 6, 7, -1])               # classes 2, 0, 3, 1; padding → row 0
    rows = sampler(indices, draws)
    assert rows.shape == (5, draws)
    for b, index in enumerate(indices.clamp_min(0).tolist()):
        pool = allowed[labels[index]]
        counts = torch.bincount(rows[b], minlength=len(labels))
        assert set(torch.nonzero(counts).flatten().tolist()) == set(pool)   # all, and only those
        expected = draws / len(pool)                        # uniform over the pool
        assert (counts[pool].double() - expected).abs().max() < 5 * expected ** 0.5


def test_crd_memory_draws_other_class_negatives_after_the_positive():
    labels = torch.tensor([0, 1, 0, 1, 2, 2])
    memory = ContrastMemory(dim=4, num_samples=6, num_negatives=50, temperature=0.5,
                            momentum=0.5, sample_labels=labels)
    rows = torch.cat([torch.tensor([[4], [1]]), memory._negatives(torch.tensor([4, 1]))], 1)
    assert (labels[rows[:, 1:]] != labels[rows[:, :1]]).all()
    with pytest.raises(ValueError, match="training labels"):
        ContrastMemory(4, 7, 3, 0.5, 0.5, sample_labels=labels)
    with pytest.raises(ValueError, match="two classes"):
        OtherClassNegatives(torch.zeros(5, dtype=torch.long))


def test_crd_other_class_needs_the_labels_and_uniform_does_not():
    student, teacher = tiny_pair("cnn", "cnn")
    with pytest.raises(ValueError, match="sample_labels"):
        get_distiller_class("crd")(student, teacher, build_params("crd", SMALL["crd"]),
                                   num_classes=NUM_CLASSES)
    uniform = get_distiller_class("crd")(
        student, teacher, build_params("crd", {**SMALL["crd"], "negatives": "uniform"}),
        num_classes=NUM_CLASSES)
    assert uniform.memory.other_class is None
    assert "loss_kd" in two_training_steps(uniform)
    assert build("crd").memory.other_class is not None     # the default: OFAKD's sampling


def test_crd_banks_are_not_broadcast_by_ddp():
    from fastkd.build import method_buffers
    distiller = build("crd")
    assert {"memory.memory_s", "memory.memory_t"} <= set(method_buffers(distiller))


def test_crd_needs_num_samples_and_indices():
    student, teacher = tiny_pair("cnn", "cnn")
    with pytest.raises(ValueError, match="num_samples"):
        get_distiller_class("crd")(student, teacher, build_params("crd", {}),
                                   num_classes=NUM_CLASSES)
    distiller = build("crd")
    assert distiller.needs.indices
    with pytest.raises(ValueError, match="indices"):
        distiller(*batch())


# ------------------------------------------------------------------ SRRL, MGD, ViTKD pieces


@pytest.mark.parametrize("family", ["cnn", "vit", "mlp", "convnext"])
def test_srrl_teacher_classifier_maps_pooled_to_logits(family):
    teacher = Teacher(tiny_model(family).eval(), amp_dtype=None)
    feats = teacher.features(torch.randn(2, 3, IMG, IMG), ())
    logits = teacher_classifier_logits(teacher.model, feats.pooled)
    assert torch.allclose(logits, feats.logits, atol=1e-5)


def test_srrl_connector_relu_only_for_non_negative_teacher_features():
    assert isinstance(build("srrl", "vit", "cnn").connector[-1], nn.ReLU)       # ResNet: post-ReLU
    assert isinstance(build("srrl", "cnn", "vit").connector[-1], nn.BatchNorm2d)  # ViT: signed


def test_mgd_channel_mask():
    torch.manual_seed(0)
    mask = random_channel_mask(400, 64, 0.15, torch.empty(0))
    assert mask.shape == (400, 64, 1, 1) and set(mask.unique().tolist()) == {0.0, 1.0}
    assert abs(mask.mean().item() - 0.85) < 0.01


def test_mgd_aligns_the_student_onto_the_teacher_grid():
    distiller = build("mgd", "cnn", "vit")          # 2×2 ResNet stage 4 under a 4×4 ViT grid
    assert isinstance(distiller.align.proj, nn.ConvTranspose2d)
    assert not list(build("mgd", "vit", "mlp").align.parameters())   # equal shapes: identity


def test_vitkd_token_mask_keeps_floor_n_times_one_minus_ratio():
    mask = random_token_mask(5, 16, 0.3, "cpu")
    assert mask.shape == (5, 16) and torch.all(mask.sum(1) == 16 - int(16 * 0.7))
    assert torch.all(random_token_mask(3, 196, 0.5, "cpu").sum(1) == 98)


def test_vitkd_nkd_term_equals_nkd_loss():
    distiller = build("vitkd", "vit", "vit", nkd_temperature=2.0, nkd_gamma=1.5).eval()
    images, labels = batch()
    with torch.no_grad():
        logits, terms = distiller(images, labels)
        expected = nkd_loss(logits, distiller.teacher.logits(images), labels, 2.0, 1.5)
    assert torch.allclose(terms["loss_kd"], expected)


# ------------------------------------------------------------------ recipes


RECIPES = sorted(path for pattern in ("configs/imagenet/ofa/*.yaml",
                                      "configs/imagenet/vitkd/*.yaml",
                                      "configs/cifar100/ofa/*.yaml")
                 for path in ROOT.glob(pattern))


def test_recipes_exist():
    names = {p.relative_to(ROOT).as_posix() for p in RECIPES}
    assert {"configs/imagenet/ofa/deit_tiny-resnet18.yaml",
            "configs/imagenet/ofa/swin_tiny-resnet18.yaml",
            "configs/imagenet/ofa/convnext_tiny-deit_tiny.yaml",
            "configs/imagenet/vitkd/deit3_small-deit_tiny.yaml"} <= names
    assert any("cifar100" in n for n in names)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_recipe_validates(path):
    cfg = load_config(path)
    assert cfg.distill.method == path.parent.name
    build_params(cfg.distill.method, cfg.distill.params)
    for name in (cfg.model.name, cfg.teacher.name):
        assert timm.is_model(name.split(".")[0]), name
