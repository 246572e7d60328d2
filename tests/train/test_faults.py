"""Fault injection: kills at random points, corrupt checkpoints, preemption signals,
non-finite losses, a full disk, a malicious pickle."""

import errno
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import moe.checkpoint.dcp as checkpoint_module
from moe import load_model
from moe.checkpoint import CheckpointError, complete_checkpoints
from moe.checkpoint.files import write_manifest
from moe.train.faults import EXIT_PREEMPTED, NumericalFault
from moe.train.loss import lm_loss
from moe.train.metrics import read_metrics
from moe.train.trainer import Trainer
from tests.reference import on_cpu
from tests.train.helpers import small_config, small_overrides

DETERMINISTIC = {"train.deterministic": True, "checkpoint.keep": 3, "model.moe.jitter": 0.05}


def command(tmp_path, run_dir, **extra):
    overrides = small_overrides(tmp_path, **{**DETERMINISTIC, **extra})
    return [sys.executable, "-m", "moe.train", *overrides, f"hydra.run.dir={run_dir}"]


def same_parameters(a, b):
    sa, sb = load_model(a).state_dict(), load_model(b).state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


def train_losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "split" not in r}


def test_ten_random_kills_then_resume_match_an_uninterrupted_run(tmp_path):
    extra = {"train.max_steps": 40, "checkpoint.every": 2}
    start = time.time()
    subprocess.run(
        command(tmp_path, tmp_path / "straight", **extra), check=True, capture_output=True
    )
    duration = time.time() - start
    rng = random.Random(0)
    kills, attempts = 0, 0
    run_dir = tmp_path / "killed"
    # Kill times span most of a straight run. The straight run also built the data cache, so
    # a later run from scratch is faster and a resumed one faster still: times near its full
    # duration let too many attempts finish before the kill (8 kills in 30 attempts, once).
    while kills < 10 and attempts < 40:
        attempts += 1
        proc = subprocess.Popen(
            command(tmp_path, run_dir, resume="auto", **extra),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            proc.wait(timeout=rng.uniform(0.25, 0.85) * duration)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)  # mid-step, mid-save, mid-metrics: anywhere
            proc.wait()
            kills += 1
            continue
        if proc.returncode == 0:  # finished before the kill came; start again from scratch
            for path in run_dir.glob("**/*"):
                path.unlink() if path.is_file() else None
    assert kills == 10
    subprocess.run(
        command(tmp_path, run_dir, resume="auto", **extra), check=True, capture_output=True
    )
    assert same_parameters(tmp_path / "straight", run_dir)
    assert train_losses(tmp_path / "straight") == train_losses(run_dir)


@on_cpu
def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path):
    extra = {**DETERMINISTIC, "train.max_steps": 12, "checkpoint.every": 4}
    straight = Trainer(small_config(tmp_path, **extra), tmp_path / "straight")
    straight.train()
    straight.close()

    run_dir = tmp_path / "corrupt"
    first = Trainer(small_config(tmp_path, **extra), run_dir)
    first.train()
    first.close()
    newest = complete_checkpoints(run_dir)[-1]
    shard = next(newest.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # torn write
    middle = complete_checkpoints(run_dir)[-2]
    (middle / "complete.json").write_text("{")  # and a torn manifest one step earlier

    with pytest.warns(UserWarning, match="skipping checkpoint"):
        resumed = Trainer(small_config(tmp_path, **{**extra, "resume": "auto"}), run_dir)
    assert resumed.resumed_from.name == "step_4"
    resumed.train()
    resumed.close()
    assert same_parameters(tmp_path / "straight", run_dir)


def test_sigterm_checkpoints_and_exits_for_requeue(tmp_path):
    run_dir = tmp_path / "preempted"
    # No scheduled checkpoint before the end: the only one found can be the signal's (with
    # every=50 a signal landing on a multiple of 50 failed the test one time in 50).
    extra = {"train.max_steps": 400, "checkpoint.every": 1000}
    proc = subprocess.Popen(
        command(tmp_path, run_dir, **extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not (run_dir / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # well inside training
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err[-2000:]
    assert "SIGTERM received: stopped after step" in err and "resume=auto" in err
    assert json.loads((run_dir / "status.json").read_text())["status"] == "preempted"
    stopped = complete_checkpoints(run_dir)[-1]
    step = int(stopped.name.split("_")[1])
    assert 0 < step < 400  # written at the signal
    out = subprocess.run(
        command(tmp_path, run_dir, resume="auto", **{**extra, "train.max_steps": step + 3}),
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads((run_dir / "summary.json").read_text())["steps_this_run"] == 3


@on_cpu
def test_injected_nan_is_skipped_and_too_many_stop_the_run(tmp_path):
    calls = {"n": 0}

    def nan_on_third_step(*args):
        ce, out = lm_loss(*args)
        calls["n"] += 1  # two micro-batches per step: calls 5 and 6 are step 3
        return (ce * float("nan"), out) if calls["n"] in (5, 6) else (ce, out)

    config = small_config(tmp_path, **{"train.max_steps": 5})
    trainer = Trainer(config, tmp_path / "nan", loss_fn=nan_on_third_step)
    summary = trainer.train()
    trainer.close()
    assert summary["skipped_steps"] == 1 and summary["steps"] == 5
    steps = {r["step"]: r for r in read_metrics(tmp_path / "nan") if "split" not in r}
    assert steps[2]["skipped_steps"] == 0 and steps[3]["skipped_steps"] == 1
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())

    def always_nan(*args):
        ce, out = lm_loss(*args)
        return ce * float("nan"), out

    config = small_config(tmp_path, **{"train.max_nonfinite_steps": 3})
    trainer = Trainer(config, tmp_path / "all_nan", loss_fn=always_nan)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(NumericalFault, match="3 steps in a row"):
        trainer.train()
    trainer.close()
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no update was applied


@on_cpu
def test_disk_full_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    real_save = checkpoint_module.dcp.save
    saves = {"n": 0}

    def full_on_second(state, checkpoint_id, **kwargs):
        saves["n"] += 1
        real_save(state, checkpoint_id=checkpoint_id, **kwargs)
        if saves["n"] == 2:  # the files are partly written, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint_module.dcp, "save", full_on_second)
    run_dir = tmp_path / "full"
    trainer = Trainer(small_config(tmp_path, **{"train.max_steps": 12}), run_dir)
    with pytest.raises(CheckpointError, match="No space left on device; step_6 is intact"):
        trainer.train()
    trainer.close()
    assert [p.name for p in complete_checkpoints(run_dir)] == ["step_6"]
    assert not list((run_dir / "checkpoints").glob(".step_*"))
    # The kept checkpoint is the step-6 model, readable as such.
    assert load_model(run_dir).state_dict().keys() == trainer.model.state_dict().keys()
    assert json.loads((run_dir / "checkpoints/step_6/complete.json").read_text())["step"] == 6


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@on_cpu
def test_checkpoint_with_a_malicious_pickle_is_refused(tmp_path, monkeypatch):
    trainer = Trainer(
        small_config(tmp_path, **{"train.max_steps": 2, "checkpoint.every": 2}), tmp_path / "run"
    )
    trainer.train()
    trainer.close()
    path = complete_checkpoints(tmp_path / "run")[-1]
    (path / ".metadata").write_bytes(pickle.dumps(_Exploit()))
    write_manifest(path, 2)  # a consistent manifest: only the pickle check can catch it
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="refusing unsafe or corrupt .metadata"):
        load_model(path)
    assert not (tmp_path / "pwned").exists()


def test_a_summary_cut_short_by_a_kill_reads_as_not_finished(tmp_path):
    from moe.checkpoint import write_text_atomic
    from moe.cli.train import finished_summary

    (tmp_path / "summary.json").write_text("")  # what a kill mid-write used to leave
    assert finished_summary(tmp_path, run_cfg=None) is None
    write_text_atomic(tmp_path / "summary.json", '{"steps": 3}')
    assert (tmp_path / "summary.json").read_text() == '{"steps": 3}'
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temporary left
