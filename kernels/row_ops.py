"""The two row primitives behind permute and unpermute, in plain PyTorch.

Shape legend: T tokens, K copies per token, N rows, D features.

- ``gather_rows(src_TD, index_N, scale_N)``: ``out[n] = src[index[n]] * scale[n]``.
- ``combine_rows(y_ND, pos_TK, weight_TK)``: ``out[t] = sum_k weight[t, k] * y[pos[t, k]]``,
  skipping ``pos < 0`` (dropped copies). Gather-based, so it is deterministic: no
  scatter-add with repeated indices.

The Triton versions in ``triton_rows`` have the same signatures.
"""

from __future__ import annotations

import torch
from torch import Tensor


def gather_rows(src_TD: Tensor, index_N: Tensor, scale_N: Tensor | None = None) -> Tensor:
    out_ND = src_TD.index_select(0, index_N)
    if scale_N is not None:
        out_ND = out_ND * scale_N.to(out_ND.dtype).unsqueeze(1)
    return out_ND


def combine_rows(y_ND: Tensor, pos_TK: Tensor, weight_TK: Tensor | None = None) -> Tensor:
    T, K = pos_TK.shape
    D = y_ND.shape[1]
    if y_ND.shape[0] == 0:  # every copy dropped (or no tokens): nothing to read
        return y_ND.new_zeros(T, D)
    kept_TK = pos_TK >= 0
    weight_TK = kept_TK.to(y_ND.dtype) if weight_TK is None else weight_TK.to(y_ND.dtype)
    weight_TK = weight_TK * kept_TK  # a dropped copy reads row 0 below with weight 0
    rows_TKD = y_ND[pos_TK.clamp(min=0)]
    # bmm accumulates low-precision inputs in float32 and rounds once.
    return torch.bmm(weight_TK.unsqueeze(1), rows_TKD).squeeze(1)


def copy_dot_rows(y_ND: Tensor, pos_TK: Tensor, g_TD: Tensor) -> Tensor:
    """``out[t, k] = <y[pos[t, k]], g[t]>``, 0 for dropped copies (the gate gradient).

    Computed in float32 at least (float64 stays float64).
    """
    T, K = pos_TK.shape
    dtype = torch.promote_types(y_ND.dtype, torch.float32)
    if y_ND.shape[0] == 0:
        return torch.zeros(T, K, dtype=dtype, device=g_TD.device)
    rows_TKD = y_ND[pos_TK.clamp(min=0)].to(dtype)
    dots_TK = torch.bmm(rows_TKD, g_TD.to(dtype).unsqueeze(2)).squeeze(2)
    return dots_TK * (pos_TK >= 0)
