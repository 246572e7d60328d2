"""Sweeps: Hydra multirun, submitit_local, interruption + resume, and the report (Optuna
sweeps: test_optuna.py)."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from moe.sweep.report import write_report
from moe.train.metrics import read_metrics
from tests.train.helpers import small_overrides


def sweep_args(tmp_path, sweep_dir, swept: dict, **extra):
    base = [o for o in small_overrides(tmp_path, **extra) if o.split("=")[0] not in swept]
    return [
        sys.executable,
        "-m",
        "moe.train",
        "-m",
        *base,
        *(f"{k}={v}" for k, v in swept.items()),
        f"hydra.sweep.dir={sweep_dir}",
    ]


def check_rows_against_runs(sweep_dir, rows):
    for row in rows:
        lines = read_metrics(sweep_dir / row["run"])
        train = [r for r in lines if "split" not in r]
        val = [r for r in lines if r.get("split") == "val"]
        assert float(row["train_loss"]) == pytest.approx(train[-1]["loss"])
        assert float(row["val_loss"]) == pytest.approx(val[-1]["loss"])
        assert int(row["steps"]) == train[-1]["step"]


def test_grid_multirun_and_report(tmp_path):
    sweep = tmp_path / "grid"
    swept = {"model.moe.num_experts": "2,4", "model.moe.top_k": "1,2"}
    out = subprocess.run(
        sweep_args(tmp_path, sweep, swept, **{"train.max_steps": 3}), capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    write_report(sweep)
    with (sweep / "report.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["model.moe.num_experts"], r["model.moe.top_k"]) for r in rows) == [
        ("2", "1"),
        ("2", "2"),
        ("4", "1"),
        ("4", "2"),
    ]
    assert {r["status"] for r in rows} == {"finished"}
    check_rows_against_runs(sweep, rows)
    # Equal active parameters for equal top-k, more total parameters with more experts.
    by = {(r["model.moe.num_experts"], r["model.moe.top_k"]): r for r in rows}
    assert by[("2", "1")]["params_active"] < by[("2", "2")]["params_active"]
    assert by[("2", "1")]["params_total"] < by[("4", "1")]["params_total"]
    assert (sweep / "report.md").read_text().count("| finished |") == 4
    assert (sweep / "report.png").stat().st_size > 1000


def test_submitit_local_launcher(tmp_path):
    sweep = tmp_path / "submitit"
    args = sweep_args(tmp_path, sweep, {"model.moe.num_experts": "2,4"}, **{"train.max_steps": 2})
    out = subprocess.run([*args, "+launcher=local"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = write_report(sweep)
    assert [r["status"] for r in rows] == ["finished", "finished"]


def test_interrupted_sweep_resumes(tmp_path):
    sweep = tmp_path / "interrupted"
    # Long enough (a few seconds) that the kill lands before the second job ends: 40 steps
    # take about 0.5 s here, too close to a loaded machine's scheduling delays.
    extra = {
        "train.max_steps": 200,
        "checkpoint.every": 5,
        "checkpoint.keep": 3,
        "train.log_every": 1,
    }
    args = sweep_args(tmp_path, sweep, {"model.moe.num_experts": "2,4"}, **extra)
    proc = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    marker = sweep / "1" / "checkpoints" / "step_10" / "complete.json"
    deadline = time.time() + 120
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # as a preempted or crashed job dies
    proc.wait()
    assert marker.exists()
    rows = write_report(sweep)
    assert rows[0]["status"] == "finished" and rows[1]["status"] == "unfinished"

    out = subprocess.run([*args, "resume=auto"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "already finished at step 200; skipped" in out.stdout
    rows = write_report(sweep)
    assert [(r["status"], r["steps"]) for r in rows] == [("finished", 200), ("finished", 200)]
    summary = json.loads((sweep / "1" / "summary.json").read_text())
    resumed_step = int(summary["resumed_from"].rsplit("step_", 1)[1])
    assert resumed_step >= 10 and summary["steps_this_run"] == 200 - resumed_step
