"""``moe-sweep``: an Optuna search whose trials are ordinary ``moe-train`` runs.

    moe-sweep +sweep=optuna_lr_aux optuna.n_trials=20 optuna.workers=2 [moe-train overrides]

The sweep file (``configs/sweep/optuna_*.yaml``) holds the ``optuna:`` section: the study,
its search space (``optuna.params``) and its sampler and pruner (``moe.sweep.config``). Every
other argument is a ``moe-train`` override that each trial gets. The study lives in its
sweep directory (``sweeps/<study_name>`` unless ``optuna.dir``), so running the same command
again continues it: finished trials stay, trials cut short resume from their checkpoints,
and ``optuna.n_trials`` counts every invocation together. Everything is checked before
anything is written; a mistake is one line on stderr and exit 2.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from moe.sweep.config import StudyConfig, study_config
from moe.sweep.space import search_space, trial_overrides
from moe.sweep.study_report import write_study_report
from moe.train.faults import EXIT_PREEMPTED
from moe.typed_config import ConfigError

from . import errors
from .train import CONFIG_DIR, check_writable, to_run_config

PROGRAM = "moe-sweep"
SWEEP_ONLY = ("optuna.", "+optuna.", "sweep=", "+sweep=")
PARAM = "optuna.params."  # optuna.params.<config key>=<sweep expression> adds or changes one


def fail(message: str, code: int = errors.EXIT_BAD_INPUT):
    errors.fail(PROGRAM, message, code)


def compose_job(overrides: list[str]) -> dict:
    """The composed config without Hydra's own section, interpolations resolved."""
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        cfg = compose("train", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)


def trial_base(args: list[str]) -> list[str]:
    """The overrides every trial gets: the command's, less the sweep's own."""
    return [arg for arg in args if not arg.startswith(SWEEP_ONLY)]


def check_args(args: list[str]) -> tuple[StudyConfig, dict, list[str]]:
    """The study config, its search space and the trials' base overrides, all validated."""
    if bare := [a for a in args if "=" not in a]:
        fail(f"arguments are key=value overrides, e.g. +sweep=optuna_lr_aux; got {bare[0]!r}")
    if hydra := [a for a in args if a.lstrip("+~").startswith("hydra.")]:
        fail(f"{hydra[0]}: each trial's run directory is set by the sweep; use optuna.dir=PATH")
    # A dotted config key inside optuna.params would nest in Hydra's grammar: read it here.
    extra = dict(a.lstrip("+").removeprefix(PARAM).split("=", 1) for a in args if _is_param(a))
    try:
        composed = compose_job([a for a in args if not _is_param(a)])
        cfg = study_config(composed.pop("optuna", None))
        cfg = dataclasses.replace(cfg, params={**cfg.params, **extra})
        space = search_space(cfg.params)
        base = trial_base(args)
        if composed != compose_job(base):
            raise ConfigError(
                "the sweep file sets keys outside its optuna: section; put fixed settings on "
                "the command line (or in an +experiment file) so every trial gets them"
            )
        for pick in (0, -1):  # the space's ends must make valid runs
            sample = {key: _end(dist, pick) for key, dist in space.items()}
            to_run_config(OmegaConf.create(compose_job([*base, *trial_overrides(sample)])))
        check_writable(cfg.sweep_dir, "optuna.dir")
        _check_storage(cfg)
    except ConfigError as err:
        fail(str(err))
    except Exception as err:  # Hydra/OmegaConf: unknown key, bad override syntax, ...
        text = str(err).strip()
        fail(text.splitlines()[0] if text else type(err).__name__)
    return cfg, space, base


def _is_param(arg: str) -> bool:
    return arg.lstrip("+").startswith(PARAM)


def _end(dist, pick: int):
    if hasattr(dist, "choices"):
        return dist.choices[pick]
    return dist.low if pick == 0 else dist.high


def _check_storage(cfg: StudyConfig) -> None:
    if cfg.launcher == "submitit_slurm" and cfg.storage == "sqlite":
        raise ConfigError(
            "optuna.storage=sqlite cannot be shared by Slurm jobs on several nodes; "
            "use optuna.storage=journal (a file on the shared filesystem)"
        )
    for name in ("study.db", "study.journal"):
        path = cfg.sweep_dir / name
        if path.exists() and not (path.is_file() and _readable_writable(path)):
            raise ConfigError(f"the study storage {path} is not a readable, writable file")


def _readable_writable(path: Path) -> bool:
    return os.access(path, os.R_OK | os.W_OK)


def open_checked(cfg: StudyConfig, base: list[str]):
    """Open (or create) the study; refuse one that was started with other trial settings."""
    import optuna

    from moe.sweep.study import open_study

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep prints its own lines
    try:
        study, created = open_study(cfg)
    except Exception as err:
        fail(f"cannot open the study storage {cfg.storage_url}: {str(err).splitlines()[0]}")
    recorded = study.user_attrs.get("trial_overrides")
    if recorded is not None and recorded != base:
        fail(
            f"study {cfg.study_name!r} in {cfg.sweep_dir} was started with the trial overrides "
            f"{' '.join(recorded) or '(none)'}; rerun with those, or start another study "
            "(optuna.study_name=... or optuna.dir=...)"
        )
    if created:
        study.set_user_attr("trial_overrides", base)
        for params in cfg.enqueue:
            study.enqueue_trial(params)
    pointer = {"study_name": cfg.study_name, "storage": cfg.storage_url}
    (cfg.sweep_dir / "study.json").write_text(json.dumps(pointer, indent=1))
    return study


def submit_workers(cfg: StudyConfig, args: list[str]) -> None:
    """One submitit job per worker, each running ``moe-sweep`` with one local worker."""
    import submitit

    from moe.sweep.workers import threads_per_worker

    cluster = "local" if cfg.launcher == "submitit_local" else "slurm"
    executor = submitit.AutoExecutor(folder=cfg.sweep_dir / ".submitit" / "%j", cluster=cluster)
    if cluster == "slurm":
        slurm = cfg.slurm
        executor.update_parameters(
            timeout_min=slurm.timeout_min,
            gpus_per_node=slurm.gpus_per_node,
            cpus_per_task=slurm.cpus_per_task,
            mem_gb=slurm.mem_gb,
            slurm_partition=slurm.partition,
        )
    else:
        executor.update_parameters(timeout_min=cfg.slurm.timeout_min)
    keep = [a for a in args if not a.startswith(("optuna.launcher=", "optuna.workers="))]
    command = [sys.executable, "-m", "moe.cli.sweep", *keep, "optuna.launcher=local"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads_per_worker(cfg.workers))}
    fn = submitit.helpers.CommandFunction(command, env=env if cluster == "local" else None)
    jobs = [executor.submit(fn) for _ in range(cfg.workers)]
    print(f"{PROGRAM}: submitted {len(jobs)} worker jobs: {' '.join(j.job_id for j in jobs)}")
    try:
        for job in jobs:
            job.result()
    except BaseException:
        for job in jobs:
            job.cancel(check=False)
        raise


def run_local(cfg: StudyConfig, study, space: dict, base: list[str]) -> None:
    from moe.sweep.workers import Sweep

    sweep = Sweep(cfg, study, space, base)

    def stop(signum, frame):
        if sweep.stop.is_set():  # a second signal: do not wait for checkpoints
            raise KeyboardInterrupt
        print(
            f"{PROGRAM}: {signal.Signals(signum).name}: stopping the running trials after "
            "their current step (they checkpoint)",
            file=sys.stderr,
        )
        sweep.stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, stop)
    sweep.run()
    if sweep.stop.is_set():
        fail("stopped; run the same command again to continue the study", EXIT_PREEMPTED)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        return
    cfg, space, base = check_args(args)
    cfg.sweep_dir.mkdir(parents=True, exist_ok=True)
    study = open_checked(cfg, base)
    if cfg.launcher == "local":
        run_local(cfg, study, space, base)
    else:
        submit_workers(cfg, args)
    best = write_study_report(cfg.sweep_dir)
    print(best)


if __name__ == "__main__":
    main()
