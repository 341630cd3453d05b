"""fastkd.models: checkpoint layouts, the frozen teacher, stage discovery and feature taps."""
import argparse
import copy

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models.mlp_mixer import Affine, MlpMixer, ResBlock
from torch import nn

from fastkd.models import (
    StageInfo, Teacher, TeacherHeadMismatch, create_student, create_teacher, forward_taps,
    isotropic_stage_indices, load_state_dict_file, model_data_config, model_family,
    num_prefix_tokens, stage_info, stage_module,
)

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def tiny_swin():
    return timm.create_model("swin_tiny_patch4_window7_224", num_classes=10, embed_dim=16,
                             depths=(1, 1, 2, 1), num_heads=(1, 1, 2, 2), img_size=64,
                             window_size=4)


def tiny_mixer():
    # timm's mixer_* entry points hard-code num_blocks, so the class is built directly.
    return MlpMixer(num_classes=10, img_size=64, patch_size=16, num_blocks=4, embed_dim=64)


def tiny_resmlp():
    return MlpMixer(num_classes=10, img_size=64, patch_size=16, num_blocks=4, embed_dim=64,
                    mlp_ratio=4, block_layer=ResBlock, norm_layer=Affine)


def tiny_deit_distilled():
    return timm.create_model("deit_tiny_distilled_patch16_224", num_classes=10, depth=4,
                             embed_dim=48, num_heads=2, img_size=64)


# name → (builder, input size, expected stage modules, family, prefix tokens)
MODELS = {
    "test_resnet": (lambda: timm.create_model("test_resnet", num_classes=10), (3, 64, 64),
                    ("layer1", "layer2", "layer3", "layer4"), "cnn", 0),
    "test_convnext": (lambda: timm.create_model("test_convnext", num_classes=10), (3, 64, 64),
                      ("stages.0", "stages.1", "stages.2", "stages.3"), "cnn", 0),
    "test_efficientnet": (lambda: timm.create_model("test_efficientnet", num_classes=10),
                          (3, 64, 64), ("blocks.1", "blocks.2", "blocks.3", "bn2"), "cnn", 0),
    "mobilenetv3_small_050": (lambda: timm.create_model("mobilenetv3_small_050", num_classes=10),
                              (3, 64, 64), ("blocks.0", "blocks.1", "blocks.3", "blocks.5"),
                              "cnn", 0),
    "regnetx_002": (lambda: timm.create_model("regnetx_002", num_classes=10), (3, 64, 64),
                    ("s1", "s2", "s3", "s4"), "cnn", 0),
    # test_vit has 6 blocks: round(6k/12) - 1 for k = 2, 4, 10, 12 → 0, 1, 4, 5.
    "test_vit": (lambda: timm.create_model("test_vit", num_classes=10), (3, 160, 160),
                 ("blocks.0", "blocks.1", "blocks.4", "blocks.5"), "vit", 1),
    "swin": (tiny_swin, (3, 64, 64), ("layers.0", "layers.1", "layers.2", "layers.3"), "vit", 0),
    "mixer": (tiny_mixer, (3, 64, 64), ("blocks.0", "blocks.1", "blocks.2", "blocks.3"), "mlp", 0),
    "resmlp": (tiny_resmlp, (3, 64, 64), ("blocks.0", "blocks.1", "blocks.2", "blocks.3"), "mlp", 0),
}


@pytest.fixture(scope="module")
def built():
    """Each model built once for the module (built on demand), in eval mode."""
    cache = {}

    def get(name):
        if name not in cache:
            torch.manual_seed(0)
            cache[name] = MODELS[name][0]().eval()
        return cache[name]
    return get


def model_output(model, x):
    with torch.no_grad():
        return model(x)


# ------------------------------------------------------------------------------- checkpoints


def save_layout(tmp_path, state, layout):
    other = {k: torch.zeros_like(v) for k, v in state.items()}
    if layout == "safetensors":
        path = tmp_path / "weights.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        return path
    payload = {
        "plain": state,
        "model": {"model": state, "epoch": 3},
        "state_dict": {"state_dict": state, "args": argparse.Namespace(lr=0.1), "epoch": 3},
        "model_ema": {"model": other, "model_ema": state},
        "state_dict_ema": {"state_dict": other, "state_dict_ema": state},
        "module_prefix": {"state_dict": {"module." + k: v for k, v in state.items()}},
    }[layout]
    path = tmp_path / "weights.pth"
    torch.save(payload, path)
    return path


@pytest.mark.parametrize("layout", ["plain", "model", "state_dict", "model_ema",
                                    "state_dict_ema", "module_prefix", "safetensors"])
def test_checkpoint_layouts_load_identical_weights(tmp_path, layout):
    source = timm.create_model("test_resnet", num_classes=10).eval()
    for p in source.parameters():  # weights no fresh model could start from
        p.data.normal_()
    path = save_layout(tmp_path, source.state_dict(), layout)
    teacher = create_teacher("test_resnet", 10, checkpoint=path, use_ema=layout.endswith("_ema"))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model_output(teacher, x), model_output(source, x))


def test_non_ema_load_prefers_the_live_weights(tmp_path):
    state = timm.create_model("test_resnet", num_classes=10).state_dict()
    path = save_layout(tmp_path, state, "state_dict_ema")  # 'state_dict' holds zeros
    assert all(v.abs().sum() == 0 for v in load_state_dict_file(path).values())


def test_use_ema_without_ema_weights_names_file_and_keys(tmp_path):
    path = save_layout(tmp_path, {"w": torch.ones(2)}, "state_dict")
    with pytest.raises(ValueError, match="use_ema") as error:
        load_state_dict_file(path, use_ema=True)
    assert "weights.pth" in str(error.value) and "state_dict" in str(error.value)


def test_unknown_layout_names_file_and_keys(tmp_path):
    path = tmp_path / "odd.pt"
    torch.save({"weights": {"w": torch.ones(2)}, "epoch": 1}, path)
    with pytest.raises(ValueError) as error:
        load_state_dict_file(path)
    message = str(error.value)
    assert "odd.pt" in message and "'weights'" in message and "'epoch'" in message


def test_head_mismatch_is_explained(tmp_path):
    path = tmp_path / "teacher.pth"
    torch.save(timm.create_model("test_resnet", num_classes=1000).state_dict(), path)
    with pytest.raises(TeacherHeadMismatch) as error:
        create_teacher("test_resnet", 100, checkpoint=path)
    message = str(error.value)
    assert "1000-class" in message and "100 classes" in message and "teacher.pth" in message
    assert "num_classes=1000" in message  # says what to do


def test_pretrained_head_mismatch_raises_before_any_download(monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("the model must not be built (and weights downloaded)")
    monkeypatch.setattr(timm, "create_model", no_build)
    with pytest.raises(TeacherHeadMismatch, match="1000-class"):
        create_teacher("test_vit", 10, pretrained=True)


def test_other_key_problems_are_listed(tmp_path):
    state = timm.create_model("test_resnet", num_classes=10).state_dict()
    state.pop("layer1.0.conv1.weight")
    state["extra.weight"] = torch.ones(1)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"missing \(1\): \['layer1.0.conv1.weight'\].*unexpected "
                                         r"\(1\): \['extra.weight'\]"):
        create_teacher("test_resnet", 10, checkpoint=path)


def test_student_checkpoint_with_other_head_keeps_a_fresh_head(tmp_path):
    source = timm.create_model("test_resnet", num_classes=1000)
    path = tmp_path / "imagenet.pth"
    torch.save({"state_dict": source.state_dict()}, path)
    with pytest.warns(UserWarning, match="1000-class"):
        student = create_student("test_resnet", 10, checkpoint=path)
    torch.testing.assert_close(student.layer1[0].conv1.weight, source.layer1[0].conv1.weight)
    assert student.fc.out_features == 10 and student.layer1[0].conv1.weight.requires_grad


def test_student_drops_none_keywords():
    student = create_student("test_resnet", 7, drop_path_rate=None, global_pool=None)
    assert student.num_classes == 7 and student.training


# ------------------------------------------------------------------------------------ teacher


def make_teacher(**options):
    model = timm.create_model("test_resnet", num_classes=10)
    return Teacher(model, amp_dtype=options.pop("amp_dtype", None), **options)


def test_teacher_is_frozen_and_stays_in_eval():
    teacher = make_teacher()
    assert not isinstance(teacher, nn.Module)
    assert not any(p.requires_grad for p in teacher.model.parameters())
    teacher.train()
    teacher.model.train()
    nn.Sequential(teacher.model).train()  # even a parent module's train() cannot switch it
    copy.deepcopy(teacher.model).train()
    assert not any(m.training for m in teacher.model.modules())


def test_teacher_train_mode_runs_like_the_mmcls_runners_teacher():
    """ScaleKD/UFD-KD `mmcls/models/classifiers/distiller.py` (`ClassificationDistiller.
    __init__`: `self.teacher.eval()` once) and cls_KD's `classification_distiller.py` keep the
    teacher as a submodule, and the runner's `model.train()` at each epoch sets it back to
    train mode: BatchNorm normalises with the batch's statistics (and updates its running
    ones) under no_grad. `teacher.train_mode: true` runs it that way, whatever calls train()."""
    torch.manual_seed(0)
    teacher = make_teacher(train_mode=True)
    reference = copy.deepcopy(teacher.model)
    nn.Module.train(reference, True)
    teacher.eval()
    nn.Sequential(teacher.model).train(False)   # nothing switches it off
    assert all(m.training for m in teacher.model.modules())
    assert not any(p.requires_grad for p in teacher.model.parameters())
    x = torch.randn(4, 3, 32, 32) * 2 + 1
    running_mean = teacher.model.bn1.running_mean.clone()
    with torch.no_grad():
        expected = reference(x)
    torch.testing.assert_close(teacher.logits(x), expected)
    assert not torch.equal(teacher.model.bn1.running_mean, running_mean)
    eval_teacher = make_teacher()
    eval_teacher.model.load_state_dict(reference.state_dict())
    assert not torch.allclose(eval_teacher.logits(x), expected)


def test_created_teacher_is_frozen_and_eval():
    with pytest.warns(UserWarning, match="random weights"):
        model = create_teacher("test_resnet", 10)
    model.train()
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_teacher_logits_carry_no_graph_and_are_fp32():
    teacher = make_teacher(amp_dtype=torch.bfloat16)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    logits = teacher.logits(x)
    assert logits.dtype == torch.float32 and not logits.requires_grad
    features = teacher.features(x, (1, 4))
    assert features.logits.dtype == torch.float32 and not features.stages[4].requires_grad


def test_teacher_outputs_can_be_saved_for_backward():
    """Losses such as MSE save the teacher tensor for backward: it must not be an
    inference-mode tensor."""
    teacher = make_teacher()
    x = torch.randn(2, 3, 32, 32)
    target = teacher.features(x, (2,)).stages[2]
    student_map = torch.randn_like(target, requires_grad=True)
    nn.functional.mse_loss(student_map, target).backward()
    assert student_map.grad is not None


def test_teacher_graph_mode_lets_gradients_reach_the_input():
    teacher = make_teacher()
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    teacher.features(x, (3,), graph=True).stages[3].square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.model.parameters())


def test_teacher_renormalizes_student_inputs():
    teacher = make_teacher(student_mean_std=IMAGENET)  # test_resnet uses mean = std = 0.5
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in IMAGENET)
    x = torch.randn(2, 3, 32, 32)
    pixels = x * std + mean
    expected = model_output(teacher.model, (pixels - 0.5) / 0.5)
    torch.testing.assert_close(teacher.logits(x), expected)
    assert not torch.allclose(teacher.logits(x), model_output(teacher.model, x), atol=1e-3)


def test_teacher_skips_renormalization_when_statistics_agree():
    teacher = make_teacher(student_mean_std=((0.5,) * 3, (0.5,) * 3))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(teacher.logits(x), model_output(teacher.model, x))


def test_teacher_channels_last_and_to():
    plain = make_teacher()
    fast = Teacher(copy.deepcopy(plain.model), amp_dtype=None, channels_last=True)
    assert fast.to("cpu") is fast
    assert fast.model.layer1[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(fast.logits(x), plain.logits(x), rtol=1e-4, atol=1e-4)


def test_teacher_info_and_family():
    teacher = Teacher(tiny_swin(), amp_dtype=None)
    assert teacher.family == "vit"
    assert [teacher.info[s].module for s in (1, 2, 3, 4)] == [f"layers.{i}" for i in range(4)]


# ------------------------------------------------------------------------ stages and features


@pytest.mark.parametrize("name", list(MODELS))
def test_forward_features_matches_stage_info_and_model(built, name):
    model = built(name)
    _, input_size, modules, family, prefix = MODELS[name]
    info = stage_info(model, input_size)
    assert [info[s].module for s in (1, 2, 3, 4)] == list(modules)
    assert model_family(model) == family and num_prefix_tokens(model) == prefix
    x = torch.randn(2, *input_size)
    with torch.no_grad():
        features = forward_taps(model, x, (1, 2, 3, 4))
    for stage, stage_map in features.stages.items():
        assert stage_map.shape == (2, info[stage].channels, info[stage].height, info[stage].width)
    torch.testing.assert_close(features.logits, model_output(model, x))
    # pre-logits width: head_hidden_size where the head has its own hidden layer (MobileNetV3)
    assert features.pooled.shape == (2, getattr(model, "head_hidden_size", model.num_features))


@pytest.mark.parametrize("name, widths", [
    ("mobilenetv2_100", (24, 32, 96, 1280)),
    ("efficientnet_b0", (24, 40, 112, 1280)),
])
def test_stage4_of_a_head_conv_model_is_after_conv_head_and_bn2(name, widths):
    """Hao840/OFAKD `custom_forward/efficientnet.py`: `forward_features` appends the output of
    `conv_head` + `bn2` as the last feature, and `stage_info` for mobilenetv2_100 gives
    stages 1-4 as (24, 56, 56), (32, 28, 28), (96, 14, 14) and (1280, 7, 7) (feature 17,
    after the head). efficientnet_b0 has no `stage_info` there, but the same custom forward:
    its stage 4 is the 1,280-channel map after `conv_head` + `bn2` as well."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).eval()
    info = stage_info(model, (3, 224, 224))
    assert tuple(info[s].channels for s in (1, 2, 3, 4)) == widths
    assert tuple((info[s].height, info[s].width) for s in (1, 2, 3, 4)) == (
        (56, 56), (28, 28), (14, 14), (7, 7))
    assert info[4].final and info[4].module == "bn2" and not info[3].final
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        features = forward_taps(model, x, (3, 4))
        after_head = model.bn2(model.conv_head(model.blocks(model.bn1(model.conv_stem(x)))))
    torch.testing.assert_close(features.stages[4], after_head)
    torch.testing.assert_close(features.logits, model(x))


def test_hierarchical_stages_keep_the_four_largest_reductions(built):
    info = stage_info(built("mobilenetv3_small_050"), (3, 64, 64))
    assert [info[s].reduction for s in (1, 2, 3, 4)] == [4, 8, 16, 32]
    assert [info[s].height for s in (1, 2, 3, 4)] == [16, 8, 4, 2]


def test_forward_features_without_stages_still_gives_logits(built):
    model = built("test_resnet")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = forward_taps(model, x, ())
    assert features.stages == {} and features.prefix == {}
    torch.testing.assert_close(features.logits, model_output(model, x))
    assert features.pooled.shape == (2, model.num_features)
    with torch.no_grad():
        assert forward_taps(model, x, (2,), with_logits=False).logits is None


def _forward_features_seen_by(module, model, x, stages):
    """`forward_taps(model, x, stages)` without grad, and every output of `module` in it."""
    outputs = []
    handle = module.register_forward_hook(lambda m, i, o: outputs.append(o))
    try:
        with torch.no_grad():
            features = forward_taps(model, x, stages)
    finally:
        handle.remove()
    return features, outputs


def test_forward_features_runs_the_model_once(built):
    model = built("test_vit")
    _, calls = _forward_features_seen_by(model.patch_embed, model, torch.randn(1, 3, 160, 160),
                                         (1, 2, 3, 4))
    assert len(calls) == 1


def test_vit_prefix_tokens_are_split_from_the_patch_grid(built):
    model = built("test_vit")
    info = stage_info(model, (3, 160, 160))[3]
    features, outputs = _forward_features_seen_by(stage_module(model, info), model,
                                                  torch.randn(2, 3, 160, 160), (3,))
    tokens = outputs[0]  # B × (1 + 10·10) × C, class token first
    assert features.prefix[3].shape == (2, 1, info.channels)
    torch.testing.assert_close(features.prefix[3], tokens[:, :1])
    grid = tokens[:, 1:].transpose(1, 2).reshape(2, info.channels, info.height, info.width)
    torch.testing.assert_close(features.stages[3], grid)


def test_distilled_deit_has_two_prefix_tokens():
    model = tiny_deit_distilled().eval()
    with torch.no_grad():
        features = forward_taps(model, torch.randn(2, 3, 64, 64), (1, 4))
    assert num_prefix_tokens(model) == 2
    assert features.prefix[4].shape == (2, 2, 48) and features.stages[4].shape == (2, 48, 4, 4)


@pytest.mark.parametrize("name", ["test_resnet", "test_convnext", "mobilenetv3_small_050"])
def test_stage_module_produces_the_stage(built, name):
    model = built(name)
    info = stage_info(model, (3, 64, 64))[2]
    features, outputs = _forward_features_seen_by(stage_module(model, info), model,
                                                  torch.randn(1, 3, 64, 64), (2,))
    torch.testing.assert_close(outputs[-1], features.stages[2])


def test_stage_info_probe_leaves_training_state_alone():
    model = timm.create_model("test_resnet", num_classes=10)  # training mode
    model.layer1.eval()  # a deliberately frozen part keeps its own mode
    running_mean = model.bn1.running_mean.clone()
    info = stage_info(model, (3, 32, 32))
    assert isinstance(info[1], StageInfo) and info[4].height == 1
    assert model.training and not model.layer1.training and model.layer2.training
    torch.testing.assert_close(model.bn1.running_mean, running_mean)
    assert stage_info(model, (3, 32, 32)) is info  # cached per input size


def test_isotropic_indices_follow_ofa_and_stay_distinct():
    assert isotropic_stage_indices(12) == (1, 3, 9, 11)
    assert isotropic_stage_indices(24) == (3, 7, 19, 23)
    assert isotropic_stage_indices(4) == (0, 1, 2, 3)
    for depth in range(4, 40):
        indices = isotropic_stage_indices(depth)
        assert list(indices) == sorted(set(indices)) and 0 <= indices[0] and indices[3] == depth - 1


def test_isotropic_indices_for_fewer_than_four_blocks_repeat_the_last():
    assert isotropic_stage_indices(3) == (0, 1, 2, 2)
    assert isotropic_stage_indices(1) == (0, 0, 0, 0)
    with pytest.raises(ValueError):
        isotropic_stage_indices(0)


def test_model_data_config_uses_the_built_image_size():
    config = model_data_config(tiny_swin())
    assert config["input_size"] == (3, 64, 64)
    assert {"mean", "std", "crop_pct", "interpolation"} <= set(config)
    assert model_data_config(timm.create_model("test_resnet"))["mean"] == (0.5, 0.5, 0.5)


@pytest.mark.gpu
def test_teacher_on_cuda_in_bf16_channels_last():
    model = timm.create_model("test_convnext", num_classes=10)
    reference = copy.deepcopy(model).eval()
    teacher = Teacher(model, amp_dtype=torch.bfloat16, channels_last=True,
                      student_mean_std=IMAGENET).to("cuda")
    x = torch.randn(4, 3, 64, 64, device="cuda")
    features = teacher.features(x, (1, 2, 3, 4))
    assert features.logits.dtype == torch.float32 and features.stages[4].dtype == torch.bfloat16
    assert features.stages[1].shape == (4, 24, 16, 16)  # test_convnext: 24 channels, stride 4
    mean, std = (torch.tensor(v, device="cuda").view(1, 3, 1, 1) for v in IMAGENET)
    expected = model_output(reference.cuda(), (x * std + mean - 0.5) / 0.5)
    torch.testing.assert_close(teacher.logits(x), expected, rtol=0.05, atol=0.05)


def test_unknown_stage_is_rejected(built):
    with pytest.raises(ValueError, match="stages"):
        forward_taps(built("test_resnet"), torch.randn(1, 3, 32, 32), (5,))
