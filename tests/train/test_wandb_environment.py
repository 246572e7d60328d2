"""Weights & Biases: the standard environment variables fill the keys the config leaves
null; a key set in the config wins."""

import pytest

from moe.train.config import WandbSection
from moe.train.metrics import MetricsLog
from moe.typed_config import ConfigError


def test_environment_fills_null_keys_and_config_wins():
    env = {
        "WANDB_MODE": "disabled",
        "WANDB_PROJECT": "p",
        "WANDB_ENTITY": "team",
        "WANDB_RUN_GROUP": "g",
        "WANDB_DIR": "/tmp/w",
    }
    assert WandbSection().resolved(env) == WandbSection(
        mode="disabled", project="p", entity="team", group="g", dir="/tmp/w"
    )
    assert WandbSection().resolved({}) == WandbSection(mode="offline", project="moe-train")
    mine = WandbSection(mode="offline", project="q", group="h")
    assert mine.resolved(env) == WandbSection(
        mode="offline", project="q", entity="team", group="h", dir="/tmp/w"
    )
    assert WandbSection().resolved({"WANDB_MODE": "dryrun"}).mode == "offline"
    with pytest.raises(ConfigError, match="WANDB_MODE='maybe'"):
        WandbSection().resolved({"WANDB_MODE": "maybe"})


@pytest.mark.parametrize(
    "env_mode, config_mode, writes",
    [("disabled", None, False), ("offline", "disabled", False), ("offline", None, True)],
)
def test_wandb_directory_follows_the_precedence(
    tmp_path, monkeypatch, env_mode, config_mode, writes
):
    monkeypatch.setenv("WANDB_MODE", env_mode)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    log = MetricsLog(tmp_path, WandbSection(mode=config_mode), {}, enabled=True)
    log.write({"step": 1, "loss": 1.0})
    log.close()
    assert (tmp_path / "wandb").exists() == writes
