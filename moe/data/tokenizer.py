"""Tokenizers, always a ``tokenizers.Tokenizer`` so every run saves a ``tokenizer.json``
that ``transformers`` can load.

- ``byte``: byte-level, 256 ids, id = byte value (a byte-level BPE with no merges).
- ``bpe``: byte-level BPE trained locally on the training text.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tokenizers.pre_tokenizers import ByteLevel


def _byte_symbols() -> list[str]:
    """The printable stand-in of every byte, in byte order (GPT-2's byte-level alphabet)."""
    return sorted(ByteLevel.alphabet(), key=lambda ch: _byte_of(ch))


def _byte_of(ch: str) -> int:
    # Inverse of GPT-2's bytes_to_unicode: printable Latin-1 bytes map to themselves, the
    # other 68 bytes to code points 256.. in byte order.
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    if ord(ch) in printable:
        return ord(ch)
    others = [b for b in range(256) if b not in printable]
    return others[ord(ch) - 256]


def _byte_level(model: models.Model) -> Tokenizer:
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def byte_tokenizer() -> Tokenizer:
    vocab = {symbol: i for i, symbol in enumerate(_byte_symbols())}
    return _byte_level(models.BPE(vocab=vocab, merges=[]))


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    tok = _byte_level(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok
