"""RMSNorm that computes in the wider dtype when its input and weight differ.

Under bfloat16 autocast the residual stream reaching a norm is bfloat16 and its weight is a
float32 parameter; torch's fused RMSNorm refuses mixed dtypes and falls back to its
composite form with a UserWarning in every run. That fallback computes in float32 and
rounds once at the end; so does this, explicitly and silently (bitwise the same on the CPU,
tested). Where the dtypes agree, torch's own path runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.RMSNorm):
    def forward(self, x: Tensor) -> Tensor:
        if self.weight is None or self.weight.dtype == x.dtype:
            return super().forward(x)
        wide = torch.promote_types(x.dtype, self.weight.dtype)
        y = F.rms_norm(x.to(wide), self.normalized_shape, self.weight.to(wide), self.eps)
        return y.to(x.dtype)
