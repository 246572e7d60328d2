"""Bad configuration: one clear line on stderr, exit code 2, nothing built."""

import subprocess
import sys

import pytest

from moe.train.cli import validate_overrides

BAD = [
    (["train.max_steps=0"], "train.max_steps must be >= 1"),
    (["train.max_steps=abc"], "train.max_steps must be int"),
    (["train.dtype=float16"], "train.dtype must be float32 or bfloat16"),
    (["train.checkpointing=some"], "train.checkpointing must be one of"),
    (["train.seq_len=4096"], "train.seq_len (4096) exceeds model.max_seq_len"),
    (["optim.lr=-1"], "optim.lr must be a positive number"),
    (["model.moe.top_k=9"], "model.moe.top_k must be between 1 and num_experts"),
    (["model.moe.num_experts=0"], "model.moe.num_experts must be >= 1"),
    (["model.moe.activation=tanh"], "model.moe.activation must be one of"),
    (["model.n_heads=3"], "model.d_model (128) must be divisible by n_heads (3)"),
    (["model.n_kv_heads=3"], "model.n_kv_heads (3) must divide n_heads (4)"),
    (["data.tokenizer=wordpiece"], "data.tokenizer must be byte or bpe"),
    (["data.val_fraction=0.9"], "data.val_fraction must be in"),
    (["logger.wandb.mode=maybe"], "logger.wandb.mode must be offline, online or disabled"),
    (["device=tpu"], "device must be auto, cpu or cuda"),
    (["parallel.ep=2"], "parallel.ep > 1 is not available yet"),
    (["+train.bogus=1"], "unknown config key train.bogus"),
    (["train.bogus=1"], "Could not override 'train.bogus'"),
    (["model=nonexistent"], "Could not find 'model/nonexistent'"),
]


@pytest.mark.parametrize("overrides, message", BAD, ids=[b[0][0] for b in BAD])
def test_bad_config_is_one_line_and_exit_2(overrides, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        validate_overrides(overrides)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("moe-train: error: ") and message in err, err


def test_bad_config_through_the_real_command():
    out = subprocess.run(
        [sys.executable, "-m", "moe.train", "model.moe.top_k=9"], capture_output=True, text=True
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "moe-train: error: model.moe.top_k must be between 1 and num_experts (8), got 9"
    ]


def test_missing_data_file_fails_before_training(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "moe.train",
            f"data.path={tmp_path}/nothing*.txt",
            f"hydra.run.dir={tmp_path}/run",
            "logger.wandb.mode=disabled",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert (
        out.stderr.strip()
        .splitlines()[-1]
        .startswith("moe-train: error: data.path matches no files")
    )
