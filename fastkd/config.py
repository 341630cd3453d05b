"""The one config schema: YAML file + `key.sub=value` overrides, validated against dataclasses.

Loading is strict so that a typo fails before any work starts: an unknown key names the
closest valid one, a wrong type or value names the key, the value and what is allowed. YAML is
read with `yaml.safe_load` only (no executable tags). Every section is a frozen dataclass; the
effective config is written to the run directory as plain YAML (`dump_config`), and that file
is itself a valid config, so `fastkd train RUN/config.yaml` reproduces a run.

`None` means "keep the default" of the library that consumes the value (timm's convention):
`data.img_size: null` uses the student's own input size, `optim.lr: null` applies the LR rule.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config that cannot run; the CLI prints it and exits with status 2."""


@dataclass(frozen=True)
class DataConfig:
    root: str | None = None                  # ImageFolder root (or the root of the file lists)
    train_split: str = "train"               # sub-folder of root, or a `relative/path label` .txt
    val_split: str = "val"
    num_classes: int | None = None           # None: counted from the training split
    loader: Literal["auto", "dali", "torch"] = "auto"
    dali_device: Literal["auto", "cpu", "gpu"] = "auto"
    hw_decoder_load: float = 0.65            # share of JPEGs sent to the hardware decoder
    num_workers: int | None = None           # DALI threads / DataLoader workers; None: threads.py
    prefetch: int | None = None              # batches prepared ahead (DALI); None: 3 GPU, 2 CPU
    img_size: int | None = None              # None: the student's default input size
    crop_pct: float | None = None            # eval resize = img_size / crop_pct, then center crop
    interpolation: str | None = None
    mean: tuple[float, float, float] | None = None   # None: the student's pretrained_cfg
    std: tuple[float, float, float] | None = None
    scale: tuple[float, float] = (0.08, 1.0)          # RandomResizedCrop area range
    ratio: tuple[float, float] = (0.75, 4 / 3)        # RandomResizedCrop aspect range
    hflip: float = 0.5
    color_jitter: float = 0.0
    auto_augment: str | None = None          # e.g. rand-m9-mstd0.5-inc1
    reprob: float = 0.0                      # random erasing probability
    mixup: float = 0.0                       # mixup alpha (0: off)
    cutmix: float = 0.0                      # cutmix alpha (0: off)
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    label_smoothing: float = 0.0
    drop_last: bool = False


@dataclass(frozen=True)
class ModelConfig:
    name: str = "resnet18"                   # any timm model name
    pretrained: bool = False                 # timm's pretrained loading (needs network or cache)
    checkpoint: str | None = None            # initial student weights (local file)
    drop_rate: float | None = None
    drop_path_rate: float | None = None
    kwargs: dict = field(default_factory=dict)   # extra timm.create_model arguments


@dataclass(frozen=True)
class TeacherConfig:
    name: str | None = None                  # timm model name; None: no teacher
    checkpoint: str | None = None            # local weights (timm / torchvision / mmpretrain layouts)
    pretrained: bool = False
    use_ema: bool = False                    # load the checkpoint's EMA weights
    train_mode: bool = False                 # True: BN batch statistics, drop-path on (mmcls runners)
    kwargs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class DistillConfig:
    method: str = "none"                     # see `fastkd methods`
    gt_weight: float = 1.0                   # weight of the ground-truth cross-entropy
    params: dict = field(default_factory=dict)   # the method's own parameters (validated by it)


@dataclass(frozen=True)
class OptimConfig:
    opt: str = "sgd"                         # timm optimizer name (sgd, adamw, lamb, fusedadamw, ...)
    lr: float | None = None                  # None: lr_base * global_batch / lr_base_size
    lr_base: float = 0.1
    lr_base_size: int = 256
    weight_decay: float = 1e-4
    momentum: float = 0.9
    betas: tuple[float, float] | None = None
    eps: float | None = None
    layer_decay: float | None = None


@dataclass(frozen=True)
class SchedConfig:
    sched: str = "cosine"                    # timm scheduler: cosine, step, multistep, poly, tanh
    warmup_epochs: float = 0.0
    warmup_lr: float = 1e-6
    min_lr: float = 0.0
    decay_epochs: float = 30.0               # step schedule period
    decay_milestones: tuple[int, ...] = (30, 60, 90)   # multistep schedule
    decay_rate: float = 0.1
    step_on_epochs: bool = False             # False: the LR moves every update, not every epoch


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 1
    batch_size: int = 64                     # per process; global = batch_size * world size
    amp: Literal["bf16", "fp16", "fp32"] = "bf16"
    channels_last: bool = True
    clip_grad: float | None = None
    clip_mode: Literal["norm", "value", "agc"] = "norm"
    ema: bool = False
    ema_decay: float = 0.9998
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_nonfinite: int = 10                  # consecutive non-finite steps before the run stops
    max_steps_per_epoch: int | None = None   # cap for smoke runs and benchmarks
    log_interval: int = 50                   # steps between metric reads (each read syncs the GPU)
    eval_interval: int = 1                   # epochs between evaluations
    checkpoint_interval: int = 0             # steps between mid-epoch checkpoints (0: epoch ends only)
    compile: bool = False                    # torch.compile the student
    tf32: bool = True                        # TF32 matmuls/convolutions on a GPU; false: exact fp32
    cpu_threads: int | None = None           # torch threads; None: budget with the loader (threads.py)
    sync_bn: bool = False                    # SyncBatchNorm across GPUs (off by default, as timm)


@dataclass(frozen=True)
class CacheConfig:
    """The teacher cache (`fastkd cache build`); training replays it when `dir` is set."""
    dir: str | None = None                   # cache directory; None: the teacher runs online
    topk: int = 10                           # logits kept per sample (0: all, in `dtype`)
    dtype: Literal["fp16", "fp32"] = "fp16"  # full logits (topk: 0); top-k values are fp16
    epochs: int | None = None                # planned epochs stored; None: train.epochs
    shard_size: int = 8192                   # samples per file (one file per epoch and shard)
    batch_size: int | None = None            # precompute batch; None: largest that fits (GPU)


@dataclass(frozen=True)
class OutputConfig:
    dir: str = "runs"                        # parent of the run directories
    name: str | None = None                  # None: <method>-<student>-<timestamp>
    tensorboard: bool = True
    save_best: bool = True


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


# ---------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, strictly


def from_dict(cls: type, data: dict | None, path: str = "") -> Any:
    """Build dataclass `cls` from `data`, recursing into nested dataclasses.

    Raises ConfigError naming the dotted key for unknown keys (with the closest valid key) and
    for values of the wrong type.
    """
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise ConfigError(_unknown_key_message(f"{path}{key}", key, names, path))
    kwargs = {name: _coerce(data[name], hints[name], f"{path}{name}")
              for name in names if name in data}
    return cls(**kwargs)


def _unknown_key_message(dotted: str, key: str, names: list[str], path: str) -> str:
    close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
    hint = f"; did you mean '{path}{close[0]}'?" if close else ""
    return f"unknown config key '{dotted}'{hint} (valid keys here: {', '.join(names)})"


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against the annotation `hint`; return it in the annotated form."""
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, key + ".")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"{key}: {value!r} is not one of the allowed forms ({_describe(hint)})")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(map(str, args))}")
        return value
    if origin is tuple:
        return _coerce_tuple(value, args, key, hint)
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    return _coerce_scalar(value, hint, key)


def _coerce_tuple(value: Any, args: tuple, key: str, hint: Any) -> tuple:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key}: expected a list ({_describe(hint)}), got {value!r}")
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if len(value) != len(args):
        raise ConfigError(f"{key}: expected {len(args)} values ({_describe(hint)}), got {value!r}")
    return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))


_DECIMAL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _coerce_scalar(value: Any, hint: Any, key: str) -> Any:
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
        return float(value)   # YAML 1.1 reads 1e-3 (no dot in the mantissa) as a string
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: {value!r} is not a boolean (use true or false)")
    if hint is int and isinstance(value, bool):
        raise ConfigError(f"{key}: {value!r} is not an integer")
    if not isinstance(value, hint):
        raise ConfigError(f"{key}: {value!r} is not {_describe(hint)}")
    return value


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin is tuple:
        inner = ", ".join("..." if a is Ellipsis else _describe(a) for a in args)
        return f"a list [{inner}]"
    if hint is type(None):
        return "null"
    names = {float: "a number", int: "an integer", str: "a string", bool: "a boolean", dict: "a mapping"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


# ---------------------------------------------------------------------------------------------
# Files and overrides


def parse_overrides(overrides: list[str]) -> dict:
    """`["optim.lr=0.2", "data.scale=[0.35,1]"]` → nested dict; values parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key.sub=value")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override '{item}' has an empty key")
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' sets a key below the value of '{part}'")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return tree


def merge(base: dict, update: dict) -> dict:
    """Deep-merge `update` into a copy of `base` (dicts merge, everything else replaces)."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def check_values(cfg: Config) -> None:
    """What the types alone do not say: counts that must be positive, a RandAugment string
    that must parse, worker and thread counts that cannot be negative."""
    t = cfg.train
    counts = (("train.epochs", t.epochs, 1), ("train.batch_size", t.batch_size, 1),
              ("train.log_interval", t.log_interval, 1),
              ("train.eval_interval", t.eval_interval, 1),
              ("train.max_nonfinite", t.max_nonfinite, 1),
              ("train.checkpoint_interval", t.checkpoint_interval, 0),
              ("train.max_steps_per_epoch", t.max_steps_per_epoch, 1),
              ("train.cpu_threads", t.cpu_threads, 1),
              ("data.num_workers", cfg.data.num_workers, 0), ("data.prefetch", cfg.data.prefetch, 1))
    for key, value, least in counts:
        if value is not None and value < least:
            raise ConfigError(f"{key}: {value} is not allowed; it must be at least {least}")
    if cfg.data.auto_augment:
        from fastkd.pipelines.settings import parse_rand_augment
        try:
            parse_rand_augment(cfg.data.auto_augment)
        except ValueError as error:
            raise ConfigError(f"data.auto_augment: {error}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read YAML (optional), apply overrides, validate. Raises ConfigError on any problem."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
    data = merge(data, parse_overrides(overrides or []))
    cfg = from_dict(Config, data)
    check_values(cfg)
    return cfg


def config_to_dict(cfg: Any) -> dict:
    """Plain dict (lists instead of tuples) for YAML, checkpoints and logs."""
    def plain(value):
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value
    return plain(dataclasses.asdict(cfg))


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def replace(cfg: Config, **sections: dict) -> Config:
    """A copy of `cfg` with some fields of some sections changed: replace(cfg, train={'epochs': 3})."""
    merged = merge(config_to_dict(cfg), sections)
    return from_dict(Config, merged)
