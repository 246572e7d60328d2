"""Open MoE families read from Hugging Face directories (``moe.hf``): tiny random models
built locally with ``transformers``, saved with ``save_pretrained``, then read by
``load_model``: the same logits (float32, 1e-4 relative) and the same expert choices for
every token as ``transformers`` computes."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moe import load_model  # noqa: E402
from moe.hf import UnsupportedModel  # noqa: E402

COMMON = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=40,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)

FAMILIES = {
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=12, head_dim=12),
    ),
    "qwen3_moe_renormalized_sparse_step_2": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(
            num_experts=5,
            num_experts_per_tok=3,
            moe_intermediate_size=8,
            norm_topk_prob=True,
            decoder_sparse_step=2,
            tie_word_embeddings=True,
        ),
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            num_experts=6,
            num_experts_per_tok=2,
            moe_intermediate_size=12,
            shared_expert_intermediate_size=20,
        ),
    ),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(num_local_experts=4, num_experts_per_tok=2),
    ),
    "olmoe": (
        "OlmoeConfig",
        "OlmoeForCausalLM",
        dict(num_experts=8, num_experts_per_tok=2, pad_token_id=0, eos_token_id=1),
    ),
}


def save_tiny(kind, directory, seed=0):
    config_cls, model_cls, extra = FAMILIES[kind]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**COMMON, **extra)
    hf = getattr(transformers, model_cls)(config).float().eval()
    with torch.no_grad():  # norms away from 1, so that a missed norm weight shows
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    hf.save_pretrained(directory)
    return hf


def router_choices(ours, hf, ids):
    """Top-k expert ids per token and MoE layer, ours and transformers'."""
    mine = []
    hooks = [
        block.ffn.router.register_forward_hook(lambda m, a, out: mine.append(out.ids_TK))
        for block in ours.blocks
        if block.is_moe
    ]
    try:
        ours(ids)
    finally:
        for hook in hooks:
            hook.remove()
    k = ours.config.moe.top_k
    logits = hf(ids, output_router_logits=True).router_logits
    theirs = [
        lg.reshape(-1, lg.shape[-1]).topk(k, dim=-1).indices for lg in logits if lg is not None
    ]
    return mine, theirs


@pytest.mark.parametrize("kind", FAMILIES)
def test_load_model_matches_transformers(tmp_path, kind):
    hf = save_tiny(kind, tmp_path)
    ours = load_model(tmp_path)
    ids = torch.randint(
        0, COMMON["vocab_size"], (2, 17), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids).logits
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        mine, theirs = router_choices(ours, hf, ids)
    assert len(mine) == len(theirs) > 0
    for a, b in zip(mine, theirs, strict=True):
        assert torch.equal(a.sort(-1).values, b.sort(-1).values)


def test_bad_directories_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint|config.json"):
        load_model(tmp_path)
    save_tiny("mixtral", tmp_path / "m")
    config = json.loads((tmp_path / "m/config.json").read_text())
    (tmp_path / "m/config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(UnsupportedModel, match="model_type 'bert' is not supported"):
        load_model(tmp_path / "m")
    (tmp_path / "m/config.json").write_text(json.dumps({**config, "sliding_window": 16}))
    with pytest.raises(UnsupportedModel, match="sliding-window"):
        load_model(tmp_path / "m")
    (tmp_path / "m/config.json").write_text(json.dumps(config))
    shard = tmp_path / "m/model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(UnsupportedModel, match="truncated or corrupt"):
        load_model(tmp_path / "m")
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="lacks the weight file"):
        load_model(tmp_path / "m")


@pytest.mark.parametrize("kind", FAMILIES)
def test_export_writes_the_source_family_back(tmp_path, kind):
    from moe.data.tokenizer import byte_tokenizer
    from moe.export.hf import export_hf

    hf = save_tiny(kind, tmp_path / "source")
    ours = load_model(tmp_path / "source")
    export_hf(ours, byte_tokenizer(), tmp_path / "exported")
    config = json.loads((tmp_path / "exported/config.json").read_text())
    source = json.loads((tmp_path / "source/config.json").read_text())
    assert config["architectures"] == source["architectures"]
    assert config["model_type"] == source["model_type"]
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported").float().eval()
    ids = torch.randint(
        0, COMMON["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(2)
    )
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, hf(ids).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(back(ids).logits, ours(ids).logits, rtol=1e-4, atol=1e-4)
    assert back.generate(ids[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)


def test_export_to_another_family_is_refused(tmp_path):
    from moe.data.tokenizer import byte_tokenizer
    from moe.export.hf import UnsupportedExport, export_hf

    save_tiny("olmoe", tmp_path / "source")
    ours = load_model(tmp_path / "source")
    ours.config.hf_family = "qwen3_moe"  # Qwen3-MoE normalizes per head, OLMoE per projection
    with pytest.raises(UnsupportedExport, match="qk_norm"):
        export_hf(ours, byte_tokenizer(), tmp_path / "exported")
    assert not (tmp_path / "exported").exists()
