"""moe.kernels: token dispatch and grouped GEMM, autograd functions over backends.

Importable with torch alone; Triton is loaded only when the ``triton`` backend runs.
"""

if __name__ != "moe.kernels":
    # This folder imported as a top-level ``kernels``: the repository root is on sys.path
    # (pytest, ``python -m`` in a checkout) and a library probed for a package of that name
    # (transformers looks for the Hub's ``kernels``). A second copy would define our custom
    # ops again, and torch drops an op's first definition when it is redefined: the first
    # copy's ops would then fail. Be the one ``moe.kernels`` instead.
    import sys

    import moe.kernels

    sys.modules[__name__] = moe.kernels
else:
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
