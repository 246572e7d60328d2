"""Exports against our own model: Hugging Face logits, files, pruning, upcycling."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from moe import load_model
from moe.data import byte_tokenizer
from moe.export.experts import export_experts
from moe.export.hf import UnsupportedExport, export_hf
from moe.export.prune import prune_experts
from moe.export.routing import routing_stats
from moe.export.upcycle import dense_from_hf, upcycle
from moe.layers import MoEConfig
from moe.model import MoETransformer
from moe.train.trainer import Trainer
from tests.reference import on_cpu
from tests.small_model import small_model_config
from tests.train.helpers import small_config

transformers = pytest.importorskip("transformers")


def run_cli(entry: str, *args: str) -> subprocess.CompletedProcess:
    """``moe-export`` / ``moe-upcycle`` as a subprocess, whatever is on PATH."""
    cmd = [sys.executable, "-c", f"from moe.cli.export import {entry}; {entry}()", *args]
    return subprocess.run(cmd, capture_output=True, text=True)


def small_model(**kw):
    torch.manual_seed(0)
    return MoETransformer(small_model_config(**kw)).eval()


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@on_cpu
@pytest.mark.parametrize(
    "kw",
    [
        {},  # MoE every block, tied, Switch gates
        {
            "moe_every": 2,
            "tie_embeddings": False,
            "moe": {"num_experts": 4, "top_k": 2, "d_ff": 24, "gate_mode": "renormalize"},
        },
        {"moe_every": 0},  # the dense baseline
        {  # DeepSeek-V3's router on our attention: exported as dots.llm1
            "dense_blocks": [0],
            "moe": {
                "num_experts": 4,
                "top_k": 2,
                "d_ff": 24,
                "score": "sigmoid",
                "expert_bias": True,
                "gate_mode": "renormalize",
                "gate_scale": 2.0,
                "n_group": 2,
                "topk_group": 1,
            },
        },
    ],
    ids=["every_block", "every_other_untied_renorm", "dense", "sigmoid_router_as_dots1"],
)
def test_hf_export_matches_our_logits_and_generates(tmp_path, kw):
    model = small_model(**kw)
    with torch.no_grad():  # a selection bias that changes choices
        for name, buffer in model.named_buffers():
            if name.endswith("expert_bias_E"):
                buffer.uniform_(-0.05, 0.05)
    export_hf(model, byte_tokenizer(), tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    ids = torch.randint(0, 256, (3, 19))
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf(ids).logits
    assert rel_err(theirs, ours) <= 1e-5
    generated = hf.generate(ids[:1, :4], max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, 9)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok.decode(tok("def f(x):\n\treturn x").input_ids) == "def f(x):\n\treturn x"

    # Round trip: the exported directory read back by load_model is the same model.
    back = load_model(tmp_path / "hf")
    assert back.config.moe_every == model.config.moe_every
    assert back.config.dense_blocks == model.config.dense_blocks
    for (name, a), b in zip(model.state_dict().items(), back.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@on_cpu
def test_hf_export_in_bfloat16_shards(tmp_path):
    """Shards of at most 40 kB in bfloat16: an index names every tensor's file; transformers
    and load_model read them back as our model with bfloat16-rounded weights."""
    model = small_model()
    export_hf(model, byte_tokenizer(), tmp_path / "hf", torch.bfloat16, max_shard_bytes=40_000)
    shards = sorted((tmp_path / "hf").glob("model-*-of-*.safetensors"))
    index = json.loads((tmp_path / "hf/model.safetensors.index.json").read_text())
    assert len(shards) > 2 and all(s.stat().st_size <= 40_000 + 10_000 for s in shards)
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    rounded = small_model()
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    ids = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        assert rel_err(hf(ids).logits, rounded(ids).logits) <= 1e-5
    back = load_model(tmp_path / "hf")
    for (name, a), b in zip(rounded.state_dict().items(), back.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    "kw, option",
    [
        ({"moe": {"num_experts": 4, "capacity_factor": 1.25}}, "model.moe.capacity_factor"),
        ({"moe": {"num_experts": 4, "expert_bias": True}}, "model.moe.expert_bias"),
        ({"moe": {"num_experts": 4, "activation": "gelu"}}, "model.moe.activation"),
        ({"qk_norm": False}, "model.qk_norm"),
    ],
)
def test_unrepresentable_configs_are_refused_by_name(tmp_path, kw, option):
    with pytest.raises(UnsupportedExport, match=option):
        export_hf(small_model(**kw), byte_tokenizer(), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


@on_cpu
def test_pruning_to_all_experts_is_the_identity():
    model = small_model()
    pruned = prune_experts(model, {i: [0, 1, 2, 3] for i in range(3)})
    ids = torch.randint(0, 256, (2, 11))
    assert torch.equal(model(ids).logits, pruned(ids).logits)


@on_cpu
def test_pruning_removes_router_rows_and_experts():
    model = small_model()
    pruned = prune_experts(model, {0: [1, 3], 1: [0, 2], 2: [2, 3]})
    assert pruned.config.moe.num_experts == 2 and pruned.config.moe.top_k == 2
    block = pruned.blocks[0].ffn
    assert torch.equal(block.router.weight_ED, model.blocks[0].ffn.router.weight_ED[[1, 3]])
    assert torch.equal(block.experts.w_out_EDF, model.blocks[0].ffn.experts.w_out_EDF[[1, 3]])


@on_cpu
def test_expert_files_and_routing_statistics(tmp_path):
    trainer = Trainer(small_config(tmp_path, **{"train.max_steps": 2}), tmp_path / "run")
    trainer.train()
    trainer.close()
    model = load_model(tmp_path / "run")
    stats = routing_stats(model, trainer.data.val, sequences=8)
    manifest = export_experts(model, stats, tmp_path / "experts", layers=[1], experts=[0, 3])
    assert [(e["block"], e["expert"]) for e in manifest["experts"]] == [(1, 0), (1, 3)]
    assert sum(stats[1].load_fraction) == pytest.approx(1.0)
    entry = manifest["experts"][1]
    tensors = load_file(str(tmp_path / "experts" / entry["file"]))
    gate, up = model.blocks[1].ffn.experts.w_in_EHD[3].chunk(2)
    assert torch.equal(tensors["gate_proj.weight"], gate) and torch.equal(
        tensors["up_proj.weight"], up
    )
    assert entry["shapes"]["down_proj.weight"] == [32, 32]
    assert entry["load_fraction"] == stats[1].load_fraction[3]
    on_disk = json.loads((tmp_path / "experts" / "manifest.json").read_text())
    assert on_disk["model_config"]["moe"]["num_experts"] == 4


@on_cpu
def test_upcycled_model_equals_dense_at_step_zero(tmp_path):
    dense = small_model(moe_every=0)
    moe = upcycle(dense, MoEConfig(num_experts=4, top_k=2, gate_mode="renormalize"))
    ids = torch.randint(0, 256, (2, 13))
    assert rel_err(moe(ids).logits, dense(ids).logits) <= 1e-5
    switch = upcycle(dense, MoEConfig(num_experts=4, top_k=1, gate_mode="switch"))
    assert rel_err(switch(ids).logits, dense(ids).logits) > 1e-3  # scaled by the gate: documented


@on_cpu
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_upcycle_from_hugging_face_dense_models(tmp_path, arch):
    common = dict(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    if arch == "llama":
        cfg = transformers.LlamaConfig(**common)
        hf = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen3Config(**common, head_dim=8)
        hf = transformers.Qwen3ForCausalLM(cfg)
    hf.eval().save_pretrained(tmp_path / arch)
    dense = dense_from_hf(tmp_path / arch)
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        assert rel_err(dense(ids).logits, hf(ids).logits) <= 1e-5
    moe = upcycle(dense, MoEConfig(num_experts=4, top_k=2, gate_mode="renormalize"))
    with torch.no_grad():
        assert rel_err(moe(ids).logits, hf(ids).logits) <= 1e-5


def test_export_and_upcycle_commands(tmp_path):
    trainer = Trainer(
        small_config(tmp_path, **{"train.max_steps": 2, "model.moe_every": 0}), tmp_path / "dense"
    )
    trainer.train()
    trainer.close()
    up = run_cli(
        "upcycle_main",
        f"source={tmp_path / 'dense'}",
        f"out={tmp_path / 'moe'}",
        "num_experts=4",
        "top_k=2",
    )
    assert up.returncode == 0, up.stderr[-2000:]
    out = run_cli(
        "export_main",
        f"checkpoint={tmp_path / 'moe'}",
        f"out={tmp_path / 'hf'}",
        "format=hf",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    dense = load_model(tmp_path / "dense")
    ids = torch.randint(0, 256, (1, 7))
    with torch.no_grad():
        assert rel_err(hf(ids).logits, dense(ids).logits) <= 1e-5
    pruned = run_cli(
        "export_main",
        f"checkpoint={tmp_path / 'moe'}",
        f"out={tmp_path / 'pruned'}",
        "format=pruned",
        "keep=2",
    )
    assert pruned.returncode == 0, pruned.stderr[-2000:]
    report = json.loads(pruned.stdout.strip().splitlines()[-1])
    assert {"val_loss_before", "val_loss_after", "kept"} <= set(report)
    assert load_model(tmp_path / "pruned").config.moe.num_experts == 2
    bad = run_cli(
        "export_main",
        f"checkpoint={tmp_path / 'dense'}",
        "out=x",
        "format=onnx",
    )
    assert bad.returncode == 2 and "format must be hf, experts or pruned" in bad.stderr
