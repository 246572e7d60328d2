"""``moe-train`` (= ``python -m moe.train``): parse config -> build -> train -> close.

The config is composed and validated before Hydra starts the job, so a bad key or value is
one line on stderr and exit code 2, with nothing built. Multirun (``-m``) validates each
job as it starts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from importlib import resources
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from moe.checkpoint import CheckpointError, write_text_atomic
from moe.model import ModelConfig
from moe.train.config import RunConfig
from moe.train.faults import EXIT_NUMERICAL, EXIT_PREEMPTED, NumericalFault, Preempted
from moe.typed_config import ConfigError, declared_defaults

from . import errors

PROGRAM = "moe-train"

CONFIG_DIR = str(resources.files("moe.configs"))

# Arithmetic the config files interpolate (configs/experiment/expert_scaling.yaml keeps
# top_k x d_ff fixed while E varies)...
OmegaConf.register_new_resolver("moe.min", lambda *values: min(values), replace=True)
OmegaConf.register_new_resolver("moe.floordiv", lambda a, b: a // b, replace=True)
# ...and E=1 keeps a softmax router, whose gate is exactly 1: the dense model plus a router.
OmegaConf.register_new_resolver("moe.if_one", lambda n, a, b: a if n == 1 else b, replace=True)
# Every model key with its declared default, under the presets (their `defaults: [schema]`),
# so that any key of moe/model/config.py and moe/layers/config.py can be overridden.
ConfigStore.instance().store(group="model", name="schema", node=declared_defaults(ModelConfig))


def to_run_config(cfg: DictConfig) -> RunConfig:
    job_keys = [key for key in cfg if key != "hydra"]
    if "optuna" in job_keys:
        raise ConfigError(
            "an Optuna sweep file is run by moe-sweep, not moe-train: "
            "moe-sweep +sweep=<its name> [overrides]"
        )
    return RunConfig.from_dict(
        OmegaConf.to_container(OmegaConf.masked_copy(cfg, job_keys), resolve=True)
    )


def fail(message: str) -> None:
    errors.fail(PROGRAM, message)


def validate_overrides(overrides: list[str]) -> None:
    """Compose the config as the run will and validate it; exits 2 on the first problem."""
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(CONFIG_DIR, version_base=None):
            composed = compose("train", overrides=overrides, return_hydra_config=True)
            run_cfg = to_run_config(composed)
            check_writable(Path(composed.hydra.run.dir), "hydra.run.dir")
            if run_cfg.init_from != "none":
                check_init_from_overrides(overrides, run_cfg)
    except ConfigError as err:
        fail(str(err))
    except Exception as err:  # Hydra/OmegaConf: unknown key, bad override syntax, ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        fail(first)


def check_init_from_overrides(overrides: list[str], run_cfg: RunConfig) -> None:
    """With ``init_from`` the model comes from the source: an override that says otherwise
    is refused (the training-time MoE keys excepted)."""
    from moe.train.init_from import TRAINING_TIME_MOE_KEYS, read_source

    source = read_source(run_cfg.init_from)
    for arg in overrides:
        key = arg.lstrip("+~").split("=", 1)[0]
        if key == "model":
            raise ConfigError(
                f"{arg} chooses a model, but init_from={run_cfg.init_from} brings its own; "
                "drop the model= override"
            )
        if not key.startswith("model.") or key.removeprefix("model.moe.") in TRAINING_TIME_MOE_KEYS:
            continue
        mine, theirs = run_cfg.model, source.model
        for part in key.split(".")[1:]:
            mine, theirs = getattr(mine, part, None), getattr(theirs, part, None)
        if mine != theirs and key != "model.vocab_size":
            raise ConfigError(
                f"{arg} contradicts init_from={run_cfg.init_from}, whose {key} is {theirs}; "
                "drop the override (the model comes from the source)"
            )


def check_writable(path: Path, key: str) -> None:
    """The run directory must be creatable: its nearest existing ancestor a writable dir."""
    ancestor = path.absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"{key}={path} cannot be created: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={path} is not writable ({ancestor}); choose another directory")


def format_summary(summary: dict) -> str:
    rows = [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in summary.items()]
    width = max(len(k) for k, _ in rows)
    return "\n".join(["run summary:"] + [f"  {k:<{width}}  {v}" for k, v in rows])


def write_status(run_dir: Path, status: str, **extra) -> None:
    """``status.json``: running, finished or failed; sweep reports read it (rank 0 writes)."""
    if os.environ.get("RANK", "0") != "0":
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "status.json", json.dumps({"status": status, **extra}))


def finished_summary(run_dir: Path, run_cfg: RunConfig) -> dict | None:
    """The summary of a run that already reached ``train.max_steps`` (for resumed sweeps)."""
    path = run_dir / "summary.json"
    if not path.exists():
        return None
    try:
        summary = json.loads(path.read_text())
    except ValueError:  # cut short by a kill (before writes were atomic): not finished
        return None
    return summary if summary.get("steps", 0) >= run_cfg.train.max_steps else None


def in_sweep(run_cfg: RunConfig) -> RunConfig:
    """In a multirun every job gets its own W&B run, grouped by the sweep directory."""
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return run_cfg
    sweep = Path(hc.sweep.dir).name
    wandb = dataclasses.replace(
        run_cfg.logger.wandb,
        group=run_cfg.logger.wandb.group or os.environ.get("WANDB_RUN_GROUP") or sweep,
        name=run_cfg.logger.wandb.name or f"{sweep}-{hc.job.num}",
    )
    return dataclasses.replace(run_cfg, logger=dataclasses.replace(run_cfg.logger, wandb=wandb))


@hydra.main(config_path=CONFIG_DIR, config_name="train", version_base=None)
def hydra_app(cfg: DictConfig) -> float | None:
    from moe.train.trainer import Trainer

    try:
        run_cfg = in_sweep(to_run_config(cfg))
    except ConfigError as err:
        fail(str(err))
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if run_cfg.resume == "auto" and (done := finished_summary(run_dir, run_cfg)):
        print(f"{run_dir}: already finished at step {done['steps']}; skipped")
        return done["val_loss"]
    write_status(run_dir, "running")
    try:
        trainer = Trainer(run_cfg, run_dir)
    except ConfigError as err:
        write_status(run_dir, "failed", error=str(err))
        fail(str(err))
    together = False  # whether every rank stops here with this one (see Trainer.close)
    try:
        summary = trainer.train()
        together = True
    except Preempted as err:
        together = True
        write_status(run_dir, "preempted", error=str(err))
        print(f"moe-train: {err}", file=sys.stderr)
        sys.exit(EXIT_PREEMPTED)
    except (NumericalFault, CheckpointError) as err:
        together = isinstance(err, NumericalFault)  # decided on rank-averaged numbers
        write_status(run_dir, "failed", error=str(err))
        errors.fail(PROGRAM, str(err), EXIT_NUMERICAL if isinstance(err, NumericalFault) else 1)
    except BaseException as err:
        write_status(run_dir, "failed", error=f"{type(err).__name__}: {err}".splitlines()[0])
        raise
    finally:
        trainer.close(together)
    write_status(run_dir, "finished")
    if os.environ.get("RANK", "0") != "0":
        return summary["val_loss"]
    print(format_summary(summary))
    (run_dir / "run_config.json").write_text(json.dumps(dataclasses.asdict(trainer.cfg), indent=1))
    return summary["val_loss"]  # what a Hydra sweeper minimises


def main() -> None:
    args = sys.argv[1:]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not any(
        a.startswith(("hydra.run.dir=", "-m", "--multirun")) for a in args
    ):  # each rank would otherwise stamp its own time into the run directory's name
        from moe.parallel.world import shared_run_dir

        args.append(f"hydra.run.dir={shared_run_dir()}")
        sys.argv.append(args[-1])
    if not any(a.startswith("-") for a in args):  # flags such as -m, --cfg, --help
        validate_overrides(args)
    hydra_app()


if __name__ == "__main__":
    main()
