"""Training checkpoints (`last.pt`, `best.pt`) and the student export (`student.safetensors`).

A checkpoint holds only tensors and primitive containers, so it loads with
`torch.load(weights_only=True)` (the PyTorch ≥ 2.6 default that breaks checkpoints pickling an
argparse Namespace): the distiller's state dict (student + the method's trainable parts; the
teacher is not a submodule and so is never in it), optimizer, scheduler, GradScaler and EMA
states, the position to resume from, the best metric, the config as a plain dict, and every
rank's RNG states converted to tensors and lists.

Files are written to a temporary name and `os.replace`d, so a run killed mid-write leaves the
previous `last.pt` intact.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from fastkd.compat import ema_rounding_state, restore_ema_rounding_state
from fastkd.config import Config, ConfigError, config_to_dict, from_dict, replace
from fastkd.weight_files import WeightFileError


CHECKPOINT_VERSION = 1
STUDENT_PREFIX = "student."     # the student's keys inside the distiller's state dict
EMA_PREFIX = "module."          # the student's keys inside ModelEmaV3's state dict
LAST, BEST, PREVIOUS = "last.pt", "best.pt", "previous.pt"
STUDENT_WEIGHTS, STUDENT_INFO, TIMM_DIR = "student.safetensors", "student.json", "timm"


@dataclass
class TrainPosition:
    """Where training stands. `epoch` is 1-based; `batch` batches of it are done (0: the epoch
    has not started). `global_step` counts train steps (skipped ones included) and drives the
    per-update LR schedule and the EMA warm-up, so it is a pure function of the position."""
    epoch: int = 1
    batch: int = 0
    global_step: int = 0
    best_top1: float | None = None
    best_epoch: int | None = None


# ------------------------------------------------------------------------------ RNG states


def capture_rng_state() -> dict:
    """Python, numpy, torch CPU and CUDA generator states as tensors / lists / ints.

    CUDA: the generator of this process's device only (`init_world` made it the current one).
    Every visible GPU's state would be restored onto device indices that need not exist when
    the run resumes with fewer GPUs visible (`CUDA_VISIBLE_DEVICES`), and the other GPUs'
    generators are not this rank's to restore."""
    version, mt_state, gauss = random.getstate()
    kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [version, list(mt_state), gauss],
        "numpy": [kind, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss),
                  float(np_gauss)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }
    return state


def restore_rng_state(state: dict) -> None:
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ------------------------------------------------------------------------------ checkpoints


def atomic_save(obj, path: str | Path, *, keep_previous: bool = False) -> None:
    """`torch.save` to `path.tmp`, then `os.replace`: readers never see a half-written file.

    `path.sha256` lists the checksums `load_checkpoint` accepts: written before the replace,
    it holds the new file's and the current one's, so a kill at any point leaves a file that
    matches it, while a file damaged on disk matches neither. `keep_previous` first keeps the
    current file as `previous.pt` (a hard link), the fallback when the newest is unreadable."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        current = _accepted_sums(path)[:1] if path.exists() else []
        if keep_previous and path.exists():
            _keep_previous(path, current)
        _write_sums(path, [sha256_file(tmp), *current])
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)   # no half-written file left next to the good one
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            intact = f"{path} from before is intact" if path.exists() else "nothing was lost"
            raise DiskFull(f"the disk is full: {path} could not be written ({intact}); free "
                           f"space and resume with `fastkd train --resume {path.parent}`") from None
        raise


class DiskFull(OSError):
    """A checkpoint could not be written for lack of space (exit 2, one message)."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _sums_file(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _accepted_sums(path: Path) -> list[str]:
    try:
        return _sums_file(path).read_text().split()
    except OSError:
        return []


def _write_sums(path: Path, sums: list[str]) -> None:
    tmp = path.with_name(path.name + ".sha256.tmp")
    tmp.write_text("\n".join(sums) + "\n")
    os.replace(tmp, _sums_file(path))


def _keep_previous(path: Path, sums: list[str]) -> None:
    previous = path.with_name(PREVIOUS)
    link = previous.with_name(PREVIOUS + ".tmp")
    link.unlink(missing_ok=True)
    try:
        os.link(path, link)
    except OSError:                     # no hard links here: a copy
        shutil.copyfile(path, link)
    _write_sums(previous, sums)
    os.replace(link, previous)


def make_checkpoint(*, distiller: nn.Module, optimizer, scheduler, scaler, ema,
                    position: TrainPosition, config: dict, rng_states: list[dict],
                    epoch_meters: dict[str, Tensor], student_info: dict,
                    steps_per_epoch: int = 0, rank_states: list[dict] | None = None) -> dict:
    """The checkpoint dict. `distiller` must be the unwrapped module (no DDP `module.` prefix);
    `rng_states` holds one entry per rank (so its length is the world size that wrote it).

    `rank_states` (one `rank_state` per rank) keeps what differs between ranks in the middle
    of an epoch besides the RNG: each rank's running loss sums, and the EMA's BatchNorm
    statistics, which each rank updates from its own batches (DDP broadcasts the student's
    buffers, not the EMA's, which lives outside DDP) until the epoch end averages them.
    `epoch_meters` and `ema` are rank 0's."""
    return {
        "version": CHECKPOINT_VERSION,
        "distiller": distiller.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "ema": ema.state_dict() if ema is not None else None,
        # ModelEmaV3 rounds bf16 EMA weights stochastically with a private generator
        "ema_rounding_rng": ema_rounding_state(ema) if ema is not None else None,
        "position": asdict(position),
        "config": config,
        "rng": rng_states,
        "epoch_meters": {name: value.detach().cpu() for name, value in epoch_meters.items()},
        "student_info": student_info,
        "steps_per_epoch": steps_per_epoch,
        "ranks": rank_states,
    }


def rank_state(epoch_meters: dict[str, Tensor], ema) -> dict:
    """What one rank alone holds mid-epoch (see `make_checkpoint`), on the CPU."""
    buffers = {} if ema is None else {
        name: buffer.detach().cpu().clone() for name, buffer in ema.module.named_buffers()
        if buffer.is_floating_point()}
    return {"epoch_meters": {name: value.detach().cpu() for name, value in epoch_meters.items()},
            "ema_buffers": buffers,
            "ema_rounding_rng": ema_rounding_state(ema) if ema is not None else None}


def restore_rank_state(checkpoint: dict, rank: int, ema) -> dict[str, Tensor]:
    """Put back this rank's EMA buffers (and EMA rounding generator); return its loss sums.
    A checkpoint without per-rank states (written before they were kept) gives rank 0's."""
    states = checkpoint.get("ranks")
    if not states:
        return checkpoint["epoch_meters"]
    mine = states[rank]
    if ema is not None:
        for name, buffer in ema.module.named_buffers():
            if name in mine["ema_buffers"]:
                buffer.copy_(mine["ema_buffers"][name])
        restore_ema_rounding_state(ema, mine["ema_rounding_rng"])
    return mine["epoch_meters"]


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint on the CPU with `weights_only=True`, after checking it against the
    checksums written with it; a damaged or unreadable file is a `WeightFileError` that names
    the checkpoints to fall back on."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}{_fallbacks(path)}")
    sums = _accepted_sums(path)
    if sums and sha256_file(path) not in sums:
        raise WeightFileError(f"{path} is damaged: its checksum differs from the one written "
                              f"with it{_fallbacks(path)}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, ValueError) as error:
        raise WeightFileError(f"{path} cannot be read as a checkpoint ({str(error)[:200]})"
                              f"{_fallbacks(path)}") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("version") != CHECKPOINT_VERSION:
        raise WeightFileError(f"{path} is not a fastkd checkpoint (version {CHECKPOINT_VERSION})")
    return checkpoint


def _fallbacks(path: Path) -> str:
    """The other checkpoints of the run directory, for an error message."""
    others = [path.with_name(n) for n in (PREVIOUS, BEST) if path.with_name(n) != path]
    found = [str(p) for p in others if p.is_file()]
    if not found:
        return ""
    return (f"; the run also has {' and '.join(found)}: copy one over {path.name} to resume "
            f"from it (`fastkd eval`/`export` take --checkpoint PATH)")


def check_finite_weights(checkpoint: dict, path: str | Path) -> None:
    """Refuse to resume from weights that are already NaN or infinite."""
    bad = [k for k, v in checkpoint["distiller"].items()
           if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise WeightFileError(f"{path} holds non-finite weights ({', '.join(bad[:3])}"
                              f"{' ...' if len(bad) > 3 else ''}){_fallbacks(Path(path))}")


def restore_training_state(checkpoint: dict, *, distiller: nn.Module, optimizer, scaler,
                           ema) -> TrainPosition:
    """Load every stateful object from `checkpoint` (strict); return the saved position.

    The scheduler's saved state is not loaded on purpose: a timm scheduler holds only its
    configuration (the caller passes the step count), so the one rebuilt from the config is
    the same, and after a resume with a longer `train.epochs` it is the longer schedule that
    must apply, not the saved one. The state stays in the checkpoint for inspection."""
    distiller.load_state_dict(checkpoint["distiller"], strict=True)
    optimizer.load_state_dict(checkpoint["optimizer"])
    if scaler is not None and checkpoint["scaler"] is not None:
        scaler.load_state_dict(checkpoint["scaler"])
    if ema is not None:
        if checkpoint["ema"] is None:
            raise WeightFileError("train.ema is on but the checkpoint has no EMA weights")
        ema.load_state_dict(checkpoint["ema"], strict=True)
        restore_ema_rounding_state(ema, checkpoint["ema_rounding_rng"])
    return TrainPosition(**checkpoint["position"])


# ---------------------------------------------------------------------------- resume config

# Keys that may change when resuming: they change neither the meaning of the saved state nor
# the data each step sees. Everything else (model, method, optimizer, batch size, schedule
# shape, augmentation, seed, AMP...) would silently train a different run than the one the
# checkpoint belongs to. `train.epochs` is allowed on purpose (extend a run); the LR schedule
# is then rebuilt for the new length. output.dir/name are ignored: the run directory is given.
RESUMABLE_KEYS = frozenset({
    "train.epochs", "train.log_interval", "train.eval_interval", "train.checkpoint_interval",
    "train.max_nonfinite", "data.root", "data.num_workers", "output.tensorboard",
    "output.save_best",
})
_IGNORED_ON_RESUME = frozenset({"output.dir", "output.name"})


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key not in ("kwargs", "params"):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def resume_config(saved: dict, requested: Config) -> Config:
    """The config to resume with: `requested` when it differs from the checkpoint's `saved`
    config only in RESUMABLE_KEYS (output.dir/name taken from `saved`), else a ConfigError
    naming every offending key."""
    old, new = _flatten(saved), _flatten(config_to_dict(requested))
    changed = sorted(k for k in old.keys() | new.keys()
                     if old.get(k) != new.get(k) and k not in _IGNORED_ON_RESUME)
    refused = [k for k in changed if k not in RESUMABLE_KEYS]
    if refused:
        details = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in refused)
        raise ConfigError(f"cannot resume with a different {', '.join(refused)} ({details}). "
                          f"Only {', '.join(sorted(RESUMABLE_KEYS))} may change on resume; start "
                          f"a new run for anything else")
    merged = config_to_dict(requested)
    merged["output"].update(dir=saved["output"]["dir"], name=saved["output"]["name"])
    return from_dict(Config, merged)


def keep_global_batch(cfg: Config, checkpoint: dict, world_size: int) -> Config:
    """`cfg` with the per-process batch that keeps the checkpoint's global batch on
    `world_size` processes: a run resumed on another world size continues with the global
    batch, and so the steps per epoch and the LR (`optim.lr`, or the linear rule of the same
    global batch), it records. A global batch that does not split evenly is a ConfigError."""
    saved_world = len(checkpoint["rng"])
    if saved_world == world_size:
        return cfg
    global_batch = checkpoint["config"]["train"]["batch_size"] * saved_world
    if global_batch % world_size:
        splits = [n for n in range(1, global_batch + 1) if global_batch % n == 0]
        raise ConfigError(f"this run's global batch of {global_batch} (recorded on {saved_world} "
                          f"process(es)) cannot be split over {world_size} processes; resume it "
                          f"on {', '.join(map(str, splits))} processes")
    return replace(cfg, train={"batch_size": global_batch // world_size})


# ----------------------------------------------------------------------------- student export


def student_state_dict(checkpoint: dict, *, ema: bool = False) -> dict[str, Tensor]:
    """The student's own state dict (timm key names) from a checkpoint: the trained weights, or
    with `ema` the EMA weights (an error when the run had no EMA)."""
    if ema:
        if checkpoint.get("ema") is None:
            raise ConfigError("--ema: this checkpoint has no EMA weights (the run had train.ema: false)")
        source, prefix = checkpoint["ema"], EMA_PREFIX
    else:
        source, prefix = checkpoint["distiller"], STUDENT_PREFIX
    return {key[len(prefix):]: value for key, value in source.items() if key.startswith(prefix)}


def export_student(checkpoint_path: str | Path, out_dir: str | Path, *, ema: bool = False) -> Path:
    """Write `student.safetensors` (loads strictly into `timm.create_model(name,
    num_classes=K, **kwargs)`) and `student.json` (timm name, num_classes, model kwargs, the
    data config it was trained with) into `out_dir`; returns the weights' path."""
    from safetensors.torch import save_file

    checkpoint = load_checkpoint(checkpoint_path)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in
             student_state_dict(checkpoint, ema=ema).items()}
    out_dir = Path(out_dir)
    info = dict(checkpoint["student_info"], weights="ema" if ema else "student",
                source=Path(checkpoint_path).name,
                epochs_completed=checkpoint["position"]["epoch"] - 1,
                batches_into_next_epoch=checkpoint["position"]["batch"])
    weights = out_dir / STUDENT_WEIGHTS
    tmp = out_dir / (STUDENT_WEIGHTS + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt", "architecture": info["architecture"]})
    os.chmod(tmp, 0o644)   # safetensors creates it owner-only; a model file is meant to be shared
    os.replace(tmp, weights)
    (out_dir / STUDENT_INFO).write_text(json.dumps(info, indent=2) + "\n")
    export_for_timm(state, info, out_dir / TIMM_DIR)
    return weights


def export_for_timm(state: dict[str, Tensor], info: dict, directory: Path) -> Path:
    """The student in timm's own layout (`config.json` + `model.safetensors`, written by
    `timm.models.save_for_hf`, with the model arguments and the data config it was trained
    with), which `timm.create_model("local-dir:DIR", pretrained=True)` loads as it is;
    `student.json` beside it says where it came from."""
    import timm
    from timm.models import save_for_hf
    kwargs = dict(info.get("model_kwargs") or {})
    model = timm.create_model(info["architecture"], num_classes=info["num_classes"], **kwargs)
    model.load_state_dict(state, strict=True)
    data_config = {key: info[key] for key in ("input_size", "mean", "std", "crop_pct",
                                              "interpolation") if key in info}
    directory.mkdir(parents=True, exist_ok=True)
    save_for_hf(model, str(directory), model_args=kwargs,
                safe_serialization=True, data_config=data_config)
    (directory / STUDENT_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return directory
