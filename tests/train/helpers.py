"""Small runs for trainer tests: a generated text file and a composed config."""

from __future__ import annotations

import random
from pathlib import Path

from hydra import compose, initialize_config_dir

from moe.cli.train import CONFIG_DIR, to_run_config
from moe.train.config import RunConfig

WORDS = [
    "the",
    "router",
    "sends",
    "each",
    "token",
    "to",
    "an",
    "expert",
    "and",
    "the",
    "expert",
    "returns",
    "a",
    "vector",
    "while",
    "the",
    "residual",
    "stream",
    "carries",
    "what",
    "was",
    "dropped",
    "along",
    "the",
    "sequence",
]


def write_corpus(path: Path, docs: int = 60, seed: int = 0) -> Path:
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 80))) for _ in range(docs)]
    path.write_text("\n".join(lines))
    return path


def small_overrides(tmp_path: Path, **extra) -> list[str]:
    corpus = (
        write_corpus(tmp_path / "corpus.txt")
        if not (tmp_path / "corpus.txt").exists()
        else tmp_path / "corpus.txt"
    )
    values = {
        "data.path": str(corpus),
        "data.cache_dir": str(tmp_path / "cache"),
        "train.seq_len": 32,
        "train.global_batch_size": 8,
        "train.micro_batch_size": 4,
        "train.max_steps": 12,
        "train.log_every": 1,
        "eval.every": 6,
        "eval.batches": 2,
        "checkpoint.every": 6,
        "logger.wandb.mode": "disabled",
        "logger.progress_bar": False,
        "model.d_model": 32,
        "model.n_layers": 2,
        "model.n_heads": 2,
        "model.n_kv_heads": 1,
        "model.d_ff": 64,
        "model.moe.d_ff": 32,
        "model.moe.num_experts": 4,
        "model.moe.top_k": 2,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def small_config(tmp_path: Path, **extra) -> RunConfig:
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        return to_run_config(compose("train", overrides=small_overrides(tmp_path, **extra)))
