"""The ``optuna:`` section of an Optuna sweep file (``configs/sweep/optuna_*.yaml``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from moe.typed_config import ConfigError, from_dict

SAMPLERS = ("tpe", "random", "qmc")
PRUNERS = ("none", "median", "halving")
LAUNCHERS = ("local", "submitit_local", "submitit_slurm")


@dataclasses.dataclass(frozen=True)
class SlurmSection:
    """Resources of each worker job with ``launcher=submitit_slurm`` (one job per worker).
    partition: Slurm partition (null: the cluster's default). timeout_min: wall time of a
    worker job. gpus_per_node / cpus_per_task / mem_gb: what each worker job asks for."""

    partition: str | None = None
    timeout_min: int = 240
    gpus_per_node: int = 1
    cpus_per_task: int = 8
    mem_gb: int = 64


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """study_name: the study's stable name (re-running the command continues it). dir: the
    sweep directory holding the study and one run directory per trial (null:
    ``sweeps/<study_name>``). storage: ``sqlite`` (``<dir>/study.db``, one machine),
    ``journal`` (``<dir>/study.journal``, processes or nodes sharing a filesystem) or any
    Optuna storage URL. direction: minimize | maximize the final validation loss.
    n_trials: trials to finish (complete, pruned or failed) over every invocation together.
    workers: trials run at once; on the CPU each gets an equal share of the cores, on GPUs an
    equal share of the devices. launcher: local (worker threads here), submitit_local or
    submitit_slurm (one submitit job per worker, all on the same study). sampler: tpe |
    random | qmc, seeded by ``seed`` (null: random). pruner: none | median | halving; trials
    report every evaluation and are stopped early when the pruner says so, never before
    ``pruner_warmup_steps`` or while fewer than ``pruner_startup_trials`` trials finished
    (median). heartbeat_s / stale_after_s: a running trial touches its heartbeat every
    ``heartbeat_s``; one silent for ``stale_after_s`` (its worker was killed) is marked
    failed and retried in its own run directory, resuming from its checkpoint. params: the
    search space (``key: sweep expression``, see ``moe.sweep.space``). enqueue: trials to run
    first (a list of ``{key: value}``), e.g. a known-good configuration."""

    study_name: str = "sweep"
    dir: str | None = None
    storage: str = "sqlite"
    direction: str = "minimize"
    n_trials: int = 20
    workers: int = 1
    launcher: str = "local"
    sampler: str = "tpe"
    seed: int | None = None
    pruner: str = "median"
    pruner_startup_trials: int = 4
    pruner_warmup_steps: int = 100
    heartbeat_s: float = 20.0
    stale_after_s: float = 120.0
    slurm: SlurmSection = SlurmSection()
    params: dict = dataclasses.field(default_factory=dict)
    enqueue: list = dataclasses.field(default_factory=list)

    def __post_init__(self):
        if not self.study_name or "/" in self.study_name:
            raise ConfigError(f"optuna.study_name={self.study_name!r}: give a name without '/'")
        for key, value, allowed in (
            ("direction", self.direction, ("minimize", "maximize")),
            ("sampler", self.sampler, SAMPLERS),
            ("pruner", self.pruner, PRUNERS),
            ("launcher", self.launcher, LAUNCHERS),
        ):
            if value not in allowed:
                raise ConfigError(f"optuna.{key}={value!r} is unknown; use one of {allowed}")
        if self.n_trials < 1 or self.workers < 1:
            raise ConfigError("optuna.n_trials and optuna.workers must be >= 1")
        if self.heartbeat_s <= 0 or self.stale_after_s <= self.heartbeat_s:
            raise ConfigError("optuna.stale_after_s must exceed optuna.heartbeat_s (> 0)")
        if not all(isinstance(item, dict) for item in self.enqueue):
            raise ConfigError("optuna.enqueue must be a list of {key: value} mappings")

    @property
    def sweep_dir(self) -> Path:
        return Path(self.dir or f"sweeps/{self.study_name}")

    @property
    def storage_url(self) -> str:
        if self.storage == "sqlite":
            return f"sqlite:///{self.sweep_dir.absolute() / 'study.db'}"
        if self.storage == "journal":
            return f"journal:{self.sweep_dir.absolute() / 'study.journal'}"
        return self.storage


def study_config(section: Any) -> StudyConfig:
    """``StudyConfig`` from the composed ``optuna`` mapping (params/enqueue kept as data)."""
    if not isinstance(section, dict):
        raise ConfigError(
            "no optuna section: add +sweep=<an optuna sweep file>, e.g. optuna_lr_aux"
        )
    section = dict(section)
    params, enqueue = section.pop("params", {}) or {}, section.pop("enqueue", []) or []
    if not isinstance(params, dict) or not isinstance(enqueue, list):
        raise ConfigError("optuna.params must be a mapping and optuna.enqueue a list")
    config = from_dict(StudyConfig, section, "optuna.")
    return dataclasses.replace(config, params=params, enqueue=enqueue)
