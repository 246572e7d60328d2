"""Trainer runs in subprocesses, one process or several under torchrun, as a user would."""

import subprocess
import sys

from moe.train.metrics import read_metrics
from tests.train.helpers import small_overrides


def launch(tmp_path, run_dir, procs, ep, **extra):
    # Global micro-batches of 4 sequences whatever the world: 4 // procs per rank.
    overrides = small_overrides(
        tmp_path, **{"train.deterministic": True, **extra, "train.micro_batch_size": 4 // procs}
    )
    head = (
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={procs}",
            "--standalone",
            "-m",
            "moe.train",
        ]
        if procs > 1
        else [sys.executable, "-m", "moe.train"]
    )
    return [*head, *overrides, f"parallel.ep={ep}", f"hydra.run.dir={run_dir}"]


def losses(run_dir, split=None):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r.get("split") == split}


def run(cmd):
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return out
