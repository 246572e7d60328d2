"""Optuna sweeps (``moe-sweep``): a persistent study that survives its sweep being killed,
parallel workers, pruning, the report, and one-line errors for bad input."""

import json
import signal
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from moe.sweep.study import finished, open_storage
from tests.train.helpers import small_overrides

pytestmark = pytest.mark.slow
optuna.logging.set_verbosity(optuna.logging.WARNING)


def sweep_command(tmp_path, sweep_dir, *optuna_args, **train):
    train = {"train.max_steps": 20, "eval.every": 5, "checkpoint.every": 5, **train}
    return [
        sys.executable,
        "-m",
        "moe.cli.sweep",
        "+sweep=optuna_lr_aux",
        f"optuna.dir={sweep_dir}",
        *optuna_args,
        *small_overrides(tmp_path, **train),
    ]


def stored_trials(sweep_dir):
    meta = json.loads((sweep_dir / "study.json").read_text())
    storage = open_storage(meta["storage"])
    return optuna.load_study(study_name=meta["study_name"], storage=storage).trials


def test_killed_sweep_continues_to_exactly_n_trials(tmp_path):
    sweep = tmp_path / "study"
    command = sweep_command(
        tmp_path,
        sweep,
        "optuna.n_trials=6",
        "optuna.workers=2",
        "optuna.pruner=none",
        "optuna.heartbeat_s=0.5",
        "optuna.stale_after_s=3",
        # Long enough (a few seconds) that the kill lands mid-run: 20 steps took 0.3 s, so a
        # trial still "running" in the study had often finished training (CI failures).
        **{"train.max_steps": 200, "checkpoint.every": 20, "eval.every": 20},
    )
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240

    def cut_short_with_a_checkpoint(number):  # training not finished (no summary yet)
        run_dir = sweep / f"trial_{number:04d}"
        checkpoints = list((run_dir / "checkpoints").glob("step_*/complete.json"))
        return checkpoints and not (run_dir / "summary.json").exists()

    def ready():  # two trials done, and a running one has a checkpoint to resume from
        if not (sweep / "study.json").exists():
            return False
        trials = stored_trials(sweep)
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        running = [t for t in trials if t.state == TrialState.RUNNING]
        return len(done) >= 2 and any(cut_short_with_a_checkpoint(t.number) for t in running)

    while not ready():
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.time() < deadline
        time.sleep(0.2)
    proc.kill()  # the sweep dies without a word; its trials get SIGTERM and checkpoint
    proc.wait()
    before = {t.number: t for t in stored_trials(sweep) if t.state == TrialState.COMPLETE}
    assert len(before) >= 2
    summaries = {n: (sweep / f"trial_{n:04d}" / "summary.json").read_text() for n in before}
    time.sleep(3.5)  # the killed sweep's trials fall silent: stale after 3 s

    out = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    trials = stored_trials(sweep)
    counted = finished(trials)
    assert len(counted) == 6 and {t.state for t in counted} == {TrialState.COMPLETE}
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    for number, trial in before.items():  # finished trials were not run again
        assert trial.datetime_complete == trials[number].datetime_complete
        assert (sweep / f"trial_{number:04d}" / "summary.json").read_text() == summaries[number]
    retries = [t for t in trials if "retry_of" in t.user_attrs]
    assert retries, "the trials cut short by the kill must be retried"
    resumed = []
    for retry in retries:
        cut = trials[retry.user_attrs["retry_of"]]
        assert cut.state == TrialState.FAIL and retry.params == cut.params
        assert retry.user_attrs["run_dir"] == cut.user_attrs["run_dir"]
        summary = json.loads((sweep / f"trial_{cut.number:04d}" / "summary.json").read_text())
        resumed.append(summary.get("resumed_from"))
    assert any(resumed), "a trial with a checkpoint must resume from it"
    assert (sweep / "history.png").stat().st_size > 0
    assert (sweep / "importance.png").stat().st_size > 0
    report = (sweep / "study.md").read_text()
    assert (
        "6 complete" in report
        and f"Best trial {min(counted, key=lambda t: t.value).number}" in report
    )


def test_sigterm_stops_trials_after_a_checkpoint_and_rerun_resumes_them(tmp_path):
    sweep = tmp_path / "study"  # journal storage: the file that several nodes can share
    command = sweep_command(
        tmp_path,
        sweep,
        "optuna.n_trials=2",
        "optuna.workers=1",
        "optuna.pruner=none",
        "optuna.storage=journal",
        # A few seconds of training after the first checkpoint, so that the signal finds
        # the trial mid-run (40 steps took about 0.5 s: it had sometimes finished).
        **{"train.max_steps": 300, "checkpoint.every": 25, "eval.every": 25},
    )
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    marker = sweep / "trial_0000" / "checkpoints" / "step_25" / "complete.json"
    deadline = time.time() + 120
    while not marker.exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # what Slurm sends before preempting a job
    code, err = proc.wait(timeout=120), proc.stderr.read()
    trial_log = sweep / "trial_0000" / "train.log"
    assert code == 75, err[-2000:] + (trial_log.read_text()[-2000:] if trial_log.exists() else "")
    assert (sweep / "study.journal").stat().st_size > 0 and not (sweep / "study.db").exists()
    assert "run the same command again to continue" in err
    first = stored_trials(sweep)
    assert [t.state for t in first] == [TrialState.FAIL, TrialState.WAITING]
    out = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    trials = stored_trials(sweep)
    assert [t.state for t in finished(trials)] == [TrialState.COMPLETE] * 2
    summary = json.loads((sweep / "trial_0000" / "summary.json").read_text())
    assert summary["resumed_from"] and summary["steps"] == 300


MAX_STEPS = 400


def test_median_pruner_stops_a_bad_trial_early(tmp_path):
    sweep = tmp_path / "pruned"
    command = sweep_command(
        tmp_path,
        sweep,
        "optuna.n_trials=3",
        "optuna.pruner=median",
        "optuna.pruner_startup_trials=1",
        "optuna.pruner_warmup_steps=0",
        "optuna.enqueue=[{optim.lr:0.003}]",  # a known-good trial first ...
        "optuna.params.optim.lr=tag(log, interval(1e-7, 1e-6))",  # ... then only bad ones
        # Long enough (a few seconds) that the sweep, which reads the metrics every 0.5 s,
        # sees a bad trial before it ends: 40 steps took 0.5 s, and a trial whose every
        # evaluation arrived in one read was pruned at its last step (a CI failure).
        **{
            "train.max_steps": MAX_STEPS,
            "eval.every": 10,
            "checkpoint.every": 100,
            "optim.warmup_steps": 2,
        },
    )
    out = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    trials = stored_trials(sweep)
    assert trials[0].state == TrialState.COMPLETE
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned
    for trial in pruned:
        assert max(trial.intermediate_values) < MAX_STEPS  # stopped before its last step
        status = json.loads((sweep / f"trial_{trial.number:04d}" / "status.json").read_text())
        assert status["status"] == "pruned"
    assert "pruned at step" in out.stdout + out.stderr
    for name in ("study.md", "trials.csv", "trials.json", "history.png"):
        assert (sweep / name).stat().st_size > 0
    assert not (sweep / "importance.png").exists()  # one completed trial: nothing to compare
    rows = json.loads((sweep / "trials.json").read_text())
    assert [r["state"] for r in rows].count("pruned") == len(pruned)
    report = subprocess.run(
        [sys.executable, "-m", "moe.cli.sweep_report", str(sweep)], capture_output=True, text=True
    )
    assert report.returncode == 0, report.stderr
    assert "Best trial 0" in report.stdout and "optim.lr=0.003" in report.stdout


@pytest.mark.parametrize(
    "bad, message",
    [
        ("optuna.sampler=annealing", "optuna.sampler='annealing' is unknown"),
        ("optuna.pruner=hyperband2", "optuna.pruner='hyperband2' is unknown"),
        ("optuna.params.model.widht=choice(1,2)", "model.widht"),
        ("optuna.params.optim.lr=interval(0.1, 0.01)", "empty or inverted"),
        ("optuna.n_trials=0", "optuna.n_trials and optuna.workers must be >= 1"),
        ("hydra.run.dir=x", "use optuna.dir=PATH"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, bad, message):
    sweep = tmp_path / "never"
    out = subprocess.run(sweep_command(tmp_path, sweep, bad), capture_output=True, text=True)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moe-sweep: error:") and message in lines[0]
    assert not sweep.exists()


def test_unreadable_storage_is_refused(tmp_path):
    sweep = tmp_path / "locked"
    sweep.mkdir()
    (sweep / "study.db").mkdir()  # a directory where the database file should be
    out = subprocess.run(sweep_command(tmp_path, sweep), capture_output=True, text=True)
    assert out.returncode == 2 and "is not a readable, writable file" in out.stderr
    assert sorted(p.name for p in sweep.iterdir()) == ["study.db"]


def test_a_study_is_not_continued_with_other_trial_settings(tmp_path):
    sweep = tmp_path / "study"
    first = sweep_command(tmp_path, sweep, "optuna.n_trials=1", **{"train.max_steps": 2})
    assert subprocess.run(first, capture_output=True).returncode == 0
    other = sweep_command(tmp_path, sweep, "optuna.n_trials=2", **{"train.max_steps": 3})
    out = subprocess.run(other, capture_output=True, text=True)
    assert out.returncode == 2 and "was started with the trial overrides" in out.stderr
    assert len(stored_trials(sweep)) == 1


def test_moe_train_points_an_optuna_sweep_file_to_moe_sweep(tmp_path):
    command = [sys.executable, "-m", "moe.train", "+sweep=optuna_lr_aux"]
    out = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2 and "is run by moe-sweep, not moe-train" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
