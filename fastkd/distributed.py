"""Process-level plumbing: process group, device and collectives.

Launch with torchrun (`torchrun --nproc_per_node=N -m fastkd train cfg.yaml`): the rank, local
rank and world size come from the environment, read the way timm's `world_info_from_env` does
(torchrun, SLURM, MPI and PMI variables), so no `--local_rank` argument exists. NCCL on CUDA,
gloo on CPU. Without a multi-process environment everything here is a no-op, so the engine
calls the collectives unconditionally and single-process code stays branch-free.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from timm.utils.distributed import world_info_from_env

from fastkd.compat import ddp_ignored
from fastkd.config import ConfigError


@dataclass(frozen=True)
class World:
    """Where this process sits: global rank (shards data, picks the writer), local rank (picks
    the GPU), world size, and the device it computes on."""
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False   # this World initialised the process group, so it tears it down

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_primary(self) -> bool:
        """Rank 0 writes every file and prints every log line."""
        return self.rank == 0


def is_primary_process() -> bool:
    """Rank 0 by the environment (usable before the process group exists, e.g. in the CLI)."""
    return world_info_from_env()[1] == 0


def resolve_device_type(preference: str) -> str:
    """`train.device`: 'auto' picks CUDA when present."""
    if preference == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda' asked for, but no CUDA device is available")
    if preference == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return preference


def init_world(device_preference: str = "auto") -> World:
    """Join the process group when launched multi-process, and pick this process's device."""
    local_rank, rank, world_size = world_info_from_env()
    device_type = resolve_device_type(device_preference)
    device = torch.device("cpu")
    if device_type == "cuda":
        # local_rank % count: schedulers that show each task only its own GPU (SLURM with
        # --gpus-per-task=1) give every local rank a single visible device, cuda:0
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if world_size <= 1:
        return World(device=device)
    owns_group = False
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise ConfigError(f"WORLD_SIZE={world_size} but MASTER_ADDR/MASTER_PORT are not set: "
                              f"launch with torchrun (torchrun --nproc_per_node=N -m fastkd train ...)")
        backend = "nccl" if device_type == "cuda" else "gloo"
        # device_id binds NCCL's communicator to this GPU up front (no guessing from the rank).
        extra = {"device_id": device} if device_type == "cuda" else {}
        dist.init_process_group(backend, rank=rank, world_size=world_size, **extra)
        owns_group = True
        warning = restart_store_warning()
        if rank == 0 and warning:
            warnings.warn(warning, stacklevel=2)
    return World(rank=rank, local_rank=local_rank, world_size=world_size, device=device,
                 owns_group=owns_group)


def restart_store_warning() -> str | None:
    """A warning when torchrun may restart this worker group on a store shared across rounds.

    torchrun's agent keeps one TCP store for every rendezvous round unless
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1; the workers of a restarted group then meet on keys
    the failed round left behind and can read the dead workers' addresses: measured here, of
    7 restarts on one node 2 hung and 1 failed ("Connection refused"). With the variable set
    every round gets a store of its own (9 restarts in 9 completed, on one and two nodes)."""
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0)
    if restarts == 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    return ("torchrun may restart this group (--max-restarts) but shares one store across its "
            "rounds, so a restart can hang or fail connecting; launch torchrun with "
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (scripts/ does)")


def shutdown_world(world: World) -> None:
    if world.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_(tensor: torch.Tensor, world: World, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce ('sum', 'min' or 'max'); identity in a single process."""
    if world.distributed:
        ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
        dist.all_reduce(tensor, op=ops[op])
    return tensor


def broadcast_object(obj, world: World):
    """Rank 0's `obj` on every rank (e.g. the run directory name, which holds a timestamp)."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(obj, world: World) -> list:
    """Every rank's `obj`, in rank order (e.g. per-rank RNG states for a checkpoint)."""
    if not world.distributed:
        return [obj]
    gathered = [None] * world.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def average_buffers_(module: torch.nn.Module, world: World) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over ranks.

    DDP broadcasts rank 0's buffers at the start of each forward, so after the last step of an
    epoch every rank holds statistics updated on its own batch. Averaging them (timm's
    `distribute_bn` 'reduce' mode) makes evaluation and the checkpoint the same on all ranks.
    Buffers DDP was told to ignore (`fastkd.build.method_buffers`: constants, or state kept
    identical by its owner) are skipped: averaging them is wasted traffic at best.
    """
    if not world.distributed:
        return
    ignored = ddp_ignored(module)
    for name, buffer in module.named_buffers():
        if buffer.is_floating_point() and name not in ignored:
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
            buffer.div_(world.world_size)
