"""ScaleKD and UFD: the training contract on every pairing (Swin → CNN included), each loss
term against its `fastkd.losses` formula on the same tensors, the stage-3 → stage-4 wiring
through the frozen teacher, parameters, unsupported teachers, and the ImageNet recipes."""
from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from conftest import IMG, NUM_CLASSES, tiny_model, tiny_pair, two_training_steps
from fastkd.attention_projector import grid_to_tokens, tokens_to_grid
from fastkd.config import load_config
from fastkd.distillers import UnsupportedPair, build_params, get_distiller_class
from fastkd.losses import feature_mimic_loss, freq_decoupled_loss, soft_ce_kd_loss
from fastkd.models import Teacher, forward_taps

REPO = Path(__file__).resolve().parents[2]
SIZE = (3, IMG, IMG)
# (student family, teacher family); "swin" is the papers' teacher family
PAIRS = (("cnn", "cnn"), ("cnn", "vit"), ("vit", "cnn"), ("vit", "mlp"), ("mlp", "vit"),
         ("cnn", "swin"), ("cnn", "convnext"))


def build(method: str, student, teacher, *, gt_weight: float = 0.5, **params):
    cls = get_distiller_class(method)
    cls.check_pair("cnn", teacher.family)
    return cls(student, teacher, build_params(method, params), num_classes=NUM_CLASSES,
               gt_weight=gt_weight, input_size=SIZE)


def batch(size: int = 4):
    return torch.randn(size, 3, IMG, IMG), torch.randint(0, NUM_CLASSES, (size,))


# --------------------------------------------------------------------------------- contract


@pytest.mark.parametrize("student_family,teacher_family", PAIRS)
def test_scalekd_two_training_steps(student_family, teacher_family):
    distiller = build("scalekd", *tiny_pair(student_family, teacher_family))
    terms = two_training_steps(distiller)
    assert set(terms) == {"loss_gt", "loss_kd", "loss_s3", "loss_s3_alt", "loss_s4", "loss_s4_alt"}
    for projector in (*distiller.stage3.values(), *distiller.stage4.values()):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in projector.parameters())


@pytest.mark.parametrize("student_family,teacher_family", PAIRS)
def test_ufd_two_training_steps(student_family, teacher_family):
    distiller = build("ufd", *tiny_pair(student_family, teacher_family))
    terms = two_training_steps(distiller, soft_labels=True)
    assert set(terms) == {"loss_gt", "loss_kd", "loss_dc_spat", "loss_ac_spat", "loss_dc_channel",
                          "loss_ac_channel"}
    for projector in (distiller.spatial_projector, distiller.channel_projector):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in projector.parameters())


@pytest.mark.parametrize("method", ["scalekd", "ufd"])
def test_teacher_without_a_runnable_tail_is_unsupported(method):
    student = tiny_model("cnn", seed=1)
    torch.manual_seed(2)
    model = timm.create_model("test_resnet", num_classes=NUM_CLASSES).eval().requires_grad_(False)
    intermediates = model.forward_intermediates

    def blurred(*args, **kwargs):   # final features a 3×3 average of stage 4: no tail gives them
        out = intermediates(*args, **kwargs)
        if kwargs.get("intermediates_only"):
            return out
        return torch.nn.functional.avg_pool2d(out[0], 3, 1, 1), out[1]
    model.forward_intermediates = blurred
    with pytest.raises(UnsupportedPair, match=method):
        build(method, student, Teacher(model, amp_dtype=None))


@pytest.mark.parametrize("method", ["scalekd", "ufd"])
def test_head_conv_teacher_is_served_after_conv_head(method):
    """An EfficientNet teacher's stage 4 is the map after `conv_head` + `bn2` (OFA-KD's), so
    its tail runs and both methods train on it."""
    torch.manual_seed(2)
    model = timm.create_model("test_efficientnet", num_classes=NUM_CLASSES)
    teacher = Teacher(model.eval().requires_grad_(False), amp_dtype=None)
    assert teacher.info[4].channels == model.num_features
    assert "loss_gt" in two_training_steps(build(method, tiny_model("cnn", seed=1), teacher))


# ------------------------------------------------------------------------- ScaleKD formulas

VIEW_INDEX = {"direct": 0, "alt": 1}


def test_scalekd_terms_are_the_loss_functions_on_the_same_tensors():
    distiller = build("scalekd", *tiny_pair("cnn", "swin"))
    distiller.train()
    images, labels = batch()
    _, terms = distiller(images, labels)

    student = forward_taps(distiller.student, images, (3, 4))
    teacher = distiller.teacher.features(images, (3, 4))
    target = distiller.tail.final_norm(teacher.stages[4])
    p = distiller.params
    expected = {"loss_gt": 0.5 * torch.nn.functional.cross_entropy(student.logits, labels),
                "loss_kd": 0.5 * soft_ce_kd_loss(student.logits, teacher.logits, 1.0)}
    for view, suffix, loss in (("direct", "", feature_mimic_loss),
                               ("alt", "_alt", lambda s, t: freq_decoupled_loss(s, t, 0.0, 1.0))):
        s3 = tokens_to_grid(distiller.stage3[view](student.stages[3]), distiller.grids[3])
        perceived = distiller.tail(s3)  # Swin: no prefix tokens
        s4 = tokens_to_grid(distiller.stage4[view](student.stages[4], grid_to_tokens(perceived)),
                            distiller.grids[4])
        weight3, weight4 = p.stage3_weights[VIEW_INDEX[view]], p.stage4_weights[VIEW_INDEX[view]]
        expected[f"loss_s3{suffix}"] = weight3 * loss(perceived, target)
        expected[f"loss_s4{suffix}"] = weight4 * loss(s4, target)
    assert set(terms) == set(expected)
    for name in expected:
        torch.testing.assert_close(terms[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_scalekd_stage4_losses_train_the_stage3_projectors_through_the_teacher():
    distiller = build("scalekd", *tiny_pair("cnn", "swin"))
    _, terms = distiller(*batch())
    (terms["loss_s4"] + terms["loss_s4_alt"]).backward()
    for projector in distiller.stage3.values():
        assert projector.query_embed.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in distiller.teacher.model.parameters())


def test_scalekd_swin_s_weights_build_no_unused_projector():
    """swin-s → res50: stage-4 alt weight 0 and no KD; nothing that would idle under DDP."""
    distiller = build("scalekd", *tiny_pair("cnn", "swin"), gt_weight=1.0,
                      stage4_weights=[0.08, 0.0], kd_weight=0.0, num_heads=[1, 2])
    assert set(distiller.stage3) == {"direct", "alt"} and set(distiller.stage4) == {"direct"}
    assert distiller.stage3["alt"].num_heads == 1 and distiller.stage4["direct"].num_heads == 2
    terms = two_training_steps(distiller)
    assert set(terms) == {"loss_gt", "loss_s3", "loss_s3_alt", "loss_s4"}


@pytest.mark.parametrize("embed_dim, heads", [
    (96, (3, 6)),       # Swin-S: swin-s_distill_res50_img_s3_s4.py num_heads=3 / num_heads=6
    (128, (8, 16)),     # Swin-B: swin-b_distill_res50_img_s3_s4.py num_heads=8 / num_heads=16
    (192, (16, 24)),    # Swin-L: swin-l_distill_res50_img_s3_s4.py num_heads=16 / num_heads=24
])
def test_scalekd_default_heads_are_the_official_configs(embed_dim, heads):
    """deep-optimization/ScaleKD configs/distillers/traditional_traning_strategy/
    swin-{s,b,l}_distill_res50_img_s3_s4.py: `num_heads` of `loss_fmd_s3` (teacher_dims 384,
    512, 768) and `loss_fmd_s4` (768, 1024, 1536). A Swin teacher of the same widths (a
    one-block-per-stage copy at 64 px) gets those heads by default."""
    torch.manual_seed(0)
    swin = timm.create_model("swin_tiny_patch4_window7_224", embed_dim=embed_dim,
                             depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), window_size=2,
                             img_size=IMG, num_classes=NUM_CLASSES)
    teacher = Teacher(swin.eval().requires_grad_(False), amp_dtype=None)
    distiller = build("scalekd", tiny_model("cnn", seed=1), teacher)
    assert (distiller.stage3["direct"].num_heads, distiller.stage4["direct"].num_heads) == heads


def test_scalekd_defaults_are_the_swin_b_config():
    p = build_params("scalekd", {})
    assert (p.stage3_weights, p.stage4_weights, p.softmax_scale, p.kd_weight, p.temperature) == (
        (0.08, 0.06), (0.08, 0.06), 5.0, 0.5, 1.0)
    assert get_distiller_class("scalekd").needs.teacher_graph


def test_scalekd_vit_teacher_tail_gets_the_class_token():
    distiller = build("scalekd", *tiny_pair("cnn", "vit"))
    assert distiller.tail.prefix_tokens == 1
    two_training_steps(distiller)


# ----------------------------------------------------------------------------- UFD formulas


def test_ufd_terms_are_the_loss_functions_on_the_same_tensors():
    distiller = build("ufd", *tiny_pair("cnn", "swin"))
    images, labels = batch()
    _, terms = distiller(images, labels)
    student = forward_taps(distiller.student, images, (4,))
    teacher = distiller.teacher.features(images, (4,))
    target = distiller.final_norm(teacher.stages[4])
    spatial = tokens_to_grid(distiller.spatial_projector(student.stages[4]), distiller.teacher_grid)
    channel = tokens_to_grid(distiller.channel_projector(student.stages[4]), distiller.teacher_grid)
    expected = {
        "loss_gt": 0.5 * torch.nn.functional.cross_entropy(student.logits, labels),
        "loss_kd": 0.5 * soft_ce_kd_loss(student.logits, teacher.logits, 1.0),
        "loss_dc_spat": freq_decoupled_loss(spatial, target, 0.03, 0.0, dim="spatial"),
        "loss_ac_spat": freq_decoupled_loss(spatial, target, 0.0, 0.065, dim="spatial"),
        "loss_dc_channel": freq_decoupled_loss(channel, target, 0.003, 0.0, dim="channel"),
        "loss_ac_channel": freq_decoupled_loss(channel, target, 0.0, 0.0065, dim="channel"),
    }
    assert set(terms) == set(expected)
    for name in expected:
        torch.testing.assert_close(terms[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    # the four terms sum to the two-weight calls of each branch
    torch.testing.assert_close(terms["loss_dc_spat"] + terms["loss_ac_spat"],
                               freq_decoupled_loss(spatial, target, 0.03, 0.065, dim="spatial"))


def test_ufd_use_logit_false_drops_kd_like_the_imagenet_config():
    distiller = build("ufd", *tiny_pair("cnn", "swin"), gt_weight=1.0, use_logit=False)
    terms = two_training_steps(distiller)
    assert "loss_kd" not in terms and "loss_gt" in terms


def test_ufd_branch_with_zero_weights_builds_no_unused_projector():
    """Channel branch switched off: nothing that would idle (no gradient) under DDP."""
    distiller = build("ufd", *tiny_pair("cnn", "swin"), weights=[0.03, 0.065, 0.0, 0.0])
    assert distiller.channel_projector is None
    terms = two_training_steps(distiller)
    assert set(terms) == {"loss_gt", "loss_kd", "loss_dc_spat", "loss_ac_spat"}
    student = {id(p) for p in distiller.student.parameters()}
    assert all(p.grad is not None for p in distiller.parameters()
               if p.requires_grad and id(p) not in student)


def test_ufd_defaults():
    p = build_params("ufd", {})
    assert p.weights == (0.03, 0.065, 0.003, 0.0065) and p.use_logit and p.kd_weight == 0.5
    distiller = build("ufd", *tiny_pair("cnn", "swin"))
    # heads: 128 teacher channels // 32; pos map on the student's 2×2 stage-4 grid, no upsampling
    assert distiller.spatial_projector.num_heads == 4
    assert distiller.spatial_projector.pos_embed.shape[-2:] == (2, 2)


# ------------------------------------------------------------------------------------ recipes


@pytest.mark.parametrize("path,method", [
    ("configs/imagenet/scalekd/swin_small-resnet50.yaml", "scalekd"),
    ("configs/imagenet/ufd/swin_tiny-resnet18.yaml", "ufd")])
def test_recipes_validate(path, method):
    cfg = load_config(REPO / path)
    assert cfg.distill.method == method
    build_params(method, cfg.distill.params)
