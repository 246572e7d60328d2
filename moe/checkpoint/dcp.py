"""Checkpoints with ``torch.distributed.checkpoint`` (sharded and reshardable; it works in
one process too), written atomically.

Layout of ``<run>/checkpoints/step_<N>/``: DCP shards of the model, the optimizer, the
step, the data position and the RNG states; ``config.json`` (the run's resolved config);
``tokenizer.json``; and ``complete.json``, the manifest of every file's size and sha256,
written last. A checkpoint is written under ``.step_<N>.tmp``, synced to disk, then renamed
into place, so a crash never leaves a half-written ``step_<N>``. Loading verifies the
manifest and refuses a ``.metadata`` pickle that references anything but DCP's metadata
classes; ``resume=auto`` skips (with a warning) every checkpoint that fails and takes the
newest good one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from moe.parallel.world import World

from .files import (
    MANIFEST,
    CheckpointError,
    check_metadata_pickle,
    fsync_dir,
    fsync_tree,
    verify_manifest,
    write_manifest,
)

STEP_DIR = re.compile(r"^step_(\d+)$")
COMPLETE = MANIFEST
log = logging.getLogger(__name__)


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


def newest_good_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint that passes verification; warns about each one skipped."""
    for path in reversed(complete_checkpoints(run_dir)):
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as err:
            log.warning("skipping checkpoint: %s", err)
            warnings.warn(f"skipping checkpoint: {err}", stacklevel=2)
    return None


def verify_checkpoint(path: Path) -> int:
    step = verify_manifest(path)
    check_metadata_pickle(path)
    return step


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save_checkpoint(
    run_dir: Path,
    step: int,
    engine,
    data_position: int,
    extra_files: dict[str, str],
    keep: int,
    world: World | None = None,
) -> Path:
    """Write ``checkpoints/step_<step>`` atomically and prune to the newest ``keep``.

    ``engine`` (``moe.train.engine``) supplies the model and optimizer state dicts. In a
    multi-process ``world`` every rank calls this: each writes its own expert rows (its
    ``ExpertShards`` makes them DTensors), and the main rank the replicated rest, the extra
    files and the manifest, then moves the directory into place.
    On failure (a full disk, say) on any rank, the partial directory is removed, earlier
    checkpoints are untouched, and every rank raises ``CheckpointError``.
    """
    root = run_dir / "checkpoints"
    final = root / f"step_{step}"
    tmp = root / f".step_{step}.tmp"
    world = world or World()
    shards, writer = world.shards, world.main
    model_sd, optim_sd = engine.state_dicts()
    if shards is not None:
        model_sd, optim_sd = shards.distribute(model_sd, optim_sd)
    state = {
        "model": model_sd,
        "optim": optim_sd,
        "progress": {"step": torch.tensor(step), "data_position": torch.tensor(data_position)},
        "rng": _rng_state(),
    }

    def prepare():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)

    def finish():
        for name, text in extra_files.items():
            (tmp / name).write_text(text)
        write_manifest(tmp, step)
        fsync_tree(tmp)

    def shards_of_every_rank():
        _dcp_save(state, tmp, distributed=shards is not None)

    # After each phase every rank learns whether any failed: none waits for a failed one.
    for phase, mine in [(prepare, writer), (shards_of_every_rank, True), (finish, writer)]:
        error = None
        if mine:
            try:
                phase()
            except (OSError, CheckpointException) as err:
                error = err
        if world.any(error is not None):
            if writer:
                shutil.rmtree(tmp, ignore_errors=True)
            kept = complete_checkpoints(run_dir)
            previous = f"; {kept[-1].name} is intact" if kept else ""
            reason = error or "another rank could not write its part"
            raise CheckpointError(f"could not write checkpoint step_{step}: {reason}{previous}")
    if writer:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fsync_dir(root)
        for old in complete_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    world.barrier()  # nobody goes on before the checkpoint is in place
    return final


def _dcp_save(state: dict, path: Path, distributed: bool) -> None:
    with warnings.catch_warnings():  # DCP warns when it runs without a process group
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, checkpoint_id=path, no_dist=not distributed)


def load_checkpoint(
    path: Path, model: nn.Module, engine=None, world: World | None = None
) -> dict[str, int]:
    """Restore the model (with an ``engine``: also the optimizer moments and the RNG) in
    place; returns ``step`` and ``data_position``. The checkpoint is verified first
    (manifest, safe metadata). In a multi-process ``world`` each rank reads the rows of its
    expert slice, whatever layout wrote them. Optimizer hyperparameters are not read:
    they come from the resuming run's config."""
    verify_checkpoint(path)
    shards = (world or World()).shards
    distributed = shards is not None
    if engine is None:
        state = {"model": model.state_dict()}
    else:
        model_sd, optim_sd = engine.state_dicts()
        optim_sd = {"state": optim_sd["state"]}
        if shards is not None:
            model_sd, optim_sd = shards.distribute(model_sd, optim_sd)
        state = {
            "model": model_sd,
            "optim": optim_sd,
            "progress": {"step": torch.tensor(0), "data_position": torch.tensor(0)},
            "rng": _rng_state(),
        }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=path, no_dist=not distributed)
    if engine is None:
        model.load_state_dict(state["model"])
        return {}
    if shards is not None:
        state["model"], state["optim"] = shards.localize(state["model"], state["optim"])
    engine.load_state_dicts(state["model"], state["optim"])
    torch.set_rng_state(state["rng"]["cpu"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["rng"]["cuda"])
    return {k: int(v) for k, v in state["progress"].items()}


def read_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def save_model_checkpoint(path: Path, model: nn.Module, extra_files: dict[str, str]) -> Path:
    """A model-only checkpoint (exports, pruning, upcycling): same layout and manifest as a
    training checkpoint, without optimizer or progress. ``load_model`` reads it; a new run
    can start from its weights."""
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model": model.state_dict()}, checkpoint_id=tmp, no_dist=True)
    for name, text in extra_files.items():
        (tmp / name).write_text(text)
    write_manifest(tmp, 0)
    fsync_tree(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path
