"""``moe-export`` and ``moe-upcycle``: key=value arguments, one JSON line of results.

    moe-export checkpoint=RUN_OR_CKPT out=DIR format=hf [dtype=bfloat16] [max_shard_gb=5]
    moe-export checkpoint=... out=DIR format=experts [layers=[1,3]] [experts=[0,5]]
    moe-export checkpoint=... out=DIR format=pruned keep=4 [as=hf]     # or experts=[0,2,5,7]
    moe-upcycle source=DENSE_CKPT_OR_HF_DIR out=DIR num_experts=8 [top_k=2]
                [gate_mode=renormalize] [moe_every=1]

Common options: ``calib_sequences=64`` (validation sequences used for routing statistics),
``data.path=...`` (calibration text other than the run's), ``device=cpu``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch

from moe.checkpoint import (
    CheckpointError,
    load_model,
    load_tokenizer,
    read_config,
    resolve_checkpoint,
    save_model_checkpoint,
)
from moe.data import build_data
from moe.export.experts import export_experts
from moe.export.hf import UnsupportedExport, export_hf
from moe.export.prune import most_used, prune_experts
from moe.export.routing import routing_stats
from moe.export.upcycle import dense_from_hf, upcycle
from moe.layers import MoEConfig
from moe.train.config import RunConfig
from moe.train.evaluate import evaluate
from moe.typed_config import ConfigError

from .errors import fail, key_values


def run_config(path: Path, data_override: dict | None) -> RunConfig:
    stored = read_config(path)
    if data_override:
        stored["data"].update(data_override)
    return RunConfig.from_dict(stored)


def export_main(argv: list[str] | None = None) -> None:
    args = key_values(sys.argv[1:] if argv is None else argv, "moe-export")
    for key in ("checkpoint", "out"):
        if key not in args:
            fail("moe-export", f"{key}=PATH is required")
    fmt = args.get("format", "hf")
    if fmt not in ("hf", "experts", "pruned"):
        fail("moe-export", f"format must be hf, experts or pruned, got {fmt!r}")
    try:
        path = resolve_checkpoint(args["checkpoint"])
        cfg = run_config(path, args.get("data"))
        model = load_model(path, args.get("device", "cpu"))
        tokenizer = load_tokenizer(path)
        out = Path(args["out"])
        result = {"format": fmt, "checkpoint": str(path), "out": str(out)}
        if fmt == "hf":
            export_hf(model, tokenizer, out, *hf_options(args))
        else:
            data = build_data(cfg.data, cfg.train.seq_len, tokenizer, model_dir=path)
            stats = routing_stats(model, data.val, int(args.get("calib_sequences", 64)))
            if fmt == "experts":
                manifest = export_experts(
                    model, stats, out, args.get("layers"), args.get("experts"), str(path)
                )
                result["files"] = len(manifest["experts"])
            else:
                result.update(prune(model, tokenizer, cfg, data, stats, args, out))
    except (ConfigError, CheckpointError, UnsupportedExport, FileNotFoundError, ValueError) as err:
        fail("moe-export", str(err))
    print(json.dumps(result))


def hf_options(args: dict) -> tuple[torch.dtype, int]:
    """``dtype`` of the written weights (float32, lossless, or bfloat16, half the size) and
    the largest safetensors file, ``max_shard_gb`` (default 5, as transformers shards)."""
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    dtype = args.get("dtype", "float32")
    if dtype not in dtypes:
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    shard_gb = float(args.get("max_shard_gb", 5))
    if not shard_gb > 0:
        raise ValueError(f"max_shard_gb must be > 0, got {shard_gb}")
    return dtypes[dtype], int(shard_gb * 10**9)


def prune(model, tokenizer, cfg: RunConfig, data, stats, args: dict, out: Path) -> dict:
    if "experts" in args:
        keep = {s.block: sorted(args["experts"]) for s in stats}
    elif "keep" in args:
        keep = most_used(stats, int(args["keep"]))
    else:
        raise ValueError("format=pruned needs keep=N or experts=[...]")
    pruned = prune_experts(model, keep)
    before = evaluate(model, data.val, cfg, torch.device("cpu"))
    pruned_cfg = dataclasses.replace(cfg, model=pruned.config)
    after = evaluate(pruned, data.val, pruned_cfg, torch.device("cpu"))
    if args.get("as", "checkpoint") == "hf":
        export_hf(pruned, tokenizer, out, *hf_options(args))
    else:
        save_model_checkpoint(
            out,
            pruned,
            {
                "config.json": json.dumps(dataclasses.asdict(pruned_cfg), indent=1),
                "tokenizer.json": tokenizer.to_str(),
            },
        )
    return {
        "kept": {str(k): v for k, v in keep.items()},
        "val_loss_before": before,
        "val_loss_after": after,
    }


def upcycle_main(argv: list[str] | None = None) -> None:
    args = key_values(sys.argv[1:] if argv is None else argv, "moe-upcycle")
    for key in ("source", "out", "num_experts"):
        if key not in args:
            fail("moe-upcycle", f"{key}=... is required")
    source = Path(args["source"])
    try:
        moe = MoEConfig(
            num_experts=int(args["num_experts"]),
            top_k=int(args.get("top_k", 1)),
            gate_mode=args.get("gate_mode", "renormalize"),
        )
        if (source / "config.json").exists() and not (source / "complete.json").exists():
            dense = dense_from_hf(source)
            tokenizer_json = (
                (source / "tokenizer.json").read_text()
                if (source / "tokenizer.json").exists()
                else None
            )
            run = RunConfig(model=dense.config)
        else:
            path = resolve_checkpoint(source)
            dense, tokenizer_json = load_model(path), load_tokenizer(path).to_str()
            run = RunConfig.from_dict(read_config(path))
        model = upcycle(dense, moe, int(args.get("moe_every", 1)))
    except (
        ConfigError,
        CheckpointError,
        UnsupportedExport,
        FileNotFoundError,
        ValueError,
        KeyError,
    ) as err:
        fail("moe-upcycle", str(err))
    files = {
        "config.json": json.dumps(
            dataclasses.asdict(dataclasses.replace(run, model=model.config)), indent=1
        )
    }
    if tokenizer_json is not None:
        files["tokenizer.json"] = tokenizer_json
    save_model_checkpoint(Path(args["out"]), model, files)
    counts = model.parameter_counts()
    print(
        json.dumps(
            {"out": args["out"], "params_total": counts["total"], "params_active": counts["active"]}
        )
    )
