"""parallel.engine=deepspeed against the native engine, checkpoints across the two engines,
and the DeepSpeed-launcher, accelerate and Slurm files in launch/ running 2-process jobs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moe.checkpoint import complete_checkpoints
from moe.parallel.world import free_port
from tests.e2e.runs import launch, losses, run
from tests.train.helpers import small_overrides

pytest.importorskip("deepspeed")

STEPS = {"train.max_steps": 12, "checkpoint.every": 6, "checkpoint.keep": 4, "eval.every": 6}


def assert_losses_match(run_dir, reference_dir, steps):
    reference, found = losses(reference_dir), losses(run_dir)
    assert sorted(found) == list(steps)
    # Same global micro-batches; ZeRO sums gradients in another order (reduce-scatter of
    # flat buckets) than one process: float32 ulps, kept near 1e-7 relative by AdamW.
    for step in steps:
        assert found[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-5), step


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: native engine, one process, checkpoints at steps 6 and 12."""
    tmp = tmp_path_factory.mktemp("reference")
    run(launch(tmp, tmp / "one", 1, 1, **STEPS))
    return tmp


def deepspeed_launcher(tmp_path, run_dir, overrides):
    """launch/deepspeed.sh as a user runs it on each node (no ssh), with a one-node
    hostfile: two processes on this machine."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    env = {
        **os.environ,
        "RUN_DIR": str(run_dir),
        "NODE_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    cmd = ["bash", "launch/deepspeed.sh", str(hostfile), *overrides]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # DeepSpeed's CPU all-reduce names a shared-memory buffer per rank after the port and
    # never removes it; the run must leave none of them behind in /dev/shm (RAM).
    leftovers = Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{env['MASTER_PORT']}_*")
    assert not list(leftovers)
    return out


def test_deepspeed_zero2_matches_one_process_and_its_checkpoint_resumes_natively(
    one_process, tmp_path
):
    overrides = small_overrides(
        one_process, **{"train.deterministic": True, "train.micro_batch_size": 2, **STEPS}
    )
    deepspeed_launcher(tmp_path, tmp_path / "ds", [*overrides, "parallel.ep=2"])
    reference = one_process / "one"
    assert_losses_match(tmp_path / "ds", reference, range(1, 13))
    for step, value in losses(reference, "val").items():
        assert losses(tmp_path / "ds", "val")[step] == pytest.approx(value, rel=1e-5)
    ds_summary = json.loads((tmp_path / "ds" / "summary.json").read_text())
    one_summary = json.loads((reference / "summary.json").read_text())
    for key in ("params_total", "params_active"):  # the whole model, not one rank's slice
        assert ds_summary[key] == one_summary[key]
    # DeepSpeed's partitioned AdamW moments were gathered into our checkpoint format: the
    # native engine in one process continues from it as from its own.
    saved = tmp_path / "ds" / "checkpoints" / "step_6"
    run(launch(one_process, tmp_path / "native", 1, 1, **{**STEPS, "resume": str(saved)}))
    assert_losses_match(tmp_path / "native", reference, range(7, 13))


def test_deepspeed_zero1_resumes_a_native_checkpoint(one_process, tmp_path):
    saved = one_process / "one" / "checkpoints" / "step_6"
    extra = {**STEPS, "resume": str(saved), "parallel.engine": "deepspeed"}
    run(launch(one_process, tmp_path / "ds", 2, 2, **extra, **{"parallel.zero_stage": 1}))
    assert_losses_match(tmp_path / "ds", one_process / "one", range(7, 13))


def test_accelerate_launch_starts_a_two_process_run(one_process, tmp_path):
    overrides = small_overrides(
        one_process, **{"train.deterministic": True, "train.micro_batch_size": 2, **STEPS}
    )
    cmd = [
        "accelerate",
        "launch",
        "--config_file",
        "launch/accelerate.yaml",
        "--num_processes=2",  # the file says 8 (GPUs); this machine runs 2 CPU processes
        f"--main_process_port={free_port()}",
        "-m",
        "moe.train",
        *overrides,
        "train.max_steps=4",
        "parallel.ep=2",  # refused unless there are 2 processes
        f"hydra.run.dir={tmp_path / 'acc'}",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert_losses_match(tmp_path / "acc", one_process / "one", range(1, 5))


# Run in a fresh interpreter: DeepSpeed keeps its process groups in module globals.
NAN_UNDER_DEEPSPEED = """
import sys
from pathlib import Path
import torch
from moe.train.loss import lm_loss
from moe.train.metrics import read_metrics
from moe.train.trainer import Trainer
from tests.train.helpers import small_config

calls = {"n": 0}
def nan_at_step_3(*args):
    ce, out = lm_loss(*args)
    calls["n"] += 1  # two micro-batches per step: calls 5 and 6 are step 3
    return (ce * float("nan"), out) if calls["n"] in (5, 6) else (ce, out)
tmp = Path(sys.argv[1])
cfg = small_config(tmp, **{"train.max_steps": 5, "parallel.engine": "deepspeed"})
trainer = Trainer(cfg, tmp / "run", loss_fn=nan_at_step_3)
summary = trainer.train()
steps = {r["step"]: r for r in read_metrics(tmp / "run") if "split" not in r}
assert summary["skipped_steps"] == 1 and summary["steps"] == 5, summary
assert steps[2]["skipped_steps"] == 0 and steps[3]["skipped_steps"] == 1, steps
assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
print("ok")
"""


def test_deepspeed_skips_a_non_finite_step_in_one_process(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", NAN_UNDER_DEEPSPEED, str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_slurm_script_checkpoints_on_sigusr1_and_requeues(tmp_path):
    """launch/slurm.sbatch with stand-ins for srun (runs its command here) and scontrol
    (one host; records requeues): Slurm's SIGUSR1 to the batch script reaches both
    trainers through torchrun, they checkpoint and exit 75, and the job is requeued."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\nexec "$@"\n')
    (bin_dir / "scontrol").write_text(
        "#!/bin/bash\nif [[ $1 == show ]]; then echo localhost; "
        'else echo "$@" >> "$(dirname "$0")/requeued"; fi\n'
    )
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    run_dir = tmp_path / "run"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_NNODES": "1",
        "SLURM_GPUS_ON_NODE": "2",
        "MASTER_PORT": str(free_port()),
        "RUN_DIR": str(run_dir),
    }
    overrides = small_overrides(
        tmp_path, **{"train.micro_batch_size": 2, "train.max_steps": 2000, "checkpoint.every": 500}
    )
    script = subprocess.Popen(
        ["bash", "launch/slurm.sbatch", *overrides, "parallel.ep=2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not losses(run_dir) and time.time() < deadline:  # both trainers are stepping
        time.sleep(0.05)
    script.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@120 does
    _, err = script.communicate(timeout=180)
    assert script.returncode != 0, err[-3000:]
    assert "SIGUSR1 received: stopped after step" in err, err[-3000:]
    assert json.loads((run_dir / "status.json").read_text())["status"] == "preempted"
    step = int(complete_checkpoints(run_dir)[-1].name.split("_")[1])
    assert 0 < step < 500 and max(losses(run_dir)) == step
    assert (bin_dir / "requeued").read_text().split() == ["requeue", "4242"]
