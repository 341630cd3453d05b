"""The run directory and what a run reports: files, summary.csv, TensorBoard, progress lines.

Layout of `output.dir/<name>` (name default `<method>-<student>-<YYYYmmdd-HHMMSS>`):

    config.yaml          the effective config (a valid config: `fastkd train` reproduces the run)
    env.json             versions, device, world size, global batch, LR rule, git SHA
    summary.csv          one row per epoch (timm's habit): epoch, loss terms, train_loss,
                         eval_top1/top5, ema_top1/top5, lr, img_per_sec, data_wait, epoch_seconds
    log.txt              the progress lines
    .lock                held (flock) by the run writing here: host and pid
    tensorboard/         event files (when output.tensorboard)
    last.pt, best.pt     training checkpoints (fastkd.checkpoint)
    student.safetensors  the student alone, loadable by timm; student.json describes it

Only rank 0 writes; on other ranks every method is a no-op, so callers need no rank checks.
"""
from __future__ import annotations

import csv
import datetime as _dt
import fcntl
import json
import logging
import os
import platform
import subprocess
import sys
import warnings
from pathlib import Path

import torch

from fastkd.checkpoint import (LAST, check_finite_weights, keep_global_batch, load_checkpoint,
                               resume_config)
from fastkd.config import Config, ConfigError, dump_config, replace
from fastkd.distributed import World, all_reduce_, broadcast_object

logger = logging.getLogger(__name__)

CONFIG_FILE, ENV_FILE, SUMMARY_FILE, LOG_FILE, TB_DIR, LOCK_FILE = (
    "config.yaml", "env.json", "summary.csv", "log.txt", "tensorboard", ".lock")


def default_run_name(cfg: Config) -> str:
    """`<method>-<student>-<YYYYmmdd-HHMMSS>`, with `-2`, `-3`... when runs start in the same
    second (a sweep launching several runs at once)."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = base = f"{cfg.distill.method}-{cfg.model.name}-{stamp}"
    count = 1
    while (Path(cfg.output.dir) / name).exists():
        count += 1
        name = f"{base}-{count}"
    return name


class RunDir:
    """Files of one run. `writer=False` (ranks > 0) turns every write into a no-op."""

    def __init__(self, path: str | Path, *, writer: bool = True):
        self.path = Path(path)
        self.writer = writer
        self._tensorboard = None
        self._lock = None

    def file(self, name: str) -> Path:
        return self.path / name

    # ------------------------------------------------------------------ setting up

    def check_free(self) -> None:
        """A new run must not land on an existing one (checked before any work)."""
        if self.file(LAST).exists():
            raise ConfigError(f"{self.path} already holds a run (last.pt); resume it with "
                              f"`fastkd train --resume {self.path}` or set another output.name")

    def begin(self, cfg: Config, checkpoint: dict | None) -> None:
        """Called once the run is built (so a start-up error leaves no directory behind):
        create the directory, drop summary rows after a resumed checkpoint (a run killed
        between its summary row and its checkpoint redoes that epoch), write config.yaml."""
        if not self.writer:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        self.lock()
        if checkpoint is None:
            self.check_free()
        else:
            self.truncate_summary(checkpoint["position"]["epoch"] - 1)
        self.write_config(cfg)

    def lock(self) -> None:
        """Hold an exclusive lock on the directory for the life of the run, so two runs never
        interleave their files. The kernel drops an `flock` when its process dies, so a lock
        file left by a killed run is taken over (with a warning naming it); a live holder
        makes this run stop with exit 2, naming host and pid. (`flock` is per host: on a
        shared file system it does not see a run on another machine.)"""
        handle = open(self.file(LOCK_FILE), "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise ConfigError(f"{self.path} is in use by a running fastkd ({holder}); wait for "
                              f"it, or set another output.name") from None
        handle.seek(0)
        previous = handle.read().strip()
        if previous:
            warnings.warn(f"{self.path}: taking over the lock of a run that is no longer "
                          f"running ({previous})", stacklevel=2)
        handle.seek(0)
        handle.truncate()
        handle.write(f"host {platform.node()}, pid {os.getpid()}, since "
                     f"{_dt.datetime.now().astimezone().isoformat(timespec='seconds')}\n")
        handle.flush()
        self._lock = handle

    def write_config(self, cfg: Config) -> None:
        if self.writer:
            dump_config(cfg, self.file(CONFIG_FILE))

    def write_env(self, env: dict, *, resumed_at: dict | None = None) -> None:
        """env.json for a new run; a resume appends its own record under "resumes"."""
        if not self.writer:
            return
        path = self.file(ENV_FILE)
        if resumed_at is not None and path.exists():
            record = json.loads(path.read_text())
            record.setdefault("resumes", []).append({**env, "resumed_at": resumed_at})
            env = record
        path.write_text(json.dumps(env, indent=2) + "\n")

    # ------------------------------------------------------------------ summary.csv

    def read_summary(self) -> list[dict[str, str]]:
        path = self.file(SUMMARY_FILE)
        if not path.exists():
            return []
        with open(path, newline="") as handle:
            return list(csv.DictReader(handle))

    def append_summary(self, row: dict) -> None:
        """Append one epoch row. A new column (a loss term first seen, eval columns on the
        first eval epoch) rewrites the file with the wider header; the file is small."""
        if not self.writer:
            return
        rows = self.read_summary()
        columns = list(rows[0].keys()) if rows else []
        columns += [key for key in row if key not in columns]
        self._write_summary(columns, rows + [{k: _csv_value(v) for k, v in row.items()}])

    def truncate_summary(self, last_epoch: int) -> None:
        """Drop rows after `last_epoch`: a run killed between its summary row and its checkpoint
        redoes that epoch on resume, and must not list it twice."""
        if not self.writer:
            return
        rows = self.read_summary()
        kept = [row for row in rows if int(row["epoch"]) <= last_epoch]
        if rows and len(kept) != len(rows):
            self._write_summary(list(rows[0].keys()), kept)

    def _write_summary(self, columns: list[str], rows: list[dict]) -> None:
        tmp = self.file(SUMMARY_FILE + ".tmp")
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, restval="")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.file(SUMMARY_FILE))

    # ------------------------------------------------------------------ logs

    def log(self, line: str) -> None:
        """A progress line: the `fastkd` logger (stdout under the CLI) and log.txt."""
        if not self.writer:
            return
        logger.info(line)
        with open(self.file(LOG_FILE), "a") as handle:
            handle.write(line + "\n")

    def open_tensorboard(self, purge_step: int | None = None) -> None:
        """Start the TensorBoard writer; on resume `purge_step` drops events the killed run
        wrote after its checkpoint."""
        if self.writer:
            from torch.utils.tensorboard import SummaryWriter
            self._tensorboard = SummaryWriter(str(self.file(TB_DIR)), purge_step=purge_step)

    def add_scalars(self, step: int, values: dict[str, float], prefix: str = "") -> None:
        """TensorBoard scalars `prefix + name` at `step` (nothing when TensorBoard is off)."""
        if self._tensorboard is not None:
            for name, value in values.items():
                if value is not None:
                    self._tensorboard.add_scalar(prefix + name, value, step)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._lock is not None:     # empty file, unlocked: the run ended cleanly
            self._lock.truncate(0)
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None


def open_run(cfg: Config, resume: str | Path | None, world: World
             ) -> tuple[Config, RunDir, dict | None]:
    """A new run directory, or the one being resumed with its last checkpoint; reads only
    (`RunDir.begin` writes, once the run is built).

    New: `output.dir/<output.name or default name>` (rank 0 picks the timestamped name and
    broadcasts it), the name filled into the config. Resume: `resume/last.pt` loaded
    (weights_only) and the config checked against the checkpoint's (`resume_config`).
    """
    if resume is None and elastic_launch() is not None:
        restarts = group_restart_count(world)
        resume = broadcast_object(restarted_run(cfg, restarts) if world.is_primary else None, world)
    if resume is None:
        name = broadcast_object(cfg.output.name or default_run_name(cfg), world)
        cfg = replace(cfg, output={"name": name})
        run_dir = RunDir(Path(cfg.output.dir) / name, writer=world.is_primary)
        run_dir.check_free()
        return cfg, run_dir, None
    path = Path(resume)
    if not (path / LAST).is_file():
        raise ConfigError(f"--resume {path}: no {LAST} there (not a fastkd run directory, or "
                          f"the run was stopped before its first checkpoint)")
    checkpoint = load_checkpoint(path / LAST)
    check_finite_weights(checkpoint, path / LAST)
    cfg = keep_global_batch(resume_config(checkpoint["config"], cfg), checkpoint, world.world_size)
    return cfg, RunDir(path, writer=world.is_primary), checkpoint


def elastic_launch() -> dict | None:
    """torchrun's rendezvous id and restart count, when torchrun started this process."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    return {"run_id": os.environ["TORCHELASTIC_RUN_ID"],
            "restart_count": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))}


def group_restart_count(world: World) -> int:
    """How often torchrun restarted this worker group. Each node's agent counts only the
    restarts its own workers' failures caused (a node whose workers were only stopped for a
    failure elsewhere still says 0), so the group's count is the largest of its ranks'."""
    count = torch.tensor([elastic_launch()["restart_count"]], device=world.device)
    return int(all_reduce_(count, world, op="max").item())


def restarted_run(cfg: Config, restart_count: int) -> str | None:
    """The run that a worker group restarted by torchrun (`--max-restarts`) continues.

    torchrun runs the same command line again after a failure, so without this a restart
    would start over (or be refused: its output.name is taken). It is `output.dir/output.name`
    when the name is set, else the newest run whose env.json records this launch's rendezvous
    id (`--rdzv-id`; `--standalone` makes one per launch); None on a first start, or when the
    failure came before the first checkpoint."""
    launch = elastic_launch()
    if launch is None or restart_count == 0:
        return None
    base = Path(cfg.output.dir)
    if cfg.output.name:
        candidates = [base / cfg.output.name]
    elif launch["run_id"] != "none" and base.is_dir():   # "none": torchrun's default id
        candidates = [run for run in base.iterdir()
                      if _recorded_launch_id(run / ENV_FILE) == launch["run_id"]]
    else:
        candidates = []
    resumable = [run for run in candidates if (run / LAST).is_file()]
    if not resumable:
        return None
    run = max(resumable, key=lambda path: (path / LAST).stat().st_mtime)
    logger.warning(f"torchrun restart {restart_count}: resuming {run} from its {LAST}")
    return str(run)


def _recorded_launch_id(env_file: Path) -> str | None:
    try:
        return (json.loads(env_file.read_text()).get("launch") or {}).get("run_id")
    except (OSError, ValueError):
        return None


def _csv_value(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)   # full precision: resumed and uninterrupted runs compare exactly
    return value


# ---------------------------------------------------------------------- environment record


def git_sha() -> str | None:
    """The commit of the fastkd source tree, when it is a git checkout."""
    source = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def _version(module: str) -> str | None:
    try:
        return __import__(module, fromlist=["__version__"]).__version__
    except ImportError:
        return None


def software_record(device: torch.device) -> dict:
    """The device and the library versions a figure or a run depends on; shared by env.json
    and the benchmark reports."""
    import fastkd
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {"fastkd": fastkd.__version__, "git_sha": git_sha(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "timm": _version("timm"),
            "triton": _version("triton"), "dali": _version("nvidia.dali"), "device": device_name,
            "host": platform.node()}


def environment_record(*, device: torch.device, world_size: int, global_batch: int,
                       lr: float, lr_rule: str, loader: str) -> dict:
    """What a result depends on beyond the config (global batch, world size and versions are
    the first suspects when a number does not reproduce)."""
    return {
        **software_record(device),
        "world_size": world_size,
        "global_batch": global_batch,
        "loader": loader,
        "lr": lr,
        "lr_rule": lr_rule,
        "metric": "top-1/top-5 (%) over every validation image once (padding excluded, "
                  "counts summed over ranks); best.pt by the student's top-1",
        "command": " ".join(sys.argv),
        "launch": elastic_launch(),
        "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
