"""Sweeps: Optuna studies whose trials are ``moe-train`` runs (``config``, ``space``,
``study``, ``trial``, ``workers``, ``study_report``) and the per-run report of any sweep
directory (``report``)."""
