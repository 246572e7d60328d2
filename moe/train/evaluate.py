"""``moe-eval checkpoint=PATH [data.path=...] [eval.batches=N] [device=cpu]``: the
checkpoint's validation loss, computed exactly as the trainer does, as one JSON line."""

from __future__ import annotations

import dataclasses
import json
import sys

import torch
from omegaconf import OmegaConf

from moe.api import load_model, load_tokenizer, resolve_checkpoint
from moe.train.checkpoint import CheckpointError, read_config

from .config import ConfigError, RunConfig
from .data import build_data
from .micro_batch import resolve_micro_batch
from .trainer import evaluate, pick_device


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    try:
        overrides = dict(a.split("=", 1) for a in args)
    except ValueError:
        print("moe-eval: error: arguments are key=value, e.g. checkpoint=PATH", file=sys.stderr)
        sys.exit(2)
    if "checkpoint" not in overrides:
        print("moe-eval: error: checkpoint=PATH is required", file=sys.stderr)
        sys.exit(2)
    try:
        path = resolve_checkpoint(overrides.pop("checkpoint"))
        stored = OmegaConf.create(read_config(path))
        merged = OmegaConf.merge(
            stored, OmegaConf.from_dotlist([f"{k}={v}" for k, v in overrides.items()])
        )
        cfg = RunConfig.from_dict(OmegaConf.to_container(merged))
        if cfg.train.micro_batch_size == "auto":  # stored configs hold the number used
            t = cfg.train
            micro = resolve_micro_batch("auto", t.global_batch_size, 1, t.seq_len)
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(t, micro_batch_size=micro))
        device = pick_device(cfg.device)
        model = load_model(path, device)
        data = build_data(cfg.data, cfg.train.seq_len, tokenizer=load_tokenizer(path))
    except (ConfigError, CheckpointError, FileNotFoundError) as err:
        print(f"moe-eval: error: {err}", file=sys.stderr)
        sys.exit(2)
    with torch.no_grad():
        loss = evaluate(model, data.val, cfg, device)
    step = json.loads((path / "complete.json").read_text())["step"]
    print(
        json.dumps(
            {
                "loss": loss,
                "step": step,
                "checkpoint": str(path),
                "sequences": cfg.eval.batches * cfg.train.micro_batch_size,
            }
        )
    )


if __name__ == "__main__":
    main()
