"""Training text: local files through Hugging Face ``datasets``, a hub dataset by name, or
the embedded corpus built on the spot from the Python standard library's source files.

Everything becomes one token stream per split (documents joined by a blank line), cached
as a NumPy file next to the text so a second run starts at once.
"""

from __future__ import annotations

import glob
import hashlib
import os
import secrets
import sysconfig
from pathlib import Path

import numpy as np

from moe.typed_config import ConfigError

from .config import DataSection

BUILDERS = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
}


def cache_dir(data: DataSection) -> Path:
    root = data.cache_dir or os.environ.get("MOE_TRAIN_CACHE") or "~/.cache/moe-train"
    return Path(root).expanduser()


def embedded_corpus(data: DataSection) -> Path:
    """A text file of standard-library sources (sorted, so every machine builds the same)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    limit = int(data.max_corpus_mb * 1e6)
    path = cache_dir(data) / f"stdlib-{limit}.txt"
    if path.exists():
        return path
    parts, size = [], 0
    for source in sorted(stdlib.glob("*.py")) + sorted(stdlib.glob("*/*.py")):
        if "test" in source.parts[-2:][0] or source.name.startswith("test"):
            continue
        try:
            text = source.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        parts.append(text)
        size += len(text)
        if size >= limit:
            break
    publish(path, lambda tmp: tmp.write_text("\n\n".join(parts), encoding="utf-8"))
    return path


def publish(path: Path, write) -> None:
    """Build a cache file through ``write(tmp)`` and rename it into place. Every rank of a
    run may build the same file at once: each writes a temporary file of its own, so a
    reader only ever sees a complete file and no rank's rename finds its file gone."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # The same suffix, or np.save would append ".npy".
    tmp = path.with_name(f".{path.stem}.{secrets.token_hex(6)}{path.suffix}")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def resolve_files(pattern: str) -> list[str]:
    path = Path(pattern).expanduser()
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.suffix in BUILDERS)
    else:
        files = sorted(glob.glob(str(path)))
    if not files:
        raise ConfigError(f"data.path matches no files: {pattern}")
    suffixes = {Path(f).suffix for f in files}
    if len(suffixes) > 1 or next(iter(suffixes)) not in BUILDERS:
        raise ConfigError(
            f"data.path must name files of one kind among {sorted(BUILDERS)}, "
            f"got {sorted(suffixes)}"
        )
    return files


def load_records(data: DataSection):
    """The configured source as a ``datasets.Dataset``, in a fixed order."""
    import datasets

    datasets.disable_progress_bars()
    if data.hub_name:
        return datasets.load_dataset(data.hub_name, split="train")
    files = resolve_files(data.path) if data.path else [str(embedded_corpus(data))]
    builder = BUILDERS[Path(files[0]).suffix]
    kwargs = {"sample_by": "document"} if builder == "text" else {}
    try:
        return datasets.load_dataset(builder, data_files=files, split="train", **kwargs)
    except Exception as err:  # malformed json/parquet, undecodable text
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"cannot read data.path {data.path}: {first_line}") from None


def load_texts(data: DataSection) -> list[str]:
    """Documents of the configured source, in a fixed order."""
    ds = load_records(data)
    if data.text_field not in ds.column_names:
        raise ConfigError(
            f"data.text_field {data.text_field!r} is not a column; columns: {ds.column_names}"
        )
    texts = [t for t in ds[data.text_field] if t]
    if not texts:
        raise ConfigError(f"data source {data.path or data.hub_name} holds no text")
    return texts


def source_key(data: DataSection, texts: list[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(hashlib.sha256(text.encode()).digest())
    return digest.hexdigest()[:16]


def tokenize_to_stream(texts: list[str], tokenizer, cache: Path | None) -> np.ndarray:
    """All documents as one int32 token stream, joined by a blank line."""
    if cache is not None and cache.exists():
        return np.load(cache)
    sep = tokenizer.encode("\n\n").ids
    ids = []
    for enc in tokenizer.encode_batch(texts):
        ids.extend(enc.ids)
        ids.extend(sep)
    stream = np.asarray(ids, dtype=np.int32)
    if cache is not None:
        publish(cache, lambda tmp: np.save(tmp, stream))
    return stream
