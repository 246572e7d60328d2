"""``moe-eval checkpoint=PATH [data.path=...] [eval.batches=N] [device=cpu]``: the
checkpoint's validation loss, computed exactly as the trainer does, as one JSON line."""

from __future__ import annotations

import dataclasses
import json
import sys

import torch
from omegaconf import OmegaConf

from moe.checkpoint import (
    CheckpointError,
    load_model,
    load_tokenizer,
    read_config,
    resolve_checkpoint,
)
from moe.data import build_data
from moe.parallel.world import pick_device
from moe.train.config import RunConfig
from moe.train.evaluate import evaluate
from moe.train.micro_batch import resolve_micro_batch
from moe.typed_config import ConfigError

from .errors import fail, key_values

PROGRAM = "moe-eval"


def main(argv: list[str] | None = None) -> None:
    overrides = key_values(sys.argv[1:] if argv is None else argv, PROGRAM)
    if "checkpoint" not in overrides:
        fail(PROGRAM, "checkpoint=PATH is required")
    try:
        path = resolve_checkpoint(overrides.pop("checkpoint"))
        merged = OmegaConf.merge(OmegaConf.create(read_config(path)), overrides)
        cfg = RunConfig.from_dict(OmegaConf.to_container(merged))
        if cfg.train.micro_batch_size == "auto":  # stored configs hold the number used
            t = cfg.train
            micro = resolve_micro_batch("auto", t.global_batch_size, 1, t.seq_len)
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(t, micro_batch_size=micro))
        device = pick_device(cfg.device)
        model = load_model(path, device)
        data = build_data(cfg.data, cfg.train.seq_len, load_tokenizer(path), model_dir=path)
    except (ConfigError, CheckpointError, FileNotFoundError) as err:
        fail(PROGRAM, str(err))
    with torch.no_grad():
        loss = evaluate(model, data.val, cfg, device)
    step = json.loads((path / "complete.json").read_text())["step"]
    sequences = cfg.eval.batches * cfg.train.micro_batch_size
    print(json.dumps({"loss": loss, "step": step, "checkpoint": str(path), "sequences": sequences}))


if __name__ == "__main__":
    main()
