"""The three row primitives behind permute and unpermute, in plain PyTorch.

Shape legend: T tokens, K copies per token, N rows, D features.

- ``gather_rows(src_TD, index_N, scale_N, dtype)``: ``out[n] = src[index[n]] * scale[n]``.
- ``combine_rows(y_ND, pos_TK, weight_TK, dtype)``: ``out[t] = sum_k weight[t, k] *
  y[pos[t, k]]``, skipping ``pos < 0`` (dropped copies). Gather-based, so it is
  deterministic: no scatter-add with repeated indices.
- ``copy_dot_rows(y_ND, pos_TK, g_TD)``: ``out[t, k] = <y[pos[t, k]], g[t]>`` (the gate
  gradient).

``dtype`` (default: the input's) is the output's: a gather casts after reading, a combine
before summing, as a separate ``.to()`` there would.

The Triton versions in ``triton_rows`` and the CPU ones in ``cpu_rows`` have the same
signatures (and sum in float32).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _cast(t: Tensor, dtype: torch.dtype | None) -> Tensor:
    """``t`` in ``dtype``, and ``t`` itself when no cast is needed: torch 2.11 compiles an
    autograd.Function whose forward returns a no-op ``.to()`` of an intermediate (an alias of
    it) into a backward that routes the gradient to the wrong place (pytorch/pytorch#180642;
    permute's input gradient on a GPU machine)."""
    return t if dtype is None or dtype == t.dtype else t.to(dtype)


def gather_rows(
    src_TD: Tensor, index_N: Tensor, scale_N: Tensor | None = None, dtype: torch.dtype | None = None
) -> Tensor:
    out_ND = src_TD.index_select(0, index_N)
    if scale_N is not None:
        out_ND = out_ND * scale_N.to(out_ND.dtype).unsqueeze(1)
    return _cast(out_ND, dtype)


def combine_rows(
    y_ND: Tensor, pos_TK: Tensor, weight_TK: Tensor | None = None, dtype: torch.dtype | None = None
) -> Tensor:
    T, K = pos_TK.shape
    y_ND = _cast(y_ND, dtype)
    if y_ND.shape[0] == 0:  # every copy dropped (or no tokens): nothing to read
        return y_ND.new_zeros(T, y_ND.shape[1])
    kept_TK = pos_TK >= 0
    weight_TK = kept_TK if weight_TK is None else weight_TK * kept_TK
    weight_TK = weight_TK.to(y_ND.dtype)
    rows_TD = pos_TK.clamp(min=0)  # a dropped copy reads row 0 with weight 0
    # One gather-multiply per choice level: K is small, and a [T,1,K] x [T,K,D] bmm is
    # several times slower on the CPU. Out of place: torch 2.11 compiles an in-place addcmul_
    # on the output of unpermute's autograd.Function into a wrong backward (every gradient
    # of a top-k >= 2 layer; tests/layers/test_compile.py caught it on a GPU machine).
    out_TD = y_ND.index_select(0, rows_TD[:, 0]) * weight_TK[:, :1]
    for k in range(1, K):
        out_TD = torch.addcmul(out_TD, y_ND.index_select(0, rows_TD[:, k]), weight_TK[:, k : k + 1])
    return out_TD


def copy_dot_rows(y_ND: Tensor, pos_TK: Tensor, g_TD: Tensor) -> Tensor:
    """``out[t, k] = <y[pos[t, k]], g[t]>``, 0 for dropped copies (the gate gradient).

    Summed in float32 at least (float64 stays float64).
    """
    T, K = pos_TK.shape
    dtype = torch.promote_types(y_ND.dtype, torch.float32)
    if y_ND.shape[0] == 0:
        return torch.zeros(T, K, dtype=dtype, device=g_TD.device)
    rows_TKD = y_ND.index_select(0, pos_TK.clamp(min=0).reshape(-1)).view(T, K, -1)
    dots_TK = (rows_TKD * g_TD.unsqueeze(1)).sum(-1, dtype=dtype)
    return dots_TK * (pos_TK >= 0)
