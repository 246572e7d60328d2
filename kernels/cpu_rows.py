"""Token dispatch on CPUs where our kernels build (``cpu_rows.cpp``, in the same module as
the grouped GEMMs): the row primitives of ``row_ops`` and the dropless dispatch plan, each
one pass.

Shape legend: T tokens, K copies per token, E experts, N rows, D features.

Eager only: inside a ``torch.compile`` trace the plain PyTorch versions run, which the
compiler fuses itself.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import cpu_gemm

ROW_DTYPES = (torch.bfloat16, torch.float32)


def usable(*tensors: Tensor) -> bool:
    """Whether these CPU tensors can take our kernels (rows: bfloat16 or float32)."""
    if torch.compiler.is_compiling() or not all(t.device.type == "cpu" for t in tensors):
        return False
    if not all(t.dtype in ROW_DTYPES or not t.is_floating_point() for t in tensors):
        return False
    return cpu_gemm.avx512_available()


def gather_rows(
    src_TD: Tensor, index_N: Tensor, scale_N: Tensor | None = None, dtype: torch.dtype | None = None
) -> Tensor:
    scale = None if scale_N is None else scale_N.float().contiguous()
    return cpu_gemm.module().gather_rows(
        src_TD.contiguous(), index_N.long().contiguous(), scale, dtype or src_TD.dtype
    )


def combine_rows(
    y_ND: Tensor, pos_TK: Tensor, weight_TK: Tensor | None = None, dtype: torch.dtype | None = None
) -> Tensor:
    weight = None if weight_TK is None else weight_TK.float().contiguous()
    return cpu_gemm.module().combine_rows(
        y_ND.contiguous(), pos_TK.long().contiguous(), weight, dtype or y_ND.dtype
    )


def copy_dot_rows(y_ND: Tensor, pos_TK: Tensor, g_TD: Tensor) -> Tensor:
    """Float32, whatever the rows' dtypes."""
    return cpu_gemm.module().copy_dot_rows(
        y_ND.contiguous(), pos_TK.long().contiguous(), g_TD.contiguous()
    )


def plan_dropless(ids_TK: Tensor, num_experts: int) -> tuple[Tensor, ...]:
    """``(row_token_N, row_copy_N, pos_TK, counts_E, offsets_E)`` of the dropless plan with
    sequence priority: a counting sort by expert in (k, t) order."""
    ids_TK = ids_TK.long().contiguous()
    plan = cpu_gemm.module().plan_dropless(ids_TK, num_experts)
    if not plan:
        bad = ids_TK[(ids_TK < 0) | (ids_TK >= num_experts)][0]
        raise ValueError(f"expert id {bad} out of range for {num_experts} experts")
    return tuple(plan)
