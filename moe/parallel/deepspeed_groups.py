"""DeepSpeed's expert-parallel process groups, described as our ``ParallelLayout`` (used by
``parallel.engine=deepspeed``, whose ZeRO optimizer reduces over these very groups)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch.distributed as dist

from .layout import ParallelLayout


def group_name(ep: int) -> str:
    return f"ep_size_{ep}"  # DeepSpeed's name for the groups of expert-parallel degree ep


def deepspeed_layout(ep: int) -> ParallelLayout:
    """Create DeepSpeed's expert-parallel groups (on the process group we initialized) and
    describe them as a ``ParallelLayout``; they must be the ranks our layout assumes."""
    import deepspeed
    from deepspeed.utils import groups

    deepspeed.init_distributed()  # wraps the process group we initialized
    world, rank = dist.get_world_size(), dist.get_rank()
    release_shared_buffer_name(rank)
    groups._create_expert_and_data_parallel(ep)
    ep_group = groups._get_expert_parallel_group(group_name(ep))
    expert_dp_group = groups._get_expert_data_parallel_group(group_name(ep))
    first = rank - rank % ep
    expected = (list(range(first, first + ep)), list(range(rank % ep, world, ep)))
    found = (dist.get_process_group_ranks(ep_group), dist.get_process_group_ranks(expert_dp_group))
    if found != expected:
        raise RuntimeError(f"DeepSpeed's expert groups {found} differ from ours {expected}")
    return ParallelLayout(world, rank, ep, ep_group, expert_dp_group)


def release_shared_buffer_name(rank: int) -> None:
    """DeepSpeed's CPU all-reduce (all ranks on one machine) maps one 69 MB shared-memory
    buffer per rank, named after MASTER_ADDR and MASTER_PORT, and never unlinks it: each
    run would leave its ranks' buffers in /dev/shm, which is RAM, until the machine
    reboots. Once every rank has opened every buffer (``init_distributed`` returned on all:
    the barrier), each rank unlinks its own name; the mappings live until the processes
    exit."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":  # only DeepSpeed's CPU accelerator has it
        return
    dist.barrier()
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"
    with contextlib.suppress(FileNotFoundError):
        (Path("/dev/shm") / name).unlink()
