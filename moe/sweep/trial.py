"""One Optuna trial as an ordinary ``moe-train`` run in its own run directory.

The trial is a child process (its output in ``<run_dir>/train.log``), started with
``resume=auto`` so a retried trial continues from its checkpoint. While it runs, the worker
reads the validation losses it appends to ``metrics.jsonl``, reports each to Optuna and
kills the run when the pruner says so; it also touches ``<run_dir>/heartbeat`` so another
invocation can tell a live trial from one whose worker died.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import optuna

from moe.train.faults import EXIT_PREEMPTED
from moe.train.metrics import read_metrics

from .study import HEARTBEAT

POLL_S = 0.5


@dataclass
class Outcome:
    """How a trial ended: ``complete`` (with ``value``), ``pruned`` (at ``step``),
    ``interrupted`` (stopped by a signal; retry it) or ``failed`` (with ``error``)."""

    state: str
    value: float | None = None
    step: int | None = None
    error: str | None = None


def trial_command(base: list[str], overrides: list[str], run_dir: Path, name: str) -> list[str]:
    keys = {o.split("=", 1)[0] for o in base}
    wandb = [  # each trial its own W&B run, grouped by study (unless the command set them)
        f"logger.wandb.{key}={value}"
        for key, value in (("group", name.split("/")[0]), ("name", name))
        if f"logger.wandb.{key}" not in keys
    ]
    return [
        sys.executable,
        "-m",
        "moe.train",
        *base,
        *overrides,
        *wandb,
        f"hydra.run.dir={run_dir}",
        "resume=auto",
    ]


def run_trial(
    trial: optuna.Trial,
    command: list[str],
    run_dir: Path,
    env: dict[str, str],
    stop: threading.Event,
    heartbeat_s: float,
) -> Outcome:
    run_dir.mkdir(parents=True, exist_ok=True)
    beat = run_dir / HEARTBEAT
    beat.touch()
    with (run_dir / "train.log").open("a") as log:
        proc = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # Ctrl-C reaches the sweep, which stops trials in order
            preexec_fn=_die_with_parent,
        )
        reported: set[int] = set()
        last_beat = time.time()
        signalled = False
        try:
            while proc.poll() is None:
                time.sleep(POLL_S)
                if time.time() - last_beat >= heartbeat_s:
                    beat.touch()
                    last_beat = time.time()
                if stop.is_set() and not signalled:  # it checkpoints after this step
                    os.killpg(proc.pid, signal.SIGTERM)
                    signalled = True
                step = report_new(trial, run_dir, reported)
                if step is not None and not signalled and trial.should_prune():
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    mark_pruned(run_dir, step)
                    return Outcome("pruned", step=step)
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    return ended(proc.returncode, run_dir, trial, reported)


def _die_with_parent() -> None:
    """Linux: SIGTERM the trial if the sweep dies, so it checkpoints instead of running on
    unseen (a retry resumes it in the same run directory)."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def report_new(trial: optuna.Trial, run_dir: Path, reported: set[int]) -> int | None:
    """Report validation losses not reported yet; returns the last new step, if any."""
    last = None
    for row in read_metrics(run_dir):
        if row.get("split") == "val" and row["step"] not in reported:
            trial.report(row["loss"], row["step"])
            reported.add(row["step"])
            last = row["step"]
    return last


def ended(code: int, run_dir: Path, trial: optuna.Trial, reported: set[int]) -> Outcome:
    if code == EXIT_PREEMPTED:
        return Outcome("interrupted")
    if code == 0:
        report_new(trial, run_dir, reported)
        summary = json.loads((run_dir / "summary.json").read_text())
        return Outcome("complete", value=summary["val_loss"], step=summary["steps"])
    status_path = run_dir / "status.json"
    status = json.loads(status_path.read_text()) if status_path.exists() else {}
    error = status.get("error") or f"exit code {code}; see {run_dir / 'train.log'}"
    return Outcome("failed", error=error)


def mark_pruned(run_dir: Path, step: int) -> None:
    (run_dir / "status.json").write_text(json.dumps({"status": "pruned", "step": step}))
