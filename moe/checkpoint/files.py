"""Checkpoint integrity: durable writes, a manifest of sizes and checksums, and a check that
DCP's pickled metadata references nothing but checkpoint metadata classes.

``torch.distributed.checkpoint`` loads tensor shards with ``weights_only=True`` but reads its
``.metadata`` file with plain ``pickle.load``; ``check_metadata_pickle`` replays that file
through an allow-listed unpickler first, so a planted pickle is refused before DCP sees it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
from pathlib import Path

import torch

MANIFEST = "complete.json"


class CheckpointError(RuntimeError):
    """A checkpoint that is incomplete, corrupt, unsafe or incompatible."""


def fsync_tree(path: Path) -> None:
    """Flush every file below ``path`` and the directories themselves to disk."""
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(root))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all: a process killed mid-write leaves the old file
    (or none), never a truncated one that the next resume would fail to read."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(path: Path, step: int) -> None:
    files = {
        p.name: {"bytes": p.stat().st_size, "sha256": sha256_of(p)}
        for p in sorted(path.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    (path / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1))


def verify_manifest(path: Path) -> int:
    """The checkpoint's step if every listed file is present with its size and checksum."""
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        raise CheckpointError(f"{path} has no {MANIFEST} (incomplete)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"{path}: unreadable {MANIFEST} ({err})") from None
    for name, meta in files.items():
        file = path / name
        if not file.exists():
            raise CheckpointError(f"{path}: {name} is missing")
        if file.stat().st_size != meta["bytes"]:
            raise CheckpointError(
                f"{path}: {name} has {file.stat().st_size} bytes, manifest says {meta['bytes']}"
            )
        if sha256_of(file) != meta["sha256"]:
            raise CheckpointError(f"{path}: {name} does not match its checksum")
    return int(manifest["step"])


_ALLOWED_GLOBALS = {
    "torch.distributed.checkpoint.metadata": None,  # any of its metadata dataclasses
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        allowed = _ALLOWED_GLOBALS.get(module, set())
        is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if module in _ALLOWED_GLOBALS and (allowed is None or name in allowed) or is_dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def check_metadata_pickle(path: Path) -> None:
    metadata = path / ".metadata"
    try:
        _MetadataUnpickler(io.BytesIO(metadata.read_bytes())).load()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: .metadata is missing") from None
    except Exception as err:
        raise CheckpointError(f"{path}: refusing unsafe or corrupt .metadata ({err})") from None
