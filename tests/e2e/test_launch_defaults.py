"""The multi-process commands of the README with the default config and no batch override:
2 processes under torchrun and under ``accelerate launch`` (EP=2) pick their micro-batch
themselves and train exactly as one process does."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from moe.parallel.world import free_port
from moe.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
SHORT = [
    "train.max_steps=3",
    "train.log_every=1",
    "eval.batches=1",
    "checkpoint.every=3",
    "logger.progress_bar=false",
]


def run(cmd, cwd):
    env = {
        **os.environ,
        "WANDB_MODE": "disabled",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def step_losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "split" not in r}


@pytest.mark.slow
def test_two_processes_with_defaults_match_one_process(tmp_path):
    run(["moe-train", *SHORT, "hydra.run.dir=one"], tmp_path)
    reference = step_losses(tmp_path / "one")
    assert sorted(reference) == [1, 2, 3]

    torchrun = ["torchrun", "--standalone", "--nproc_per_node=2", "-m", "moe.train"]
    out = run([*torchrun, "parallel.ep=2", *SHORT], tmp_path)
    # No hydra.run.dir: both ranks agreed on rank 0's time-stamped directory.
    (run_dir,) = [p.parent for p in (tmp_path / "outputs").rglob("summary.json")]
    assert "micro-batch 8 per rank x 1 accumulation = global batch 16" in out.stdout + out.stderr

    accelerate = [
        "accelerate",
        "launch",
        "--config_file",
        str(REPO / "launch/accelerate.yaml"),
        "--num_processes",
        "2",
        f"--main_process_port={free_port()}",
        "-m",
        "moe.train",
    ]
    run([*accelerate, "parallel.ep=2", *SHORT, "hydra.run.dir=acc"], tmp_path)

    for found in (step_losses(run_dir), step_losses(tmp_path / "acc")):
        assert sorted(found) == [1, 2, 3]
        for step, loss in reference.items():
            assert found[step] == pytest.approx(loss, rel=1e-5), step
