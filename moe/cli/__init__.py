"""Every command-line entry point (``moe-train``, ``moe-eval``, ``moe-export``,
``moe-upcycle``, ``moe-sweep-report``), sharing one error path (``errors.py``)."""
