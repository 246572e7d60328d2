"""End-to-end training on a small generated corpus."""

import json
import subprocess
import sys

import pytest
import torch

from moe import load_model
from moe.checkpoint import complete_checkpoints
from moe.train.metrics import read_metrics
from moe.train.trainer import Trainer
from tests.reference import on_cpu
from tests.train.helpers import small_config, small_overrides


def run(cfg, run_dir):
    trainer = Trainer(cfg, run_dir)
    try:
        return trainer.train(), trainer
    finally:
        trainer.close()


@on_cpu
def test_loss_falls_and_run_directory_is_complete(tmp_path):
    # A run this short warms up over a third of its steps (the default warmup is 200).
    cfg = small_config(
        tmp_path, **{"train.max_steps": 30, "eval.every": 10, "optim.warmup_steps": 10}
    )
    summary, _ = run(cfg, tmp_path / "run")
    assert summary["val_loss"] < summary["val_loss_start"] - 1.0  # 5.5 nats at init
    lines = read_metrics(tmp_path / "run")
    train = [r for r in lines if "split" not in r]
    assert [r["step"] for r in train] == list(range(1, 31))
    assert all(
        {"loss", "lm_loss", "aux_loss", "z_loss", "lr", "grad_norm"} <= set(r) for r in train
    )
    assert train[-1]["lm_loss"] < train[0]["lm_loss"]
    vals = [r for r in lines if r.get("split") == "val"]
    assert [r["step"] for r in vals] == [0, 10, 20, 30]
    assert [p.name for p in complete_checkpoints(tmp_path / "run")] == [
        "step_24",
        "step_30",
    ]  # every 6, keep 2


@on_cpu
def test_resume_is_bitwise_identical(tmp_path):
    extra = {
        "train.deterministic": True,
        "train.max_steps": 12,
        "checkpoint.every": 6,
        "checkpoint.keep": 5,
        "model.moe.jitter": 0.1,
        # A constant rate: the first half stops through max_steps, which shapes the schedule.
        "optim.warmup_steps": 0,
        "optim.min_lr_ratio": 1.0,
    }  # jitter: the RNG must resume too
    _, straight = run(small_config(tmp_path, **extra), tmp_path / "straight")

    half = small_config(tmp_path, **{**extra, "train.max_steps": 6})
    run(half, tmp_path / "resumed")
    summary, resumed = run(
        small_config(tmp_path, **{**extra, "resume": "auto"}), tmp_path / "resumed"
    )
    assert summary["steps_this_run"] == 6 and summary["resumed_from"].endswith("step_6")

    for (name, a), b in zip(
        straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    losses = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "straight") if "split" not in r}
    again = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "resumed") if "split" not in r}
    assert losses == again


@on_cpu
def test_load_model_and_moe_eval_reproduce_last_val_loss(tmp_path):
    cfg = small_config(tmp_path, **{"train.max_steps": 6})
    summary, trainer = run(cfg, tmp_path / "run")
    model = load_model(tmp_path / "run")
    ids = torch.randint(0, 256, (2, 16))
    assert not model.training
    torch.testing.assert_close(model(ids).logits, trainer.model.eval()(ids).logits, rtol=0, atol=0)
    out = subprocess.run(
        [sys.executable, "-m", "moe.cli.eval", f"checkpoint={tmp_path / 'run'}"],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["step"] == 6
    assert result["loss"] == pytest.approx(summary["val_loss"], rel=1e-6)


def test_cli_trains_and_writes_the_contracted_run_directory(tmp_path):
    run_dir = tmp_path / "cli_run"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "moe.train",
            *small_overrides(tmp_path, **{"train.max_steps": 4, "checkpoint.every": 2}),
            f"hydra.run.dir={run_dir}",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "run summary:" in out.stdout
    assert (run_dir / ".hydra" / "config.yaml").exists()
    assert (run_dir / "checkpoints" / "step_4" / "complete.json").exists()
    assert (run_dir / "checkpoints" / "step_4" / "tokenizer.json").exists()
    first = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert first == {"step": 0, "split": "val", "loss": first["loss"]}


@on_cpu
def test_expert_bias_is_updated_by_the_trainer(tmp_path):
    cfg = small_config(
        tmp_path,
        **{"train.max_steps": 3, "model.moe.expert_bias": True, "train.expert_bias_rate": 0.01},
    )
    _, trainer = run(cfg, tmp_path / "run")
    biases = [b.ffn.router.expert_bias_E for b in trainer.model.blocks if b.is_moe]
    assert biases and all(torch.count_nonzero(b) > 0 for b in biases)
    assert all(torch.all(b.abs() <= 0.03 + 1e-6) for b in biases)  # 3 steps of +-0.01


@pytest.mark.slow
@on_cpu
def test_compiled_blocks_train_like_eager(tmp_path):
    """``train.compile=true``: each block compiled (inductor, one graph each) trains with the
    same losses as eager, and checkpoints keep the eager parameter names."""
    extra = {"train.max_steps": 4, "eval.every": 4, "checkpoint.every": 4}
    from torch._dynamo.utils import counters

    losses, graphs = {}, {}
    for setting in ("false", "true"):
        torch._dynamo.reset()
        counters.clear()
        cfg = small_config(tmp_path, **extra, **{"train.compile": setting})
        run(cfg, tmp_path / setting)
        losses[setting] = [r["loss"] for r in read_metrics(tmp_path / setting) if "split" not in r]
        graphs[setting] = counters["stats"]["unique_graphs"]
    assert graphs["false"] == 0 and graphs["true"] >= cfg.model.n_layers  # one graph a block
    assert not counters["graph_break"]
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-4)
    model = load_model(tmp_path / "true")  # names without a compile wrapper's prefix
    assert sum(p.numel() for p in model.parameters()) > 0
