"""The training loop: `train(cfg)` and `evaluate_config(cfg)`, the public Python API.

One step: forward through the distiller (student + method; the teacher is called inside it),
the named loss terms summed, one tiny all-reduce that makes every rank agree on "all terms
finite" (a device tensor, `fastkd.step_guard`), then backward, clipping, optimizer, EMA and
scheduler, each skipping a bad step on the device.

No device value is read to the host on a step that does not log: loss sums, skipped-step
counts and the non-finite streak stay on the device and are read every `train.log_interval`
steps and at the end of an epoch, where a stop request (SIGTERM) is also agreed on and acted
on. (Exceptions, each documented where it happens: `train.amp: fp16`, whose GradScaler
contract reads the verdict, and optimizers that cannot take GradScaler's `found_inf`.)

Resume is exact on a fixed seed: the data order and crops are pure functions of
(seed, epoch, index), the LR schedule and EMA warm-up are functions of the step counter, and
the checkpoint carries every rank's RNG states, restored at the very point they were captured.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from timm.utils import dispatch_clip_grad
from torch import Tensor, nn

from fastkd.build import (AMP_DTYPES, TrainingSetup, build_evaluation, build_training,
                          check_runnable)
from fastkd.checkpoint import (BEST, LAST, TrainPosition, atomic_save, capture_rng_state,
                               export_student, make_checkpoint, rank_state, restore_rank_state,
                               restore_rng_state, restore_training_state)
from fastkd.config import Config, ConfigError, config_to_dict
from fastkd.distributed import (World, all_gather_objects, all_reduce_, average_buffers_,
                                barrier, init_world, shutdown_world)
from fastkd.meters import LossSums, Progress, Throughput, format_metrics
from fastkd.process import StopRequest, seed_everything
from fastkd.rundir import RunDir, environment_record, open_run
from fastkd.step_guard import StepGuard, ema_update_, optimizer_step


class NonFiniteLoss(RuntimeError):
    """`train.max_nonfinite` consecutive steps had a NaN/inf loss term; the run stops."""


@dataclass
class RunResult:
    """What `train` returns; `student` is the trained (bare) timm model."""
    run_dir: Path
    model_name: str
    metrics: dict[str, float]          # the last epoch's summary row
    final_top1: float | None
    best_top1: float | None
    img_per_sec: float
    student: nn.Module | None = None
    preempted: bool = False            # stopped by SIGTERM after writing last.pt
    warning: str | None = None         # e.g. most steps were skipped for non-finite losses


# ------------------------------------------------------------------------------ small state


@dataclass
class RunState:
    """The loop's mutable state: position, running epoch meters, clocks, and RNG states
    waiting to be restored at the point where the interrupted run captured them."""
    run_dir: RunDir
    position: TrainPosition
    epoch_sums: LossSums
    epoch_clock: Throughput | None = None
    pending_rng: dict | None = None
    guard: StepGuard = field(default_factory=StepGuard)
    train_seconds: float = 0.0
    samples: int = 0
    skipped: int = 0                   # steps skipped for a non-finite loss, this process's run

    def restore_rng_if_pending(self, *, before_iterator: bool) -> None:
        """An epoch-end checkpoint captured the RNG before the next epoch's loader iterator
        existed; a mid-epoch one after (creating a DataLoader iterator draws from the global
        generator). Restoring at the same point keeps the two runs' RNG streams identical."""
        at_epoch_start = self.position.batch == 0
        if self.pending_rng is not None and at_epoch_start == before_iterator:
            restore_rng_state(self.pending_rng)
            self.pending_rng = None


def start_state(setup: TrainingSetup, run_dir: RunDir, checkpoint: dict | None) -> RunState:
    """Restore from the checkpoint (if any), record env.json, set the LR for the position."""
    cfg, world = setup.cfg, setup.world
    position, meters, rng = TrainPosition(), {}, None
    if checkpoint is not None:
        position, meters, rng = resume_training(setup, checkpoint)
    state = RunState(run_dir=run_dir, position=position,
                     epoch_sums=LossSums.from_state(meters, world.device), pending_rng=rng)
    env = environment_record(device=world.device, world_size=world.world_size,
                             global_batch=cfg.train.batch_size * world.world_size, lr=setup.lr,
                             lr_rule=setup.lr_rule, loader=setup.train_loader.kind)
    if setup.teacher is not None:
        env["teacher"] = {"name": cfg.teacher.name, "source": setup.teacher_source}
    env["threads"] = setup.threads.record()
    run_dir.write_env(env, resumed_at=None if checkpoint is None else
                      {"epoch": position.epoch, "batch": position.batch})
    if cfg.output.tensorboard:
        run_dir.open_tensorboard(purge_step=position.global_step if checkpoint else None)
    if setup.scheduler is not None:   # the LR of the position (both calls: one is a no-op)
        setup.scheduler.step(position.epoch - 1)
        setup.scheduler.step_update(num_updates=position.global_step)
    student = sum(p.numel() for p in setup.distiller.student.parameters())
    teacher = "-" if setup.teacher is None else cfg.teacher.name
    if setup.teacher is not None and setup.teacher_source != "online":
        teacher += f" from the {setup.teacher_source}"
    where = ("from scratch" if checkpoint is None
             else f"resumed at epoch {position.epoch}, batch {position.batch}"
                  f"{_world_change(checkpoint, cfg, world)}")
    run_dir.log(f"run {run_dir.path} ({where}): {cfg.distill.method}, student {cfg.model.name} "
                f"({student / 1e6:.2f}M params, method parts "
                f"{setup.distiller.extra_parameter_count() / 1e6:.2f}M), teacher "
                f"{teacher}; {world.world_size} "
                f"process(es) on {world.device}, global batch {cfg.train.batch_size * world.world_size}, "
                f"{setup.steps_per_epoch} steps/epoch, {setup.train_loader.kind} loader, "
                f"{setup.threads.describe()}; "
                f"lr {setup.lr_rule}")
    return state


def _world_change(checkpoint: dict, cfg: Config, world: World) -> str:
    """How a resume on another world size keeps the run's global batch (empty: same world)."""
    saved_world = len(checkpoint["rng"])
    if saved_world == world.world_size:
        return ""
    saved_batch = checkpoint["config"]["train"]["batch_size"]
    return (f" on {world.world_size} process(es) instead of {saved_world}: per-process batch "
            f"{saved_batch} -> {cfg.train.batch_size}, so the global batch "
            f"{saved_batch * saved_world}, the steps per epoch and the LR stay the run's")


def save_training_checkpoint(setup: TrainingSetup, run_path: Path, position: TrainPosition,
                             epoch_meters: dict[str, Tensor], *, also: str | None = None) -> None:
    """Write `last.pt` (and `also`, e.g. best.pt). Every rank must call it: the RNG states and
    the per-rank states of all ranks are gathered; rank 0 writes."""
    gathered = all_gather_objects((capture_rng_state(), rank_state(epoch_meters, setup.ema)),
                                  setup.world)
    if not setup.world.is_primary:
        return
    checkpoint = make_checkpoint(
        distiller=setup.distiller, optimizer=setup.optimizer, scheduler=setup.scheduler,
        scaler=setup.scaler, ema=setup.ema, position=position,
        config=config_to_dict(setup.cfg), rng_states=[rng for rng, _ in gathered],
        epoch_meters=epoch_meters, student_info=setup.student_info,
        steps_per_epoch=setup.steps_per_epoch, rank_states=[state for _, state in gathered])
    for name in (LAST, also) if also else (LAST,):
        atomic_save(checkpoint, run_path / name, keep_previous=name == LAST)


def resume_training(setup: TrainingSetup, checkpoint: dict
                    ) -> tuple[TrainPosition, dict[str, Tensor], dict | None]:
    """Restore every stateful object; returns the position, this rank's running epoch meters
    and its RNG states.

    Another world size is accepted at an epoch boundary only (`fastkd.checkpoint.
    keep_global_batch` has already set the per-process batch that keeps the recorded global
    batch, so the steps per epoch and the LR are the run's own). The sample order is then
    exact (`pipelines.sampling`: a global batch holds the same samples on any world size);
    the RNG states are not restored (fresh per-rank seeds: dropout masks differ, data does
    not), and BatchNorm sees per-process batches of another size."""
    rng_states = checkpoint["rng"]
    same_world = len(rng_states) == setup.world.world_size
    if not same_world and checkpoint["position"]["batch"] > 0:
        raise ConfigError(
            f"this mid-epoch checkpoint was written by {len(rng_states)} process(es); resume it "
            f"with the same number of processes (this run: {setup.world.world_size}), or from "
            f"an epoch-end checkpoint")
    position = restore_training_state(checkpoint, distiller=setup.distiller,
                                      optimizer=setup.optimizer, scaler=setup.scaler, ema=setup.ema)
    if same_world:
        meters = restore_rank_state(checkpoint, setup.world.rank, setup.ema)
        return position, meters, rng_states[setup.world.rank]
    position.global_step = (position.epoch - 1) * setup.steps_per_epoch
    return position, {}, None   # an epoch boundary: no running sums


def save_state(setup: TrainingSetup, state: RunState, *, also: str | None = None) -> None:
    save_training_checkpoint(setup, state.run_dir.path, state.position, state.epoch_sums.state(),
                             also=also)


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The largest group LR (layer decay scales the others down)."""
    return max(group["lr"] for group in optimizer.param_groups)


# ------------------------------------------------------------------------------ one epoch


def _update(setup: TrainingSetup, loss: Tensor, ok: Tensor, params: list[nn.Parameter],
            global_step: int) -> None:
    """Backward, clipping, optimizer step, EMA; a step with `ok` = 0 changes nothing."""
    cfg, optimizer, scaler = setup.cfg, setup.optimizer, setup.scaler
    if scaler is not None and not bool(ok):   # fp16: GradScaler's contract reads the verdict
        optimizer.zero_grad(set_to_none=True)
        return
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if cfg.train.clip_grad is not None:
        if scaler is not None:
            scaler.unscale_(optimizer)   # clip true gradients, not scaled ones
        dispatch_clip_grad(params, cfg.train.clip_grad, mode=cfg.train.clip_mode)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer_step(optimizer, ok)
    optimizer.zero_grad(set_to_none=True)
    if setup.ema is not None:
        ema_update_(setup.ema, setup.distiller.student, global_step, ok)


def train_step(setup: TrainingSetup, state: RunState, batch, params: list[nn.Parameter]
               ) -> tuple[dict[str, Tensor], Tensor]:
    """Forward, agree, update. Returns the step's loss terms and `ok` (a device tensor, 0.0
    when a term was not finite on some rank: the step then changed nothing)."""
    images, labels, indices = batch
    world, position, amp = setup.world, state.position, setup.amp_dtype
    fraction = position.epoch + position.batch / setup.steps_per_epoch   # 1-based, fractional
    with torch.autocast(world.device.type, dtype=amp, enabled=amp is not None):
        _, terms = setup.model(images, labels, epoch=fraction, indices=indices)
    if not terms:
        raise ConfigError(f"method '{setup.cfg.distill.method}' returned no loss terms "
                          f"(distill.gt_weight: 0 with a method that has no loss of its own?)")
    values = torch.stack([t.float() for t in terms.values()])   # one stack: checked, summed
    ok = state.guard.check(values, world)
    position.global_step += 1
    _update(setup, values.sum(), ok, params, position.global_step)
    return terms, ok


def _check_nonfinite(setup: TrainingSetup, state: RunState, names: list[str]) -> None:
    """At a logging step: stop when `train.max_nonfinite` consecutive steps were bad."""
    longest, bad = state.guard.verdict()
    if longest >= setup.cfg.train.max_nonfinite:
        position = state.position
        raise NonFiniteLoss(
            f"non-finite loss term(s) {', '.join(names[i] for i in bad)} for {longest} "
            f"consecutive steps (by epoch {position.epoch}, step {position.batch}); the steps "
            f"were skipped, no weights changed. Try a lower optim.lr, train.clip_grad, or "
            f"train.amp=fp32")


def _stop_agreed(stop: StopRequest, world: World) -> bool:
    """Whether any rank was asked to stop (SIGTERM): a host read, at logging steps only."""
    if not world.distributed:
        return stop.requested
    flag = torch.full((1,), float(stop.requested), device=world.device)
    return bool(all_reduce_(flag, world, op="max").item())


def train_one_epoch(setup: TrainingSetup, state: RunState, progress: Progress,
                    stop: StopRequest) -> bool:
    """Train epoch `state.position.epoch` from batch `state.position.batch`; True when stopped
    by a stop request (a checkpoint has then been written)."""
    cfg, position, steps = setup.cfg, state.position, setup.steps_per_epoch
    params = setup.trainable_parameters
    setup.model.train()
    setup.train_loader.set_epoch(position.epoch, position.batch)
    progress.start_epoch(position.epoch, steps, position.batch)
    state.restore_rng_if_pending(before_iterator=True)
    batches = iter(setup.train_loader)
    state.restore_rng_if_pending(before_iterator=False)
    window, clock = LossSums(), Throughput()
    state.epoch_clock = state.epoch_clock or Throughput()
    while position.batch < steps:
        waited = time.perf_counter()
        batch = next(batches)
        waited = time.perf_counter() - waited
        terms, ok = train_step(setup, state, batch, params)
        window.add(terms, ok)
        if setup.scheduler is not None:
            setup.scheduler.step_update(num_updates=position.global_step)
        position.batch += 1
        for c in (clock, state.epoch_clock):
            c.samples += batch.images.shape[0]
            c.data_wait += waited
        progress.advance()
        stop_now = False
        if position.batch % cfg.train.log_interval == 0 or position.batch == steps:
            _report(setup, state, progress, window, clock)
            _check_nonfinite(setup, state, list(terms))
            stop_now = _stop_agreed(stop, setup.world)
            window, clock = LossSums(), Throughput()
        interval = cfg.train.checkpoint_interval
        if stop_now or (interval and position.global_step % interval == 0 and position.batch < steps):
            state.epoch_sums.merge_(window)
            window = LossSums()
            save_state(setup, state)
            if stop_now:
                progress.end_epoch()
                return True
    progress.end_epoch()
    return False


def _report(setup: TrainingSetup, state: RunState, progress: Progress, window: LossSums,
            clock: Throughput) -> None:
    """Read the window's metrics (the sync every log_interval steps), log them, and fold the
    window into the epoch's sums."""
    values = window.means(setup.world)
    values.update(lr=current_lr(setup.optimizer), **clock.values(setup.world.world_size))
    if window.skipped:
        values["skipped"] = float(window.skipped)
    progress.report(state.position.batch, values)
    state.run_dir.add_scalars(state.position.global_step, values, prefix="train/")
    state.epoch_sums.merge_(window)


# ------------------------------------------------------------------------------ evaluation


def top_k_hits(logits: Tensor, labels: Tensor, indices: Tensor) -> Tensor:
    """[top-1 hits, top-5 hits, samples] of one batch, padding (index −1) excluded."""
    valid = indices >= 0
    if labels.dim() == 2:
        labels = labels.argmax(dim=-1)
    k = min(5, logits.shape[-1])
    hits = logits.topk(k, dim=-1).indices.eq(labels[:, None]) & valid[:, None]
    return torch.stack([hits[:, :1].sum(), hits.sum(), valid.sum()])


@torch.no_grad()
def evaluate(models: dict[str, nn.Module], loader, *, world: World,
             amp_dtype: torch.dtype | None) -> dict[str, float]:
    """Top-1/top-5 (%) of each model over the validation split, in one pass over the data:
    `{"eval": student, "ema": ema}` → eval_top1, eval_top5, ema_top1, ema_top5. Counts are
    summed over ranks before dividing, so every image counts once whatever the world size."""
    modes = {name: model.training for name, model in models.items()}
    for model in models.values():
        model.eval()
    counts = {name: torch.zeros(3, dtype=torch.int64, device=world.device) for name in models}
    loader.set_epoch(1)
    for images, labels, indices in loader:
        with torch.autocast(world.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            for name, model in models.items():
                counts[name] += top_k_hits(model(images), labels, indices)
    results = {}
    for name, model in models.items():
        top1, top5, seen = all_reduce_(counts[name], world).tolist()
        results[f"{name}_top1"] = 100.0 * top1 / max(seen, 1)
        results[f"{name}_top5"] = 100.0 * top5 / max(seen, 1)
        model.train(modes[name])
    return results


# ------------------------------------------------------------------------------ the run


def _report_replaced(setup: TrainingSetup, state: RunState) -> int:
    """Samples whose file broke after indexing and were replaced this epoch (all ranks),
    named in the log (this process's)."""
    replaced = setup.train_loader.take_replaced()
    world = setup.world
    count = int(all_reduce_(torch.tensor([len(replaced)], device=world.device), world).item())
    if replaced:
        names = "; ".join(f"{path} ({reason})" for path, reason in replaced[:10])
        more = f"; and {len(replaced) - 10} more" if len(replaced) > 10 else ""
        state.run_dir.log(f"epoch {state.position.epoch}: {count} sample(s) replaced because "
                          f"their file broke after indexing: {names}{more}")
    return count


def _epoch_end(setup: TrainingSetup, state: RunState) -> dict:
    """Evaluate when due, step the per-epoch schedule, write the summary row and checkpoints."""
    cfg, position = setup.cfg, state.position
    epoch = position.epoch
    train_seconds = time.perf_counter() - state.epoch_clock.start
    throughput = state.epoch_clock.values(setup.world.world_size)   # training only, not eval
    row = {"epoch": epoch, **state.epoch_sums.means(setup.world)}
    row["skipped_steps"] = state.epoch_sums.skipped    # set by `means`
    state.skipped += row["skipped_steps"]
    row["replaced_samples"] = _report_replaced(setup, state)
    average_buffers_(setup.distiller, setup.world)
    if setup.ema is not None:
        average_buffers_(setup.ema, setup.world)
    if epoch % cfg.train.eval_interval == 0 or epoch == cfg.train.epochs:
        models = {"eval": setup.distiller.student}
        if setup.ema is not None:
            models["ema"] = setup.ema.module
        row.update(evaluate(models, setup.val_loader, world=setup.world, amp_dtype=setup.amp_dtype))
    row.update(lr=current_lr(setup.optimizer), **throughput)
    row["epoch_seconds"] = time.perf_counter() - state.epoch_clock.start
    state.train_seconds += train_seconds
    state.samples += state.epoch_clock.samples
    if setup.scheduler is not None:
        setup.scheduler.step(epoch)          # epochs completed (no-op for per-update schedules)
    improved = "eval_top1" in row and (position.best_top1 is None or row["eval_top1"] > position.best_top1)
    if improved:
        position.best_top1, position.best_epoch = row["eval_top1"], epoch
    position.epoch, position.batch = epoch + 1, 0
    state.epoch_sums, state.epoch_clock = LossSums(), None
    state.run_dir.append_summary(row)
    state.run_dir.add_scalars(position.global_step, {k: v for k, v in row.items() if k != "epoch"},
                          prefix="epoch/")
    state.run_dir.log(f"epoch {epoch} done: {format_metrics({k: v for k, v in row.items() if k != 'epoch'})}")
    save_state(setup, state, also=BEST if improved and cfg.output.save_best else None)
    return row


def train(cfg: Config, *, resume: str | Path | None = None) -> RunResult:
    """Train (or resume) one run; returns where it is and what it reached.

    `resume` is a run directory: its `last.pt` is loaded, and `cfg` may differ from the run's
    own config only in the keys `fastkd.checkpoint.RESUMABLE_KEYS` lists (a ConfigError
    otherwise)."""
    check_runnable(cfg)
    world = init_world(cfg.train.device)
    stop = StopRequest()
    stop.install()
    state = setup = run_dir = None
    try:
        cfg, run_dir, checkpoint = open_run(cfg, resume, world)
        # Same seed on every rank while building (identical initial weights, so the EMA copies
        # agree before DDP's broadcast), then seed + rank for everything random in training.
        seed_everything(cfg.train.seed)
        setup = build_training(cfg, world)
        seed_everything(cfg.train.seed + world.rank)
        run_dir.begin(cfg, checkpoint)
        state = start_state(setup, run_dir, checkpoint)
        progress = Progress(run_dir)
        last_row: dict = {}
        while state.position.epoch <= cfg.train.epochs:
            if train_one_epoch(setup, state, progress, stop):
                run_dir.log(f"stop requested (SIGTERM): checkpoint written at epoch "
                            f"{state.position.epoch}, batch {state.position.batch}; resume with "
                            f"`fastkd train --resume {run_dir.path}`")
                return _result(setup, state, preempted=True)
            last_row = _epoch_end(setup, state)
        barrier(world)
        if world.is_primary:
            export_student(run_dir.file(LAST), run_dir.path)
        result = _result(setup, state, row=last_row)
        result.warning = _skipped_warning(state)
        if result.warning:
            run_dir.log(f"warning: {result.warning}")
        return result
    finally:
        stop.uninstall()
        if setup is not None:
            setup.close()
        if run_dir is not None:
            run_dir.close()
        shutdown_world(world)


def _skipped_warning(state: RunState) -> str | None:
    """A run that skipped most of its steps must say so: its weights learned from few."""
    steps = state.position.global_step
    if steps and 2 * state.skipped > steps:
        return (f"{state.skipped} of the {steps} steps of this run were skipped for non-finite "
                f"losses (see skipped_steps in summary.csv); the result is not to be trusted")
    return None


def _result(setup: TrainingSetup, state: RunState, *, row: dict | None = None,
            preempted: bool = False) -> RunResult:
    if not row:
        rows = state.run_dir.read_summary() if state.run_dir.writer else []
        row = {k: float(v) for k, v in rows[-1].items() if v != ""} if rows else {}
    return RunResult(run_dir=state.run_dir.path, model_name=setup.cfg.model.name, metrics=row,
                     final_top1=row.get("eval_top1"), best_top1=state.position.best_top1,
                     img_per_sec=state.samples * setup.world.world_size / max(state.train_seconds, 1e-9),
                     student=setup.distiller.student, preempted=preempted)


def evaluate_config(cfg: Config, checkpoint: str | Path | None = None) -> dict[str, float]:
    """Top-1/top-5 of the student `cfg` describes on `data.val_split`, with the weights of
    `checkpoint` (a fastkd `.pt` — its EMA weights are evaluated too when present — or any
    state-dict file `fastkd.models.load_state_dict_file` reads) or of `model.checkpoint`."""
    world = init_world(cfg.train.device)
    try:
        models, loader = build_evaluation(cfg, world, checkpoint)
        return evaluate(models, loader, world=world, amp_dtype=AMP_DTYPES[cfg.train.amp])
    finally:
        shutdown_world(world)
