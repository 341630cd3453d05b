"""CAKD and PAT: the training contract on the pairings each allows (Swin and ConvNeXt teachers
for PAT), unsupported pairings, CAKD's teacher attention read through the qkv hook, its
projectors and λ ramp, PAT's prompts (β = 0 leaves the teacher unchanged, gradients reach the
prompts, feedback kept out of the state dict), each term against its formula, and the recipes."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import IMG, NUM_CLASSES, tiny_pair, two_training_steps
from fastkd.config import load_config
from fastkd.distillers import UnsupportedPair, build_params, get_distiller_class
from fastkd.distillers.cakd import GroupLinearProjector
from fastkd.distillers.pat import SqueezeExcite, sinusoidal_encoding
from fastkd.losses import hcl_loss, kd_loss
from fastkd.models import STAGES, forward_taps

REPO = Path(__file__).resolve().parents[2]
SIZE = (3, IMG, IMG)
SMALL_PAT = dict(raa_num_queries=16, raa_dim=32, raa_heads=4)  # keeps CPU tests fast


def build(method: str, student, teacher, **params):
    cls = get_distiller_class(method)
    cls.check_pair("cnn", teacher.family)
    return cls(student, teacher, build_params(method, params), num_classes=NUM_CLASSES,
               gt_weight=1.0, label_smoothing=0.1, input_size=SIZE)


def batch(size: int = 4):
    return torch.randn(size, 3, IMG, IMG), torch.randint(0, NUM_CLASSES, (size,))


# ------------------------------------------------------------------------------------- CAKD


@pytest.mark.parametrize("student_family", ["cnn", "vit", "mlp"])
def test_cakd_two_training_steps(student_family):
    distiller = build("cakd", *tiny_pair(student_family, "vit"))
    terms = two_training_steps(distiller, epoch=40.0)  # past the ramp: λ = 0.2
    assert set(terms) == {"loss_gt", "loss_pca", "loss_gl"}
    for module in (distiller.pca_projector, distiller.gl_projector, distiller.cls_projector):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


@pytest.mark.parametrize("teacher_family", ["cnn", "mlp", "convnext"])
def test_cakd_needs_a_vit_teacher(teacher_family):
    _, teacher = tiny_pair("cnn", teacher_family)
    with pytest.raises(UnsupportedPair, match="vit teachers"):
        get_distiller_class("cakd").check_pair("cnn", teacher.family)


def test_cakd_rejects_a_teacher_grid_other_than_the_student_stage3_grid():
    student, teacher = tiny_pair("cnn", "swin")  # Swin's last grid is 2×2, ResNet's stage 3 is 4×4
    with pytest.raises(UnsupportedPair, match="grid"):
        build("cakd", student, teacher)


@pytest.mark.parametrize("epoch,weight", [(1.0, 0.0), (26.0, 0.0), (31.0, 0.1), (36.0, 0.2),
                                          (101.0, 0.2)])
def test_cakd_ramp_on_the_zero_based_epoch(epoch, weight):
    distiller = build("cakd", *tiny_pair("cnn", "vit"))
    assert distiller.ramp(epoch) == pytest.approx(weight)


def test_cakd_teacher_attention_is_the_last_block_presoftmax_logits():
    student, teacher = tiny_pair("cnn", "vit")
    distiller = build("cakd", student, teacher)
    block = teacher.model.blocks[-1]
    block.attn.fused_attn = False  # so that the softmax probabilities can be read off attn_drop
    recorded = {}
    hooks = [block.register_forward_pre_hook(lambda m, a: recorded.setdefault("input", a[0])),
             block.attn.attn_drop.register_forward_pre_hook(
                 lambda m, a: recorded.setdefault("probs", a[0]))]
    images, _ = batch(2)
    with torch.no_grad(), distiller._qkv_recorded() as qkv:
        teacher.model(images)
    for hook in hooks:
        hook.remove()
    qk, vv = distiller.teacher_attention(qkv[-1])
    assert qk.shape == vv.shape == (2, 16, 16)  # class row and column removed
    # softmax(logits_h) = probs_h, so mean_h log probs_h differs from mean_h logits_h by a
    # per-row constant: the head-averaged logits are right up to that constant, exactly.
    log_probs = recorded["probs"].log().mean(1)[:, 1:, :]
    rows = patch_rows_of_qk(distiller, qkv[-1])
    torch.testing.assert_close(qk, rows[:, :, 1:])
    difference = rows - log_probs
    torch.testing.assert_close(difference - difference.mean(-1, keepdim=True),
                               torch.zeros_like(difference), atol=1e-4, rtol=0)
    # VVᵀ (unscaled), from v recomputed by hand
    heads = block.attn.num_heads
    qkv_by_hand = block.attn.qkv(block.norm1(recorded["input"])).view(2, 17, 3, heads, -1)
    v = qkv_by_hand[:, :, 2].transpose(1, 2)
    torch.testing.assert_close(vv, (v @ v.transpose(-2, -1)).mean(1)[:, 1:, 1:], rtol=1e-5, atol=1e-5)


def test_cakd_teacher_attention_targets_are_fp32_under_bf16_autocast():
    distiller = build("cakd", *tiny_pair("cnn", "vit"))
    qkv = 10 * torch.randn(2, 17, distiller.attention.qkv.out_features)   # 1 + 16 tokens
    expected = distiller.teacher_attention(qkv)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        found = distiller.teacher_attention(qkv)
    for got, want in zip(found, expected):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want)


def patch_rows_of_qk(distiller, qkv):
    """Head-averaged QKᵀ·scale for the patch rows over every key (class column kept), to match
    the softmax rows of timm's attention."""
    attn = distiller.attention
    q, k, _ = qkv.view(qkv.shape[0], qkv.shape[1], 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    return (q * attn.scale @ k.transpose(-2, -1)).mean(1)[:, 1:, :]


def test_cakd_gl_groups_are_the_official_blocks():
    def groups(hw):
        projector = GroupLinearProjector(1, 1, hw, group_size=4)
        with torch.no_grad():
            for index, linear in enumerate(projector.groups):
                linear.weight.fill_(index)
                linear.bias.zero_()
        ids = projector(torch.ones(1, hw[0] * hw[1], 1))[0, :, 0].long().tolist()
        return ids, len(projector.groups)

    ids, count = groups((14, 14))
    assert count == 16
    # resnet.py's idx_224_16_0, idx_224_16_3, idx_224_16_15 and idx_224_32_1
    assert [i for i, g in enumerate(ids) if g == 0] == [0, 1, 2, 3, 14, 15, 16, 17, 28, 29, 30, 31,
                                                        42, 43, 44, 45]
    assert [i for i, g in enumerate(ids) if g == 3] == [12, 13, 26, 27, 40, 41, 54, 55]
    assert [i for i, g in enumerate(ids) if g == 15] == [180, 181, 194, 195]
    ids, count = groups((7, 7))
    assert count == 4
    assert [i for i, g in enumerate(ids) if g == 1] == [4, 5, 6, 11, 12, 13, 18, 19, 20, 25, 26, 27]


def test_cakd_terms_on_the_same_tensors():
    distiller = build("cakd", *tiny_pair("cnn", "vit"))
    images, labels = batch()
    _, terms = distiller(images, labels, epoch=31.0)  # λ = 0.1
    student = forward_taps(distiller.student, images, (3,))
    with distiller._qkv_recorded() as qkv:
        teacher = distiller.teacher.features(images, (4,))
    teacher_qk, teacher_vv = distiller.teacher_attention(qkv[-1])
    tokens = student.stages[3].flatten(2).transpose(1, 2)
    heads, head_dim = 16, tokens.shape[-1] // 16
    qkv = distiller.pca_projector.qkv(tokens).view(4, 16, 3, heads, head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    student_qk = (q @ k.transpose(-2, -1) / math.sqrt(head_dim)).mean(1)
    student_vv = (v @ v.transpose(-2, -1) / math.sqrt(head_dim)).mean(1)
    patches = distiller.final_norm(teacher.stages[4]).flatten(2).transpose(1, 2)
    pca = 0.2 * F.mse_loss(student_qk, teacher_qk) + 0.05 * F.mse_loss(student_vv, teacher_vv)
    gl = (F.mse_loss(student.logits, teacher.logits)
          + F.mse_loss(distiller.cls_projector(student.pooled), teacher.pooled)
          + 0.05 * F.mse_loss(distiller.gl_projector(tokens), patches))
    torch.testing.assert_close(terms["loss_pca"], 0.1 * pca, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(terms["loss_gl"], 0.1 * gl, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(terms["loss_gt"],
                               F.cross_entropy(student.logits, labels, label_smoothing=0.1))
    # the teacher's class token after the final norm is its pooled pre-logits
    final = distiller.teacher.model.forward_features(images)
    torch.testing.assert_close(teacher.pooled, final[:, 0])


# -------------------------------------------------------------------------------------- PAT


PAT_PAIRS = (("cnn", "cnn"), ("cnn", "vit"), ("vit", "cnn"), ("vit", "mlp"), ("mlp", "vit"),
             ("cnn", "swin"), ("cnn", "convnext"))


@pytest.mark.parametrize("student_family,teacher_family", PAT_PAIRS)
def test_pat_two_training_steps(student_family, teacher_family):
    distiller = build("pat", *tiny_pair(student_family, teacher_family), **SMALL_PAT)
    terms = two_training_steps(distiller)
    assert set(terms) == {"loss_gt", "loss_kd", "loss_pat_mse", "loss_pat_reg"}
    # β moved off 0 in step 1, so in step 2 every prompt's convolutions get gradients too
    for stage, prompt in distiller.prompts.items():
        assert prompt.beta.grad.abs() > 0, stage
        assert prompt.prompt[0].weight.grad.abs().sum() > 0, stage
        assert prompt.fusion[0].weight.grad.abs().sum() > 0, stage


def test_pat_defaults_run():
    distiller = build("pat", *tiny_pair("cnn", "vit"))
    p = distiller.params
    assert (p.afp_stages, p.raa_num_queries, p.raa_dim, p.raa_heads) == ((1, 2, 3, 4), 64, 512, 8)
    two_training_steps(distiller)


def test_pat_terms_on_the_same_tensors_and_zero_beta_keeps_the_teacher():
    distiller = build("pat", *tiny_pair("cnn", "vit"), **SMALL_PAT)
    images, labels = batch()
    _, terms = distiller(images, labels)
    student = forward_taps(distiller.student, images, STAGES)
    plain = distiller.teacher.features(images, STAGES)  # β = 0: prompted teacher = plain one
    blended = distiller.raa([student.stages[s] for s in STAGES])
    feature = sum(hcl_loss(aligner(tokens), plain.stages[s])
                  for s, aligner, tokens in zip(STAGES, distiller.aligners, blended))
    torch.testing.assert_close(terms["loss_pat_mse"], feature, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["loss_kd"], kd_loss(student.logits, plain.logits))
    assert terms["loss_pat_reg"].abs() < 1e-6


def test_pat_prompts_change_the_teacher_once_beta_moves():
    distiller = build("pat", *tiny_pair("cnn", "swin"), **SMALL_PAT)
    with torch.no_grad():
        for prompt in distiller.prompts.values():
            prompt.beta.fill_(0.5)
    _, terms = distiller(*batch())
    assert terms["loss_pat_reg"] > 1e-6


def test_pat_feedback_is_detached_and_not_saved():
    distiller = build("pat", *tiny_pair("cnn", "convnext"), **SMALL_PAT)
    distiller.train()
    keys = set(distiller.state_dict())
    distiller(*batch())
    assert set(distiller.feedback) == set(STAGES)
    for stage, feedback in distiller.feedback.items():
        assert feedback.shape == (4, *distiller.teacher_shapes[stage]) and not feedback.requires_grad
    assert set(distiller.state_dict()) == keys  # stored feedback adds nothing to a checkpoint
    stored = dict(distiller.feedback)
    distiller.eval()
    distiller(*batch())
    assert all(distiller.feedback[s] is stored[s] for s in STAGES)  # evaluation leaves it alone
    distiller.train()
    distiller(*batch(2))  # another batch size: zero feedback instead of a shape error


def test_pat_prompt_stages_are_configurable():
    distiller = build("pat", *tiny_pair("cnn", "vit"), afp_stages=[2, 4], **SMALL_PAT)
    assert set(distiller.prompts) == {"2", "4"}
    two_training_steps(distiller)
    with pytest.raises(ValueError, match="afp_stages"):
        build("pat", *tiny_pair("cnn", "vit"), afp_stages=[5])


def test_pat_building_blocks():
    encoding = sinusoidal_encoding(64, 8)
    assert encoding.shape == (64, 8) and encoding[0, 0] == 0 and encoding[0, 1] == 1
    assert torch.allclose(encoding[5, 2], torch.sin(torch.tensor(5 * 10000 ** (-2 / 8))))
    se = SqueezeExcite(32)
    x = torch.randn(2, 32, 3, 3)
    gate = se.gate(x)
    assert gate.shape == (2, 32, 1, 1)
    torch.testing.assert_close(se(x), x * gate)


# ------------------------------------------------------------------------------------ recipes


@pytest.mark.parametrize("path,method", [
    ("configs/imagenet/cakd/vit_base_patch16_224-resnet50.yaml", "cakd"),
    ("configs/imagenet/pat/deit_tiny-resnet18.yaml", "pat")])
def test_recipes_validate(path, method):
    cfg = load_config(REPO / path)
    assert cfg.distill.method == method
    build_params(method, cfg.distill.params)
