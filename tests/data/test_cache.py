"""Cache files under concurrent builders: every rank of a run builds the same files at once."""

import numpy as np

from moe.data.corpus import publish, tokenize_to_stream
from moe.data.tokenizer import byte_tokenizer


def test_a_rank_building_the_same_cache_meanwhile_loses_nothing(tmp_path):
    cache = tmp_path / "tokens.npy"
    tokenizer = byte_tokenizer()

    def other_rank_meanwhile(tmp):
        # Another rank builds, saves and renames the same cache file while this one writes.
        tokenize_to_stream(["other rank"], tokenizer, cache)
        np.save(tmp, np.arange(3, dtype=np.int32))

    publish(cache, other_rank_meanwhile)
    assert np.load(cache).tolist() == [0, 1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["tokens.npy"]  # no temporary file left
    assert tokenize_to_stream(["ignored: cached"], tokenizer, cache).tolist() == [0, 1, 2]
