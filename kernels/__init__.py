"""moe.kernels: token dispatch and grouped GEMM, autograd functions over backends.

Importable with torch alone; Triton is loaded only when the ``triton`` backend runs.
"""

from .backends import BACKENDS, resolve_backend, torch_gmm_supports, triton_available
from .dispatch_plan import (
    PRIORITIES,
    DispatchPlan,
    count_per_expert,
    count_per_slot,
    expert_capacity,
    plan_dispatch,
)
from .grouped_gemm import grouped_mm
from .permute import permute, unpermute

__all__ = [
    "BACKENDS",
    "PRIORITIES",
    "DispatchPlan",
    "count_per_expert",
    "count_per_slot",
    "expert_capacity",
    "grouped_mm",
    "permute",
    "plan_dispatch",
    "resolve_backend",
    "torch_gmm_supports",
    "triton_available",
    "unpermute",
]
