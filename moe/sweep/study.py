"""Opening a persistent Optuna study and keeping its trial count honest across invocations.

A trial counts toward ``n_trials`` once it completed, was pruned or failed on its own. A
trial whose worker was stopped (SIGTERM, Ctrl-C, preemption) or killed (its heartbeat went
silent) is marked failed and enqueued again with the same parameters and the same run
directory, so the retry resumes from the trial's own checkpoint; the retry's ``retry_of``
keeps the failed one out of the count.
"""

from __future__ import annotations

import time
from pathlib import Path

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from .config import StudyConfig

HEARTBEAT = "heartbeat"


def open_storage(url: str) -> optuna.storages.BaseStorage | str:
    if url.startswith("journal:"):
        return JournalStorage(JournalFileBackend(url.removeprefix("journal:")))
    return optuna.storages.RDBStorage(url)


def make_sampler(cfg: StudyConfig) -> optuna.samplers.BaseSampler:
    kinds = {
        "tpe": optuna.samplers.TPESampler,
        "random": optuna.samplers.RandomSampler,
        "qmc": optuna.samplers.QMCSampler,
    }
    return kinds[cfg.sampler](seed=cfg.seed)


def make_pruner(cfg: StudyConfig) -> optuna.pruners.BasePruner:
    if cfg.pruner == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=cfg.pruner_startup_trials, n_warmup_steps=cfg.pruner_warmup_steps
        )
    if cfg.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, cfg.pruner_warmup_steps))
    return optuna.pruners.NopPruner()


def open_study(cfg: StudyConfig) -> tuple[optuna.Study, bool]:
    """The study named ``cfg.study_name`` in its storage, created if new; returns it and
    whether it was created now."""
    storage = open_storage(cfg.storage_url)
    try:
        optuna.load_study(study_name=cfg.study_name, storage=storage)
        created = False
    except KeyError:
        created = True
    study = optuna.create_study(
        study_name=cfg.study_name,
        storage=storage,
        direction=cfg.direction,
        sampler=make_sampler(cfg),
        pruner=make_pruner(cfg),
        load_if_exists=True,
    )
    return study, created


def retried(trials: list[FrozenTrial]) -> set[int]:
    """Numbers of the trials that were cut short and enqueued again."""
    return {t.user_attrs["retry_of"] for t in trials if "retry_of" in t.user_attrs}


def finished(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The trials that count toward ``n_trials``: completed, pruned, or failed on their own."""
    again = retried(trials)
    done = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    return [t for t in trials if t.state in done and t.number not in again]


def slots_left(study: optuna.Study, n_trials: int) -> int:
    """Trials still to start: the total less those finished and those running now."""
    trials = study.get_trials(deepcopy=False)
    running = sum(t.state == TrialState.RUNNING for t in trials)
    return n_trials - len(finished(trials)) - running


def retry(study: optuna.Study, number: int, params: dict, run_dir: str | None, reason: str) -> None:
    """Mark a trial that was cut short as failed and enqueue it again with its parameters and
    run directory; the retry's ``retry_of`` keeps the failed one out of the count."""
    try:
        study.tell(number, state=TrialState.FAIL)
    except (RuntimeError, ValueError):  # another worker got there first
        return
    study.enqueue_trial(
        params,
        user_attrs={"run_dir": run_dir, "retry_of": number, "retry_reason": reason},
        skip_if_exists=False,
    )


def heartbeat_age(trial: FrozenTrial) -> float:
    """Seconds since a running trial's worker last touched its heartbeat file."""
    run_dir = trial.user_attrs.get("run_dir")
    beat = Path(run_dir) / HEARTBEAT if run_dir else None
    if beat is not None and beat.exists():
        return time.time() - beat.stat().st_mtime
    return time.time() - trial.datetime_start.timestamp() if trial.datetime_start else 0.0


def retry_stale(study: optuna.Study, stale_after_s: float) -> list[int]:
    """Retry every running trial whose heartbeat is older than ``stale_after_s``."""
    stale = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if heartbeat_age(t) > stale_after_s
    ]
    for trial in stale:
        reason = f"heartbeat silent for more than {stale_after_s:.0f}s"
        retry(study, trial.number, trial.params, trial.user_attrs.get("run_dir"), reason)
    return [t.number for t in stale]
