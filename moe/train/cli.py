"""``moe-train`` (= ``python -m moe.train``): parse config -> build -> train -> close.

The config is composed and validated before Hydra starts the job, so a bad key or value is
one line on stderr and exit code 2, with nothing built. Multirun (``-m``) validates each
job as it starts.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from importlib import resources
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from .config import ConfigError, RunConfig

CONFIG_DIR = str(resources.files("moe.configs"))


def to_run_config(cfg: DictConfig) -> RunConfig:
    values = OmegaConf.to_container(cfg, resolve=True)
    values.pop("hydra", None)
    return RunConfig.from_dict(values)


def fail(message: str) -> None:
    print(f"moe-train: error: {message}", file=sys.stderr)
    sys.exit(2)


def validate_overrides(overrides: list[str]) -> None:
    """Compose the config as the run will and validate it; exits 2 on the first problem."""
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(CONFIG_DIR, version_base=None):
            to_run_config(compose("train", overrides=overrides))
    except ConfigError as err:
        fail(str(err))
    except Exception as err:  # Hydra/OmegaConf: unknown key, bad override syntax, ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        fail(first)


def format_summary(summary: dict) -> str:
    rows = [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in summary.items()]
    width = max(len(k) for k, _ in rows)
    return "\n".join(["run summary:"] + [f"  {k:<{width}}  {v}" for k, v in rows])


@hydra.main(config_path=CONFIG_DIR, config_name="train", version_base=None)
def hydra_app(cfg: DictConfig) -> float | None:
    from .trainer import Trainer

    try:
        run_cfg = to_run_config(cfg)
    except ConfigError as err:
        fail(str(err))
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        trainer = Trainer(run_cfg, run_dir)
    except ConfigError as err:
        fail(str(err))
    try:
        summary = trainer.train()
    finally:
        trainer.close()
    print(format_summary(summary))
    (run_dir / "run_config.json").write_text(json.dumps(dataclasses.asdict(trainer.cfg), indent=1))
    return summary["val_loss"]  # what a Hydra sweeper minimises


def main() -> None:
    args = sys.argv[1:]
    if not any(a.startswith("-") for a in args):  # flags such as -m, --cfg, --help
        validate_overrides(args)
    hydra_app()


if __name__ == "__main__":
    main()
