"""The trainer: Hydra entry point, data, optimizer, checkpoints, metrics."""
