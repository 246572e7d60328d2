"""moe.kernels: token dispatch and grouped GEMM, autograd functions over backends.

Importable with torch alone; Triton is loaded only when the ``triton`` backend runs.
"""

if __name__ != "moe.kernels":
    # This folder imported as a top-level ``kernels``: the repository root is on sys.path
    # (pytest, ``python -m`` in a checkout) ahead of site-packages. That name belongs to the
    # Hub's ``kernels`` package (transformers requires it and imports it): hand the import to
    # it when it is installed. Without it, be the one ``moe.kernels``: a second copy of this
    # folder would define our custom ops again, and torch drops an op's first definition when
    # it is redefined, so the first copy's ops would then fail.
    import os
    import sys
    from importlib.machinery import PathFinder
    from importlib.util import module_from_spec

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = PathFinder.find_spec(__name__, _elsewhere)
    if _spec is None:
        import moe.kernels

        sys.modules[__name__] = moe.kernels
    else:
        _module = module_from_spec(_spec)
        sys.modules[__name__] = _module
        _spec.loader.exec_module(_module)
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
