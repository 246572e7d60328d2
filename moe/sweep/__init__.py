"""Sweep tooling: the per-sweep report."""
