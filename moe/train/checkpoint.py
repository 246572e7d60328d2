"""Checkpoints with ``torch.distributed.checkpoint`` (sharded and reshardable; it works in
one process too), written atomically.

Layout of ``<run>/checkpoints/step_<N>/``: DCP shards of the model, the optimizer, the
step, the data position and the RNG states; ``config.json`` (the run's resolved config);
``tokenizer.json``; and ``complete.json``, written last. A checkpoint is first written
under ``.step_<N>.tmp`` and renamed into place, so a crash never leaves a half-written
``step_<N>``; ``resume=auto`` also ignores any directory without ``complete.json``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

STEP_DIR = re.compile(r"^step_(\d+)$")
COMPLETE = "complete.json"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = STEP_DIR.match(path.name)
        if match and (path / COMPLETE).exists():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_position: int,
    extra_files: dict[str, str],
    keep: int,
) -> Path:
    """Write ``checkpoints/step_<step>`` atomically and prune to the newest ``keep``."""
    root = run_dir / "checkpoints"
    final = root / f"step_{step}"
    tmp = root / f".step_{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {
        "model": model_sd,
        "optim": optim_sd,
        "progress": {"step": torch.tensor(step), "data_position": torch.tensor(data_position)},
        "rng": _rng_state(),
    }
    with warnings.catch_warnings():  # DCP warns that it runs without a process group
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, checkpoint_id=tmp)
    for name, text in extra_files.items():
        (tmp / name).write_text(text)
    (tmp / COMPLETE).write_text(json.dumps({"step": step}))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in complete_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, int]:
    """Restore model (and optimizer, RNG) in place; returns ``step`` and ``data_position``."""
    if optimizer is None:
        state = {"model": model.state_dict()}
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {
            "model": model_sd,
            "optim": optim_sd,
            "progress": {"step": torch.tensor(0), "data_position": torch.tensor(0)},
            "rng": _rng_state(),
        }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=path)
    if optimizer is None:
        model.load_state_dict(state["model"])
        return {}
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )
    torch.set_rng_state(state["rng"]["cpu"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["rng"]["cuda"])
    return {k: int(v) for k, v in state["progress"].items()}


def read_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())
