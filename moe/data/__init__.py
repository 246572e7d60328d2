"""Training data: the corpus (local files, a hub dataset or the embedded one), tokenizers,
packed sequences and their seeded order."""

from .batches import PackedSequences, Sampler
from .build import RunData, build_data
from .config import DataSection
from .tokenizer import byte_tokenizer, train_bpe

__all__ = [
    "DataSection",
    "PackedSequences",
    "RunData",
    "Sampler",
    "build_data",
    "byte_tokenizer",
    "train_bpe",
]
