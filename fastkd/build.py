"""Everything a run is made of, built from a Config: one function per part, explicit inputs.

The order matters and `build_training` keeps it in one place: device → classes → student →
loaders (they need the student's data config) → teacher (re-normalises from the student's
mean/std) → distiller on the device → optimizer over the distiller's trainable parameters →
scheduler (needs the steps per epoch) → EMA → DDP.
"""
from __future__ import annotations

import copy
import difflib
import importlib.util
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
from timm.optim import (create_optimizer_v2, get_optimizer_info, list_optimizers,
                        param_groups_layer_decay, param_groups_weight_decay)
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fastkd.checkpoint import load_checkpoint, student_state_dict
from fastkd.weight_files import WeightFileError
from fastkd.compat import NORM_LAYERS, ddp_ignore
from fastkd.config import Config, ConfigError, OptimConfig, check_values, replace
from fastkd.distillers import build_params, get_distiller_class
from fastkd.distillers.base import Distiller
from fastkd.distributed import World, barrier
from fastkd.models import (Teacher, create_student, create_teacher, load_state_dict_file,
                           model_data_config, model_family)
from fastkd.pipelines import DataError, build_loader, load_index
from fastkd.pipelines.settings import resolve_image_settings
from fastkd.threads import ThreadBudget, apply_threads, plan_threads

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def amp_dtype(cfg: Config) -> torch.dtype | None:
    """The autocast dtype of `train.amp`; None runs in fp32."""
    return AMP_DTYPES[cfg.train.amp]


def check_runnable(cfg: Config) -> None:
    """Refuse, before any file is written, what cannot run: an unknown method or bad method
    params, a method needing a teacher without one, a teacher cache that cannot serve the run."""
    if cfg.data.root is None or not Path(cfg.data.root).is_dir():
        raise ConfigError(f"data.root: {cfg.data.root!r} is not a directory (the ImageFolder "
                          f"root holding the {cfg.data.train_split}/ and {cfg.data.val_split}/ splits)")
    check_values(cfg)
    if cfg.train.sync_bn and not torch.cuda.is_available():
        raise ConfigError("train.sync_bn: SyncBatchNorm synchronises batch statistics across "
                          "GPUs (NCCL); this machine has no CUDA device")
    _check_model("model", cfg.model.name, cfg.model.kwargs)
    _check_model("teacher", cfg.teacher.name, cfg.teacher.kwargs)
    if cfg.optim.opt.lower() not in list_optimizers():
        raise ConfigError(f"optim.opt: '{cfg.optim.opt}' is not a timm optimizer "
                          f"(e.g. sgd, momentum, adamw, lamb; timm.optim.list_optimizers())")
    if cfg.optim.opt.lower().startswith("fused") and importlib.util.find_spec("apex") is None:
        raise ConfigError(f"optim.opt: '{cfg.optim.opt}' is one of NVIDIA apex's fused "
                          f"optimizers and apex is not installed (build it from "
                          f"github.com/NVIDIA/apex; the PyPI package named 'apex' is another "
                          f"project). sgd, momentum, adam and adamw already run fused")
    if cfg.sched.sched == "plateau":
        raise ConfigError("sched.sched: 'plateau' needs a metric every step; use cosine, step, "
                          "multistep, poly, tanh, wsd, rsqrt, constant or none")
    method = get_distiller_class(cfg.distill.method)
    build_params(cfg.distill.method, cfg.distill.params)
    if method.needs.teacher and cfg.teacher.name is None:
        raise ConfigError(f"distill.method '{cfg.distill.method}' needs a teacher: set teacher.name "
                          f"(and teacher.checkpoint)")
    if cfg.cache.dir is not None:
        from fastkd.cache import check_cacheable, open_manifest
        check_cacheable(cfg)
        open_manifest(cfg)


def _check_model(key: str, name: str | None, kwargs: dict) -> None:
    """An unknown timm name or an argument the model does not take, refused before any work
    (building it on the meta device costs no memory)."""
    if name is None:
        return
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else " (timm.list_models())"
        raise ConfigError(f"{key}.name: '{name}' is not a timm model{hint}")
    try:
        with torch.device("meta"):
            timm.create_model(name, num_classes=2, **kwargs)
    except TypeError as error:
        raise ConfigError(f"{key}.kwargs: {kwargs} is not accepted by {name} ({error})") from None


def index_splits_first_on_rank0(cfg: Config, world: World) -> None:
    """Rank 0 indexes the splits (one header probe per file) while the other ranks wait, then
    they read its cached index instead of probing the same files all at once."""
    if world.distributed and world.rank == 0:
        for split in (cfg.data.train_split, cfg.data.val_split):
            try:
                load_index(cfg.data.root, split, workers=max(4, cfg.data.num_workers or 0))
            except (DataError, FileNotFoundError):
                pass   # reported below by the loader that needs the split, on every rank
    barrier(world)


def count_classes(cfg: Config) -> int:
    """`data.num_classes`, else the class folders of the training split (else the val split)."""
    if cfg.data.num_classes:
        return cfg.data.num_classes
    if cfg.data.root is None:
        raise ConfigError("data.root: not set (the ImageFolder root holding the splits)")
    errors = []
    for split in (cfg.data.train_split, cfg.data.val_split):
        try:
            return len(load_index(cfg.data.root, split,
                                  workers=max(4, cfg.data.num_workers or 0)).classes)
        except (DataError, FileNotFoundError) as error:
            errors.append(str(error))
    raise ConfigError(f"data.root: cannot count the classes: {'; '.join(dict.fromkeys(errors))}")


# --------------------------------------------------------------------------------- models


def build_student(cfg: Config, num_classes: int) -> nn.Module:
    kwargs = dict(cfg.model.kwargs)
    # None keeps timm's default; create_model drops None-valued keywords itself.
    kwargs.update(drop_rate=cfg.model.drop_rate, drop_path_rate=cfg.model.drop_path_rate)
    return create_student(cfg.model.name, num_classes, checkpoint=cfg.model.checkpoint,
                          pretrained=cfg.model.pretrained, **kwargs)


def build_teacher(cfg: Config, num_classes: int, *, student_mean_std, device: torch.device
                  ) -> Teacher:
    model = create_teacher(cfg.teacher.name, num_classes, checkpoint=cfg.teacher.checkpoint,
                           pretrained=cfg.teacher.pretrained, use_ema=cfg.teacher.use_ema,
                           **cfg.teacher.kwargs)
    teacher = Teacher(model, amp_dtype=amp_dtype(cfg), student_mean_std=student_mean_std,
                      channels_last=cfg.train.channels_last, train_mode=cfg.teacher.train_mode)
    return teacher.to(device)


def build_distiller(cfg: Config, student: nn.Module, teacher: Teacher | None, num_classes: int,
                    *, input_size: tuple[int, int, int], num_samples: int,
                    sample_labels=None) -> Distiller:
    """The method around the student; `UnsupportedPair` for a pairing it cannot serve.

    Projectors are shaped at the training `input_size`. A method that reads dataset indices
    (CRD's memory bank) gets the training-set size as `num_samples` unless the config sets it,
    and the training labels by dataset index as `sample_labels` (CRD's class-aware negatives).
    """
    method = get_distiller_class(cfg.distill.method)
    params = dict(cfg.distill.params)
    if method.needs.indices:
        params.setdefault("num_samples", num_samples)
    params = build_params(cfg.distill.method, params)
    method.check_pair(model_family(student), teacher.family if teacher is not None else None)
    by_index = {"sample_labels": sample_labels} if method.needs.indices else {}
    return method(student, teacher, params, num_classes=num_classes, **by_index,
                  gt_weight=cfg.distill.gt_weight, label_smoothing=cfg.data.label_smoothing,
                  input_size=input_size)


# ------------------------------------------------------------------------------ optimization


def resolve_lr(optim: OptimConfig, global_batch: int) -> tuple[float, str]:
    """`optim.lr` when set, else the linear rule `lr_base · global_batch / lr_base_size`; the
    second value says which, for env.json and the log."""
    if optim.lr is not None:
        return optim.lr, f"optim.lr = {optim.lr:g} (fixed)"
    lr = optim.lr_base * global_batch / optim.lr_base_size
    return lr, (f"lr_base · global_batch / lr_base_size = {optim.lr_base:g} · {global_batch} / "
                f"{optim.lr_base_size} = {lr:g}")


def _optimizer_groups(distiller: Distiller, optim: OptimConfig) -> list[dict]:
    """timm's groups for the student (its `no_weight_decay()` list, layer decay when set), plus
    the method's own trainable parts with the usual rule: no decay on 1-D tensors."""
    student = distiller.student
    no_decay = set(getattr(student, "no_weight_decay", lambda: set())())
    if optim.layer_decay is not None:
        groups = param_groups_layer_decay(student, weight_decay=optim.weight_decay,
                                          layer_decay=optim.layer_decay,
                                          no_weight_decay_list=no_decay)
    else:
        groups = param_groups_weight_decay(student, weight_decay=optim.weight_decay,
                                           no_weight_decay_list=no_decay)
    student_ids = {id(p) for p in student.parameters()}
    extra = [p for p in distiller.parameters() if p.requires_grad and id(p) not in student_ids]
    decay = [p for p in extra if p.ndim > 1]
    flat = [p for p in extra if p.ndim <= 1]
    groups += [g for g in ({"params": decay, "weight_decay": optim.weight_decay},
                           {"params": flat, "weight_decay": 0.0}) if g["params"]]
    return [g for g in groups if g["params"]]


# torch optimizers with a fused implementation (one kernel per parameter group, CUDA and CPU)
# that also take GradScaler's `found_inf`, so a non-finite step is skipped on the device
FUSED_TORCH_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


def uses_fused_torch_optimizer(name: str) -> bool:
    return issubclass(get_optimizer_info(name).opt_class, FUSED_TORCH_OPTIMIZERS)


def build_optimizer(cfg: Config, distiller: Distiller, lr: float) -> torch.optim.Optimizer:
    """timm's optimizer factory over the student and the method's trainable parts (never the
    teacher, which is not a submodule); torch's SGD/Adam/AdamW in their fused form."""
    optim = cfg.optim
    extra = {key: value for key, value in (("betas", optim.betas), ("eps", optim.eps))
             if value is not None}
    fused = uses_fused_torch_optimizer(optim.opt)
    if fused:
        extra["fused"] = True
    optimizer = create_optimizer_v2(distiller, optim.opt, lr=lr, weight_decay=optim.weight_decay,
                                    momentum=optim.momentum,
                                    param_group_fn=lambda module: _optimizer_groups(module, optim),
                                    **extra)
    if fused:
        zero_momentum_buffers_(optimizer)
    return optimizer


def zero_momentum_buffers_(optimizer: torch.optim.Optimizer) -> None:
    """SGD's momentum buffers as zeros from the start. torch's fused SGD creates them with
    `empty_like` on its first step, so a first step skipped through `found_inf` would leave
    garbage behind; with no dampening, a zero buffer gives the first step exactly what torch's
    lazy `buf = grad` gives (0·μ + g = g)."""
    for group in optimizer.param_groups:
        if group.get("momentum") and not group.get("dampening"):
            for param in group["params"]:
                optimizer.state[param].setdefault("momentum_buffer", torch.zeros_like(param))


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """timm's scheduler factory; stepped with explicit counters by the engine (per update
    unless `sched.step_on_epochs`). None for `sched: none`."""
    s = cfg.sched
    try:
        scheduler, _ = create_scheduler_v2(
            optimizer, sched=s.sched, num_epochs=cfg.train.epochs, decay_epochs=s.decay_epochs,
            decay_milestones=list(s.decay_milestones), decay_rate=s.decay_rate, min_lr=s.min_lr,
            warmup_lr=s.warmup_lr, warmup_epochs=s.warmup_epochs,
            step_on_epochs=s.step_on_epochs, updates_per_epoch=steps_per_epoch,
            noise_seed=cfg.train.seed)
    except ValueError as error:   # an unknown name, or a wsd decay longer than the run
        raise ConfigError(f"sched: {error}") from None
    return scheduler


def build_ema(cfg: Config, student: nn.Module) -> ModelEmaV3 | None:
    """EMA of the student. Must be called after the student is on its device (the copy lives
    where the model lives) and before DDP wraps it (the EMA must copy the bare student, not the
    wrapper) — timm's ModelEmaV3 docstring and train.py say the same."""
    return ModelEmaV3(student, decay=cfg.train.ema_decay) if cfg.train.ema else None


def method_buffers(distiller: Distiller) -> list[str]:
    """The method's own buffers outside normalisation layers: constants (PAT's positional
    table, CAKD's permutation) or state the method keeps identical on every rank itself (CRD's
    N×D memory banks, about 1.3 GB on ImageNet). DDP need neither broadcast them before every
    forward nor average them at epoch ends; the student's buffers and the running statistics
    of the method's norm layers are rank-local and still are."""
    student = {id(b) for b in distiller.student.buffers()}
    names = []
    for prefix, module in distiller.named_modules():
        if isinstance(module, NORM_LAYERS):
            continue
        names += [f"{prefix}.{name}" if prefix else name
                  for name, buffer in module.named_buffers(recurse=False)
                  if id(buffer) not in student]
    return names


def wrap_ddp(distiller: Distiller, world: World, *, sync_bn: bool = False) -> nn.Module:
    """DDP around the distiller only (student + method parts). The teacher stays outside: it
    is frozen and not a submodule. A method whose parts are not all used every step declares
    `find_unused_parameters = True`; the default avoids the extra graph traversal. DDP ignores
    `method_buffers` (and `average_buffers_` follows what DDP ignores)."""
    if not world.distributed:
        return distiller
    if sync_bn:   # same Parameter objects: the optimizer and the EMA are unaffected
        distiller = nn.SyncBatchNorm.convert_sync_batchnorm(distiller)
    ddp_ignore(distiller, method_buffers(distiller))
    device_ids = [world.device.index] if world.device.type == "cuda" else None
    return DistributedDataParallel(
        distiller, device_ids=device_ids,
        find_unused_parameters=distiller.find_unused_parameters)


# ------------------------------------------------------------------------------------ loaders


def build_loader_for(cfg: Config, world: World, *, split: str, train: bool, model_cfg: dict,
                     num_classes: int, crop_cycle: int | None = None):
    return build_loader(cfg.data, split=split, train=train, batch_size=cfg.train.batch_size,
                        model_cfg=model_cfg, seed=cfg.train.seed, rank=world.rank,
                        world_size=world.world_size, device=world.device,
                        amp_dtype=amp_dtype(cfg), channels_last=cfg.train.channels_last,
                        num_classes=num_classes, crop_cycle=crop_cycle)


def student_info(cfg: Config, student: nn.Module, num_classes: int, classes) -> dict:
    """What `student.json` says: enough to rebuild the model and feed it like in training."""
    settings = resolve_image_settings(cfg.data, model_data_config(student))
    return {"architecture": cfg.model.name, "num_classes": num_classes,
            "model_kwargs": dict(cfg.model.kwargs),
            "input_size": [3, settings.img_size, settings.img_size],
            "mean": list(settings.mean), "std": list(settings.std),
            "crop_pct": settings.crop_pct, "interpolation": settings.interpolation,
            "classes": list(classes) if classes is not None else None}


# ------------------------------------------------------------------------------- everything


@dataclass
class TrainingSetup:
    """The objects one training run is made of (built once by `build_training`)."""
    cfg: Config
    world: World
    distiller: Distiller            # the bare module: checkpoints, EMA updates, evaluation
    model: nn.Module                # what the step calls: the distiller, or DDP around it
    teacher: Teacher | None
    optimizer: torch.optim.Optimizer
    scheduler: object | None
    scaler: torch.amp.GradScaler | None
    ema: ModelEmaV3 | None
    train_loader: object
    val_loader: object
    steps_per_epoch: int
    lr: float
    lr_rule: str
    student_info: dict = field(default_factory=dict)
    teacher_source: str = "online"   # or where the teacher cache it replays lives
    threads: ThreadBudget | None = None

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return amp_dtype(self.cfg)

    @property
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.distiller.parameters() if p.requires_grad]

    def close(self) -> None:
        """Stop the loaders' worker processes and threads now, not at interpreter exit."""
        for loader in (self.train_loader, self.val_loader):
            loader.close()


def configure_backends(cfg: Config, device: torch.device) -> None:
    """cuDNN picks the fastest convolution algorithms for the (fixed) training input size;
    fp32 matmuls and convolutions use TF32 unless `train.tf32: false` asks for exact fp32."""
    if device.type == "cuda":   # on a CPU fp32 stays exact either way
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = cfg.train.tf32
        torch.set_float32_matmul_precision("high" if cfg.train.tf32 else "highest")


def budget_threads(cfg: Config, device: torch.device) -> tuple[Config, ThreadBudget]:
    """Apply the CPU thread budget (`fastkd.threads`); the config's `data.num_workers` becomes
    the loader's share."""
    threads = plan_threads(cfg.data.num_workers, cfg.train.cpu_threads,
                           on_gpu=device.type == "cuda")
    apply_threads(threads)
    return replace(cfg, data={"num_workers": threads.loader}), threads


def build_training(cfg: Config, world: World) -> TrainingSetup:
    """The run's parts, in the order the module docstring gives; the caller (`engine.train`)
    has already refused what `check_runnable` refuses, before touching the run directory."""
    device = world.device
    configure_backends(cfg, device)
    cfg, threads = budget_threads(cfg, device)
    method = get_distiller_class(cfg.distill.method)
    index_splits_first_on_rank0(cfg, world)
    num_classes = count_classes(cfg)
    student = build_student(cfg, num_classes)
    model_cfg = model_data_config(student)
    manifest = None
    if cfg.cache.dir is not None and method.needs.teacher:
        from fastkd.cache import open_manifest
        manifest = open_manifest(cfg)
    train_loader = build_loader_for(cfg, world, split=cfg.data.train_split, train=True,
                                    model_cfg=model_cfg, num_classes=num_classes,
                                    crop_cycle=manifest["epochs"] if manifest else None)
    val_loader = build_loader_for(cfg, world, split=cfg.data.val_split, train=False,
                                  model_cfg=model_cfg, num_classes=num_classes)
    info = student_info(cfg, student, num_classes, getattr(train_loader, "classes", None))
    teacher, teacher_source = None, "online"
    if manifest is not None:   # the teacher cache replaces the teacher network
        from fastkd.cache import cached_teacher
        teacher, train_loader = cached_teacher(cfg, manifest, train_loader,
                                               resolve_image_settings(cfg.data, model_cfg),
                                               num_classes, device)
        teacher_source = teacher.describe()
    elif method.needs.teacher:
        teacher = build_teacher(cfg, num_classes, student_mean_std=(info["mean"], info["std"]),
                                device=device)
    elif cfg.teacher.name is not None:
        warnings.warn(f"distill.method '{cfg.distill.method}' uses no teacher; teacher.name "
                      f"'{cfg.teacher.name}' is ignored", stacklevel=2)
    distiller = build_distiller(cfg, student, teacher, num_classes,
                                input_size=tuple(info["input_size"]),
                                num_samples=train_loader.num_samples,
                                sample_labels=train_loader.index.labels).to(device)
    if cfg.train.channels_last:
        distiller.to(memory_format=torch.channels_last)
    steps = len(train_loader)
    if cfg.train.max_steps_per_epoch is not None:
        steps = min(steps, cfg.train.max_steps_per_epoch)
    if steps < 1:
        raise ConfigError(f"the training split gives no full batch of {cfg.train.batch_size} on "
                          f"each of {world.world_size} process(es); lower train.batch_size")
    lr, lr_rule = resolve_lr(cfg.optim, cfg.train.batch_size * world.world_size)
    optimizer = build_optimizer(cfg, distiller, lr)
    scheduler = build_scheduler(cfg, optimizer, steps)
    scaler = torch.amp.GradScaler(device.type) if cfg.train.amp == "fp16" else None
    ema = build_ema(cfg, distiller.student)       # after .to(device), before DDP
    if cfg.train.compile:
        distiller.student.compile()                # in place: state-dict keys stay timm's
    return TrainingSetup(cfg=cfg, world=world, distiller=distiller,
                         model=wrap_ddp(distiller, world, sync_bn=cfg.train.sync_bn),
                         teacher=teacher, optimizer=optimizer,
                         scheduler=scheduler, scaler=scaler, ema=ema, train_loader=train_loader,
                         val_loader=val_loader, steps_per_epoch=steps, lr=lr, lr_rule=lr_rule,
                         student_info=info, teacher_source=teacher_source, threads=threads)


def build_evaluation(cfg: Config, world: World, checkpoint: str | Path | None = None
                     ) -> tuple[dict[str, nn.Module], object]:
    """The student (and its EMA when a fastkd checkpoint holds one) with the weights of
    `checkpoint`, or of `model.checkpoint` when none is given, plus the validation loader."""
    cfg, _ = budget_threads(cfg, world.device)
    saved = weights = None
    if checkpoint is not None:
        cfg = replace(cfg, model={"checkpoint": None, "pretrained": False})
        try:
            saved = load_checkpoint(checkpoint)
        except WeightFileError as error:   # a plain state dict / safetensors file, or damaged
            try:
                weights = load_state_dict_file(checkpoint)
            except Exception:
                raise error from None
    num_classes = saved["student_info"]["num_classes"] if saved else count_classes(cfg)
    student = build_student(cfg, num_classes)
    models = {"eval": student}
    try:
        if saved is not None:
            student.load_state_dict(student_state_dict(saved), strict=True)
            if saved.get("ema") is not None:
                models["ema"] = copy.deepcopy(student)
                models["ema"].load_state_dict(student_state_dict(saved, ema=True), strict=True)
        elif weights is not None:
            student.load_state_dict(weights, strict=True)
    except RuntimeError as error:        # another architecture or class count
        first = str(error).splitlines()[1:2] or [str(error)[:200]]
        raise WeightFileError(f"{checkpoint} does not fit {cfg.model.name} with {num_classes} "
                              f"classes: {first[0].strip()[:300]}") from None
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    for model in models.values():
        model.to(world.device, memory_format=memory_format).eval()
    loader = build_loader_for(cfg, world, split=cfg.data.val_split, train=False,
                              model_cfg=model_data_config(student), num_classes=num_classes)
    return models, loader
