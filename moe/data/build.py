"""The run's data: tokenizer plus packed train and validation sequences."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from moe.typed_config import ConfigError

from .batches import PackedSequences
from .chat import ChatTemplate, chat_template, conversations, tokenize_chats
from .config import DataSection
from .corpus import (
    cache_dir,
    load_records,
    load_texts,
    publish,
    source_key,
    tokenize_to_stream,
)
from .tokenizer import byte_tokenizer, train_bpe


@dataclass
class RunData:
    """``chat_template``: what rendered ``format=chat`` data (None for text)."""

    tokenizer: Tokenizer
    train: PackedSequences
    val: PackedSequences
    chat_template: ChatTemplate | None = None


def build_data(
    data: DataSection,
    seq_len: int,
    tokenizer: Tokenizer | None = None,
    model_dir: Path | None = None,
) -> RunData:
    """Load text, build the tokenizer (or use the given one, e.g. a checkpoint's), tokenize
    (cached) and split off the last ``val_fraction`` of the token stream for validation.
    A BPE tokenizer is trained on the whole text (its vocabulary, not the model, sees the
    validation part). ``model_dir``: the source model (a Hugging Face directory or our
    checkpoint), whose chat template renders ``format=chat`` data."""
    chats, template = None, None
    if data.format == "chat":
        template = chat_template(data, model_dir)
        chats = conversations(load_records(data), data.path or data.hub_name or "the data")
        texts = [template.render(chat) for chat in chats]
    else:
        texts = load_texts(data)
    key = source_key(data, texts)
    spec = "byte" if data.tokenizer == "byte" else f"bpe{data.bpe_vocab_size}"
    root = cache_dir(data)
    tok_path = root / f"tokenizer-{key}-{spec}.json"
    if tokenizer is not None:
        spec = "given-" + hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:12]
    elif data.tokenizer == "byte":
        tokenizer = byte_tokenizer()
    elif tok_path.exists():
        tokenizer = Tokenizer.from_file(str(tok_path))
    else:
        tokenizer = train_bpe(texts, data.bpe_vocab_size)
        publish(tok_path, lambda tmp: tokenizer.save(str(tmp)))
    trained = None
    if chats is not None:
        stream, trained = tokenize_chats(chats, tokenizer, template)
    else:
        stream = tokenize_to_stream(texts, tokenizer, root / f"tokens-{key}-{spec}.npy")
    cut = int(len(stream) * (1 - data.val_fraction))
    if trained is not None and not (trained[1:cut].any() and trained[cut + 1 :].any()):
        raise ConfigError(
            "data.format=chat: the train or validation split holds no assistant reply to "
            "train on; add conversations or change data.val_fraction"
        )
    return RunData(
        tokenizer=tokenizer,
        train=PackedSequences(stream[:cut], seq_len, "train", _part(trained, None, cut)),
        val=PackedSequences(stream[cut:], seq_len, "validation", _part(trained, cut, None)),
        chat_template=template,
    )


def _part(trained: np.ndarray | None, start: int | None, stop: int | None):
    return None if trained is None else trained[start:stop]
