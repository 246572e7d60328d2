"""The data section of the run's configuration (``data.*`` keys)."""

from __future__ import annotations

from dataclasses import dataclass

from moe.typed_config import ConfigError


@dataclass
class DataSection:
    """path: local text/jsonl/parquet files (a file, a directory or a glob); None builds the
    embedded corpus from the Python standard library's source files. hub_name: a Hugging Face
    dataset name (needs a network). format: ``text`` (documents, every token trained) or
    ``chat`` (jsonl/parquet records with ``messages`` or ``prompt``/``response``, rendered with
    a chat template, the loss on the assistant replies only; ``moe.data.chat``).
    text_field: the column holding text in jsonl/parquet (``format=text``).
    chat_template: a Jinja chat template file for ``format=chat``; null: the template of the
    ``init_from`` Hugging Face model, else a plain ``<|role|>`` one.
    tokenizer: ``byte`` (256 ids) or ``bpe`` (trained locally, saved with the run).
    bpe_vocab_size: BPE vocabulary size. val_fraction: share of tokens held out for eval.
    max_corpus_mb: cap on the embedded corpus. cache_dir: where the corpus is cached
    (default ``~/.cache/moe-train``)."""

    path: str | None = None
    hub_name: str | None = None
    format: str = "text"
    text_field: str = "text"
    chat_template: str | None = None
    tokenizer: str = "byte"
    bpe_vocab_size: int = 2048
    val_fraction: float = 0.05
    max_corpus_mb: float = 8.0
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.format not in ("text", "chat"):
            raise ConfigError(f"data.format must be text or chat, got {self.format!r}")
        if self.tokenizer not in ("byte", "bpe"):
            raise ConfigError(f"data.tokenizer must be byte or bpe, got {self.tokenizer!r}")
        if not 0 < self.val_fraction < 0.5:
            raise ConfigError(f"data.val_fraction must be in (0, 0.5), got {self.val_fraction}")
        if self.bpe_vocab_size < 257:
            raise ConfigError("data.bpe_vocab_size must be > 256 (the byte alphabet)")
        if self.max_corpus_mb <= 0:
            raise ConfigError("data.max_corpus_mb must be > 0")
