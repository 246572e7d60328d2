import pytest
import torch

from moe.model import MoETransformer
from tests.small_model import small_model_config


def model_of(**kw):
    torch.manual_seed(0)
    return MoETransformer(small_model_config(vocab_size=50, **kw))


def test_causal_and_shapes():
    model = model_of()
    ids = torch.randint(0, 50, (2, 10))
    out = model(ids)
    assert out.logits.shape == (2, 10, 50) and len(out.moe) == 3
    changed = ids.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % 50
    torch.testing.assert_close(model(changed).logits[:, :6], out.logits[:, :6])


def test_moe_every_places_moe_blocks_like_qwen3_sparse_step():
    model = model_of(n_layers=4, moe_every=2)
    assert [b.is_moe for b in model.blocks] == [False, True, False, True]
    assert [b.is_moe for b in model_of(moe_every=0).blocks] == [False] * 3


@pytest.mark.parametrize("mode", ["full", "moe"])
def test_activation_checkpointing_leaves_gradients_unchanged(mode):
    ids = torch.randint(0, 50, (2, 12))
    grads = {}
    for m in ("none", mode):
        model = model_of(moe={"num_experts": 4, "top_k": 2, "d_ff": 24, "capacity_factor": 1.0})
        model.set_checkpointing(m)
        out = model(ids)
        (out.logits.square().mean() + 0.1 * out.aux_loss + 0.01 * out.z_loss).backward()
        grads[m] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, g in grads["none"].items():
        assert torch.equal(g, grads[mode][name]), name


def test_tiny_presets_have_equal_active_parameters():
    pytest.importorskip("hydra")
    from hydra import compose, initialize_config_dir

    from moe.cli.train import CONFIG_DIR, to_run_config

    counts = {}
    for preset in ("tiny", "tiny_dense"):
        with initialize_config_dir(CONFIG_DIR, version_base=None):
            cfg = to_run_config(compose("train", overrides=[f"model={preset}"]))
        counts[preset] = MoETransformer(cfg.model).parameter_counts()
    routers = 4 * 8 * 128  # n_layers * num_experts * d_model
    assert counts["tiny"]["active"] == counts["tiny_dense"]["active"] + routers
    dense_ffns = 4 * 3 * 128 * 256  # n_layers x SwiGLU (3 matrices) x d_model x d_ff
    # 8 experts of width 128 hold 4x the dense FFN parameters.
    assert counts["tiny"]["total"] == counts["tiny_dense"]["total"] + 3 * dense_ffns + routers
    assert counts["tiny_dense"]["active"] == counts["tiny_dense"]["total"]
