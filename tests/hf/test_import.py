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
from tests.hf.tiny_models import COMMON, FAMILIES, save_tiny  # noqa: E402


@pytest.fixture(autouse=True)
def on_the_cpu():
    """``load_model`` reads onto the CPU, so the transformers model and the inputs live
    there too, also on a GPU machine, whose default device is CUDA (tests/conftest.py)."""
    with torch.device("cpu"):
        yield


def router_choices(ours, hf, ids):
    """Expert ids per token and MoE layer, ours and transformers' (from its routers)."""
    mine, theirs = [], []
    hooks = [
        block.ffn.router.register_forward_hook(lambda m, a, out: mine.append(out.ids_TK))
        for block in ours.blocks
        if block.is_moe
    ] + [
        module.register_forward_hook(lambda m, a, out: theirs.append(out[2]))
        for module in hf.modules()
        if type(module).__name__.lower().endswith("topkrouter")
    ]
    try:
        ours(ids)
        hf(ids)
    finally:
        for hook in hooks:
            hook.remove()
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


@pytest.mark.parametrize("kind", FAMILIES)
def test_gradients_match_transformers(tmp_path, kind):
    """Every weight's gradient of a next-token loss equals transformers' (float32)."""
    from moe.hf.families import family_of
    from moe.hf.weights import weight_table

    hf = save_tiny(kind, tmp_path)
    ours = load_model(tmp_path)
    # No padding id: OLMoE's embedding never updates the row of its pad token, ours does.
    ids = torch.randint(
        2, COMMON["vocab_size"], (2, 13), generator=torch.Generator().manual_seed(3)
    )

    def loss(model):
        logits = model(ids[:, :-1]).logits
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())

    loss(ours).backward()
    loss(hf).backward()
    theirs = dict(hf.named_parameters())
    covered = set()
    for name, tensor in weight_table(ours, family_of(hf.config.to_dict())).items():
        name = name.replace("block_sparse_moe", "mlp")  # Mixtral's name on disk, not in memory
        if name in theirs:  # expert slices are compared below, stacked as transformers has them
            torch.testing.assert_close(grad_of(tensor), theirs[name].grad, rtol=1e-3, atol=1e-6)
            covered.add(id(tensor if tensor._base is None else tensor._base))
    for i, block in enumerate(ours.blocks):
        if block.is_moe:
            experts = block.ffn.experts
            for mine, fused in (
                (experts.w_in_EHD, "gate_up_proj"),
                (experts.w_out_EDF, "down_proj"),
            ):
                fused_grad = theirs[f"model.layers.{i}.mlp.experts.{fused}"].grad
                torch.testing.assert_close(mine.grad, fused_grad, rtol=1e-3, atol=1e-6)
                covered.add(id(mine))
    assert covered == {id(p) for p in ours.parameters()}


def grad_of(tensor):
    """The gradient of a parameter, or of the part of one that a view shows."""
    if tensor._base is None:
        return tensor.grad
    offset = tensor.storage_offset() - tensor._base.storage_offset()
    return tensor._base.grad.as_strided(tensor.size(), tensor.stride(), offset)


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
    dynamic = {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}
    (tmp_path / "m/config.json").write_text(json.dumps({**config, "rope_parameters": dynamic}))
    with pytest.raises(UnsupportedModel, match="rope type 'dynamic'"):
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


def test_each_expert_parallel_rank_allocates_and_reads_only_its_experts(tmp_path):
    """``build_from_hf`` with the expert-parallel cut of rank r of 2: the model is built on
    the meta device, so the rank allocates half the experts, and they equal the whole
    model's rows r*E/2 .. (r+1)*E/2 - 1; every other weight equals the whole model's."""
    from moe.hf.reading import build_from_hf
    from moe.parallel.apply import parallelize_experts
    from moe.parallel.layout import ParallelLayout

    save_tiny("deepseek_v3", tmp_path)
    whole = load_model(tmp_path)
    E = whole.config.moe.num_experts
    for rank in range(2):
        layout = ParallelLayout(world=2, rank=rank, ep=2, ep_group=None, expert_dp_group=None)
        part = build_from_hf(
            whole.config, tmp_path, lambda m, lo=layout: parallelize_experts(m, lo)
        )
        mine, theirs = part.state_dict(), whole.state_dict()
        assert mine.keys() == theirs.keys()
        for name, tensor in mine.items():
            if "experts.w_" in name:
                assert tensor.shape[0] == E // 2
                expected = theirs[name][rank * E // 2 : (rank + 1) * E // 2]
            else:
                expected = theirs[name]
            assert torch.equal(tensor, expected), name
        assert torch.equal(part.rope_cos, whole.rope_cos)
