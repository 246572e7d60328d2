"""DeepSpeed's expert-parallel process groups, described as our ``ParallelLayout`` (used by
``parallel.engine=deepspeed``, whose ZeRO optimizer reduces over these very groups)."""

from __future__ import annotations

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
    groups._create_expert_and_data_parallel(ep)
    world, rank = dist.get_world_size(), dist.get_rank()
    ep_group = groups._get_expert_parallel_group(group_name(ep))
    expert_dp_group = groups._get_expert_data_parallel_group(group_name(ep))
    first = rank - rank % ep
    expected = (list(range(first, first + ep)), list(range(rank % ep, world, ep)))
    found = (dist.get_process_group_ranks(ep_group), dist.get_process_group_ranks(expert_dp_group))
    if found != expected:
        raise RuntimeError(f"DeepSpeed's expert groups {found} differ from ours {expected}")
    return ParallelLayout(world, rank, ep, ep_group, expert_dp_group)
