"""Worker threads that run one study's trials side by side, each trial a ``moe-train`` child
process (``moe.sweep.trial``); every worker asks the shared study for its next trial, so any
number of invocations (here or on other nodes) can work on one study."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import TrialState
from tqdm import tqdm

from .config import StudyConfig
from .space import trial_overrides
from .study import finished, retry, retry_stale, slots_left
from .trial import Outcome, run_trial, trial_command


def threads_per_worker(workers: int) -> int:
    """An equal share of the cores this process may use (``OMP_NUM_THREADS`` if set)."""
    cores = int(os.environ.get("OMP_NUM_THREADS") or len(os.sched_getaffinity(0)))
    return max(1, cores // workers)


def worker_env(slot: int, workers: int) -> dict[str, str]:
    """The environment of worker ``slot``'s trials: an equal share of the CPU cores, and of
    the GPUs when there are at least as many as workers."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads_per_worker(workers))
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    if len(gpus) >= workers > 1:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[slot::workers])
    return env


@dataclass
class Sweep:
    cfg: StudyConfig
    study: optuna.Study
    space: dict[str, BaseDistribution]
    base_overrides: list[str]
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    errors: list[BaseException] = field(default_factory=list)
    bar: tqdm | None = None  # trials finished, over every invocation

    def run(self) -> None:
        trials = self.study.get_trials(deepcopy=False)
        self.bar = tqdm(
            total=self.cfg.n_trials, initial=len(finished(trials)), desc=self.cfg.study_name
        )
        threads = [
            threading.Thread(target=self._work, args=(slot,), daemon=True)
            for slot in range(self.cfg.workers)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():  # join with a timeout so signals reach the main thread
                thread.join(timeout=0.5)
        self.bar.close()
        if self.errors:
            raise self.errors[0]

    def _work(self, slot: int) -> None:
        env = worker_env(slot, self.cfg.workers)
        try:
            while not self.stop.is_set():
                trial = self._next_trial()
                if trial is None:
                    return
                self._run(trial, env)
        except BaseException as err:  # storage gone, disk full: stop every worker
            self.errors.append(err)
            self.stop.set()

    def _next_trial(self) -> optuna.Trial | None:
        with self.lock:  # one worker at a time counts the slots left and takes one
            for number in retry_stale(self.study, self.cfg.stale_after_s):
                self._say(f"trial {number}: its worker stopped answering; retried")
            if slots_left(self.study, self.cfg.n_trials) <= 0 or self.stop.is_set():
                return None
            trial = self.study.ask(self.space)
            run_dir = trial.user_attrs.get("run_dir") or str(
                self.cfg.sweep_dir / f"trial_{trial.number:04d}"
            )
            trial.set_user_attr("run_dir", run_dir)
            return trial

    def _run(self, trial: optuna.Trial, env: dict[str, str]) -> None:
        run_dir = Path(trial.user_attrs["run_dir"])
        overrides = trial_overrides(trial.params)
        name = f"{self.cfg.study_name}/{run_dir.name}"
        command = trial_command(self.base_overrides, overrides, run_dir, name)
        outcome = run_trial(trial, command, run_dir, env, self.stop, self.cfg.heartbeat_s)
        self._tell(trial, outcome, run_dir, " ".join(overrides))

    def _tell(self, trial: optuna.Trial, outcome: Outcome, run_dir: Path, params: str) -> None:
        what = f"trial {trial.number} ({run_dir.name}, {params})"
        if outcome.state == "interrupted":
            retry(self.study, trial.number, trial.params, str(run_dir), "stopped by a signal")
            self._say(f"{what}: stopped; it resumes from its checkpoint when the sweep reruns")
            return
        if outcome.state == "complete":
            self.study.tell(trial, outcome.value)
            self._say(f"{what}: val_loss {outcome.value:.4f}")
        elif outcome.state == "pruned":
            self.study.tell(trial, state=TrialState.PRUNED)
            self._say(f"{what}: pruned at step {outcome.step}")
        else:
            trial.set_user_attr("error", outcome.error)
            self.study.tell(trial, state=TrialState.FAIL)
            self._say(f"{what}: failed: {outcome.error}")
        self.bar.update(1)

    def _say(self, line: str) -> None:
        tqdm.write(line)
