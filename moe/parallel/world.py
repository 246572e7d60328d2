"""The process world as a run sees it: the device, joining the launcher's process group,
who am I, which rows of a batch are mine, sums over everyone, and the run directory every
rank shares. One process is the degenerate case: no process group, no communication."""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from functools import cached_property

import torch
import torch.distributed as dist

from moe.typed_config import ConfigError

from .apply import parallelize_experts
from .layout import ParallelLayout
from .state import ExpertShards


@dataclass
class World:
    size: int = 1
    rank: int = 0
    layout: ParallelLayout | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @cached_property
    def shards(self) -> ExpertShards | None:
        """One per world: it builds its device mesh (new process groups) on first use."""
        return ExpertShards(self.layout) if self.layout is not None else None

    def my_rows(self, indices: torch.Tensor) -> torch.Tensor:
        """This rank's equal share of a global (micro-)batch."""
        share = len(indices) // self.size
        return indices[self.rank * share : (self.rank + 1) * share]

    def sum(self, values: list[float]) -> list[float]:
        if self.size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        return self.sum([float(flag)])[0] > 0

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def close(self, together: bool) -> None:
        """Leave the process group. ``together``: every rank stopped at the same point, so
        wait for all before tearing down (a rank leaving while another still talks to the
        group's store aborts that one). After a one-rank failure nobody waits."""
        if dist.is_initialized():
            if together:
                dist.barrier()
            dist.destroy_process_group()


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is visible; use device=auto or cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def setup_world(ep: int, num_experts: int, device: torch.device, engine: str = "native") -> World:
    """Join the process group torchrun (or srun + torchrun, the DeepSpeed launcher,
    ``accelerate launch``) describes. DeepSpeed wants a process group even for one process."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1 and engine == "native":
        if ep != 1:
            raise ConfigError(
                f"parallel.ep={ep} needs {ep} processes; launch with "
                f"torchrun --nproc_per_node={ep} -m moe.train parallel.ep={ep}"
            )
        return World()
    try:
        ParallelLayout.check(size, ep, num_experts)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if not dist.is_initialized():
        if size == 1:
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        # On GPUs, CPU tensors (step metrics, flags) still travel, over gloo.
        dist.init_process_group("cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo")
    if engine == "deepspeed":
        from .deepspeed_groups import deepspeed_layout

        return World(size, dist.get_rank(), deepspeed_layout(ep))
    return World(size, dist.get_rank(), ParallelLayout.create(ep))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shard_model(model: torch.nn.Module, world: World) -> torch.nn.Module:
    return parallelize_experts(model, world.layout) if world.layout is not None else model


def shared_run_dir(pattern: str = "outputs/%Y-%m-%d/%H-%M-%S") -> str:
    """Rank 0's time-stamped run directory, handed to every rank of this launch through the
    launcher's key-value store (before the process group exists), so that ranks started a
    second apart agree. torchrun and ``accelerate launch`` host that store in their agent;
    otherwise rank 0 hosts it, shared later with the process group (multi-tenant)."""
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        size,
        is_master=rank == 0 and not agent,
        timeout=timedelta(minutes=5),
        multi_tenant=not agent,
    )
    key = "moe-train/run_dir"
    if rank == 0:
        store.set(key, time.strftime(pattern))
    run_dir = store.get(key).decode()
    store.set(f"{key}/read/{rank}", "1")
    if rank == 0:  # a rank-0 store must outlive every other rank's read
        store.wait([f"{key}/read/{r}" for r in range(size)])
    return run_dir
