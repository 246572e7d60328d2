"""``init_from=PATH``: a new run that starts from another model's weights.

PATH is a Hugging Face model directory of a family ``moe.hf`` reads (Qwen3-MoE, Qwen2-MoE,
Mixtral, OLMoE, DeepSeek-V3, dense Llama / Qwen3) or one of our checkpoints or run
directories. The model's shape and routing (every ``model`` key but the training-time ones
below) and the tokenizer come from PATH; the optimizer starts fresh at step 0. Unlike
``resume``, nothing else is read. A preempted run continues with ``resume=auto`` as any
other.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from moe.checkpoint import load_checkpoint, load_tokenizer, model_config, resolve_checkpoint
from moe.hf import is_hf_directory, read_hf_config
from moe.hf.families import model_config as hf_model_config
from moe.hf.reading import build_from_hf
from moe.model import ModelConfig, MoETransformer
from moe.parallel.world import World, shard_model
from moe.typed_config import ConfigError

# model.moe keys that only change how the layer trains, not what the weights mean.
TRAINING_TIME_MOE_KEYS = ("capacity_factor", "capacity_priority", "balance", "backend", "jitter")


@dataclass(frozen=True)
class Source:
    path: Path
    model: ModelConfig
    tokenizer: Tokenizer
    hugging_face: bool


def read_source(init_from: str) -> Source:
    """The source's model config and tokenizer (its weights are read later, into the model)."""
    path = Path(init_from)
    try:
        if is_hf_directory(path):
            model = hf_model_config(read_hf_config(path), str(path / "config.json"))
            return Source(path, model, load_tokenizer(path), True)
        checkpoint = resolve_checkpoint(path)
        return Source(checkpoint, model_config(checkpoint), load_tokenizer(checkpoint), False)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"init_from={init_from}: {err}") from None


def run_model_config(source: Source, run: ModelConfig, tokenizer_size: int) -> ModelConfig:
    """The source's model config with this run's training-time MoE keys."""
    if tokenizer_size > source.model.vocab_size:
        raise ConfigError(
            f"init_from={source.path}: its tokenizer has {tokenizer_size} ids but the model "
            f"only {source.model.vocab_size} embeddings; the tokenizer does not match the model"
        )
    keep = {key: getattr(run.moe, key) for key in TRAINING_TIME_MOE_KEYS}
    return dataclasses.replace(source.model, moe=dataclasses.replace(source.model.moe, **keep))


def build_run_model(
    model_cfg: ModelConfig, source: Source | None, world: World, device: torch.device
) -> MoETransformer:
    """This rank's share of the run's model on ``device``: fresh, or with the source's
    weights, of which each rank reads only its own experts (a Hugging Face model is cut
    before it is allocated; our checkpoint's shards are read after)."""
    if source is not None and source.hugging_face:
        shard = functools.partial(shard_model, world=world)
        return build_from_hf(model_cfg, source.path, shard).to(device)
    model = shard_model(MoETransformer(model_cfg), world).to(device)
    if source is not None:
        load_checkpoint(source.path, model, world=world)
    return model
