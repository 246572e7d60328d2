"""Bad configuration: one clear line on stderr, exit code 2, nothing built."""

import re
import subprocess
import sys

import pytest

from moe.cli.train import validate_overrides
from moe.train.trainer import Trainer
from moe.typed_config import ConfigError
from tests.reference import on_cpu
from tests.train.helpers import small_config

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
    (["parallel.ep=0"], "parallel.ep must be >= 1"),
    (["parallel.engine=fsdp"], "parallel.engine must be native or deepspeed"),
    (["parallel.zero_stage=3"], "parallel.zero_stage must be 1 or 2"),
    (["parallel.engine=deepspeed", "train.compile=true"], "works with parallel.engine=native"),
    (["train.compile=sometimes"], "train.compile must be true, false or auto"),
    (["+train.bogus=1"], "unknown config key train.bogus"),
    (["train.bogus=1"], "Could not override 'train.bogus'"),
    (["model=nonexistent"], "Could not find 'model/nonexistent'"),
    (["model.dense_blocks=[7]"], "model.dense_blocks must be block indices in [0, 4)"),
    (["model.dense_blocks=3"], "model.dense_blocks must be a list"),
    (["model.attention=linear"], "model.attention must be one of"),
    (["model.moe.n_group=3"], "model.moe.n_group must divide num_experts"),
    (["model.rope_scaling.kind=ntk"], "model.rope_scaling.kind must be none or yarn"),
    (["model.mla.v_head_dim=0"], "model.mla.v_head_dim must be >= 1"),
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


def _data_case(tmp_path, kind):
    """Writes a bad data file; returns the overrides that point the run at it."""
    if kind == "empty":
        (tmp_path / "empty.txt").write_text("")
        return {"data.path": str(tmp_path / "empty.txt")}
    if kind == "not_utf8":
        (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1") * 50)
        return {"data.path": str(tmp_path / "latin1.txt")}
    if kind == "no_text_field":
        (tmp_path / "rows.jsonl").write_text('{"body": "some text"}\n' * 20)
        return {"data.path": str(tmp_path / "rows.jsonl")}
    if kind == "broken_jsonl":
        (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"text": \n')
        return {"data.path": str(tmp_path / "broken.jsonl")}
    if kind == "mixed_kinds":
        (tmp_path / "mix").mkdir()
        (tmp_path / "mix" / "a.txt").write_text("hello " * 100)
        (tmp_path / "mix" / "b.jsonl").write_text('{"text": "hi"}\n')
        return {"data.path": str(tmp_path / "mix")}
    if kind == "too_short":
        (tmp_path / "short.txt").write_text("tiny")
        return {"data.path": str(tmp_path / "short.txt")}
    raise AssertionError(kind)


TRAINER_BAD = [
    ("empty data file", lambda p: _data_case(p, "empty"), "holds no text"),
    ("non-UTF-8 data", lambda p: _data_case(p, "not_utf8"), "cannot read data.path"),
    (
        "missing text column",
        lambda p: _data_case(p, "no_text_field"),
        "data.text_field 'text' is not a column",
    ),
    ("broken jsonl", lambda p: _data_case(p, "broken_jsonl"), "cannot read data.path"),
    ("mixed file kinds", lambda p: _data_case(p, "mixed_kinds"), "files of one kind"),
    (
        "data shorter than a sequence",
        lambda p: _data_case(p, "too_short"),
        "fewer than one sequence",
    ),
    (
        "batch not a multiple",
        lambda p: {"train.micro_batch_size": 3},
        "must be a multiple of train.micro_batch_size",
    ),
    ("resume from a non-checkpoint", lambda p: {"resume": str(p)}, "has no complete.json"),
    ("ep without processes", lambda p: {"parallel.ep": 2}, "parallel.ep=2 needs 2 processes"),
]


@on_cpu
@pytest.mark.parametrize("name, make, message", TRAINER_BAD, ids=[b[0] for b in TRAINER_BAD])
def test_bad_input_fails_before_training(tmp_path, name, make, message):
    overrides = make(tmp_path)
    with pytest.raises(ConfigError, match=re.escape(message)):
        Trainer(small_config(tmp_path, **overrides), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


@on_cpu
def test_checkpoint_of_an_incompatible_model_is_refused(tmp_path):
    trainer = Trainer(
        small_config(tmp_path, **{"train.max_steps": 2, "checkpoint.every": 2}), tmp_path / "a"
    )
    trainer.train()
    trainer.close()
    checkpoint = tmp_path / "a" / "checkpoints" / "step_2"
    with pytest.raises(ConfigError, match=r"has model.d_model=32, this run model.d_model=64"):
        Trainer(
            small_config(tmp_path, **{"model.d_model": 64, "resume": str(checkpoint)}),
            tmp_path / "b",
        )
    with pytest.raises(ConfigError, match=r"has model.moe.num_experts=4, this run"):
        Trainer(
            small_config(tmp_path, **{"model.moe.num_experts": 8, "resume": str(checkpoint)}),
            tmp_path / "c",
        )


def test_unwritable_run_directory(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        validate_overrides([f"hydra.run.dir={tmp_path}/file/run"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("preset", ["tiny", "small", "gpu_1b", "tiny_dense"])
def test_every_model_key_can_be_overridden_without_a_plus(tmp_path, preset):
    """The presets start from every key's declared default, so keys they do not list
    (latent attention, YaRN, dense blocks, routing) are plain overrides."""
    cfg = small_config(
        tmp_path,
        **{
            "model": preset,
            "model.qkv_bias": True,
            "model.attention": "mla",
            "model.mla.kv_lora_rank": 16,
            "model.rope_scaling.kind": "yarn",
            "model.rope_scaling.factor": 2.0,
            "model.dense_blocks": "[0]",
            "model.moe.score": "sigmoid",
            "model.moe.num_experts": 4,
            "model.moe.n_group": 2,
            "model.moe.shared_d_ff": 32,
        },
    )
    model = cfg.model
    assert (model.attention, model.mla.kv_lora_rank, model.dense_blocks) == ("mla", 16, [0])
    assert (model.rope_scaling.kind, model.rope_scaling.factor, model.qkv_bias) == (
        "yarn",
        2.0,
        True,
    )
    assert (model.moe.score, model.moe.n_group, model.moe.shared_d_ff) == ("sigmoid", 2, 32)
