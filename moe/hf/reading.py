"""Reading a Hugging Face model directory of a supported family into our model.

Weights stream tensor by tensor from the safetensors shards (``model.safetensors`` or the
shards its ``model.safetensors.index.json`` lists): no copy of the checkpoint is held beyond
the tensor being copied, and under expert parallelism each process allocates and reads only
its own experts. Every weight of our model must be found, and every weight found
must be ours: a missing or unexpected tensor, a truncated shard or a shape that disagrees
is one error that names it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from moe.model import ModelConfig, MoETransformer

from .families import Family, UnsupportedModel, family_of, model_config
from .weights import weight_table


def is_hf_directory(path: str | Path) -> bool:
    """A directory with a Hugging Face ``config.json`` (and not one of our checkpoints)."""
    path = Path(path)
    return (path / "config.json").is_file() and not (path / "complete.json").exists()


def read_hf_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model directory")
    try:
        return json.loads(config.read_text())
    except ValueError as err:
        raise UnsupportedModel(f"{config} is not valid JSON ({err})") from None


def shard_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        shards = [path / name for name in names]
    else:
        shards = [path / "model.safetensors"]
    if missing := [s.name for s in shards if not s.is_file()]:
        raise FileNotFoundError(f"{path} lacks the weight file(s) {', '.join(missing)}")
    return shards


def read_hf_model(path: str | Path) -> MoETransformer:
    """Our model holding the weights of the Hugging Face directory ``path``, in eval mode."""
    path = Path(path)
    config = model_config(read_hf_config(path), str(path / "config.json"))
    return build_from_hf(config, path).eval()


def build_from_hf(
    config: ModelConfig,
    path: str | Path,
    shard: Callable[[MoETransformer], MoETransformer] = lambda model: model,
) -> MoETransformer:
    """Our model of ``config`` (which the directory's ``config.json`` implies) holding the
    directory's weights, cut by ``shard`` (expert parallelism: this rank's experts). It is
    built on the meta device and allocated after ``shard``, so a process holds only what it
    keeps, never the whole model."""
    with torch.device("meta"):
        model = shard(MoETransformer(config))
    model = model.to_empty(device="cpu")
    if config.tie_embeddings:  # to_empty allocates the tied weight twice; tie it again
        model.lm_head.weight = model.embed.weight
    with torch.no_grad():
        for buffer in model.buffers():  # expert biases: read below where the family has them
            buffer.zero_()
    model.reset_rotary_tables()
    load_hf_weights(model, path)
    return model


@torch.no_grad()
def load_hf_weights(model: MoETransformer, path: str | Path) -> None:
    """Copy the directory's weights into ``model`` (whose config it must imply), one tensor
    at a time."""
    path = Path(path)
    family = family_of(read_hf_config(path), str(path / "config.json"))
    table = weight_table(model, family)
    for shard in shard_files(path):
        try:
            with safe_open(str(shard), framework="pt") as weights:
                for name in weights.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                    if _skipped(name, family, model.config.n_layers):
                        continue
                    _copy(table, name, weights.get_tensor(name), model, shard)
        except (OSError, SafetensorError) as err:
            raise UnsupportedModel(f"cannot read {shard}: {err} (truncated or corrupt?)") from None
    if table:
        names = sorted(table)
        raise UnsupportedModel(
            f"{path} lacks {len(names)} weight(s) of a {family.model_type} model, e.g. "
            f"{names[0]} (an incomplete download?)"
        )


def _skipped(name: str, family: Family, n_layers: int) -> bool:
    """A layer past the last block that the family's own model skips (DeepSeek-V3's
    multi-token-prediction layers)."""
    layer = re.match(r"model\.layers\.(\d+)\.", name)
    return family.skips_extra_layers and layer is not None and int(layer.group(1)) >= n_layers


def _copy(table: dict, name: str, tensor: torch.Tensor, model: MoETransformer, shard: Path):
    if name == "lm_head.weight" and model.config.tie_embeddings:
        return  # tied: the embedding holds it
    if name in table and table[name] is None:
        del table[name]  # an expert another rank holds
        return
    target = table.pop(name, None)
    if target is None:
        raise UnsupportedModel(
            f"{shard.name} holds {name}, which a model we can represent does not have "
            "(an option this family uses that we do not support)"
        )
    if target.shape != tensor.shape:
        raise UnsupportedModel(
            f"{name}: shape {tuple(tensor.shape)} in {shard.name}, config.json implies "
            f"{tuple(target.shape)}"
        )
    target.copy_(tensor)
