"""``moe-train init_from=PATH``: a new run from a Hugging Face directory of a supported
family or from one of our checkpoints; refused overrides are one line."""

import json
import os
import subprocess
import sys

import pytest
import torch

from moe.data.tokenizer import byte_tokenizer
from moe.train.metrics import read_metrics
from tests.hf.tiny_models import COMMON, FAMILIES
from tests.train.helpers import small_overrides

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow


def hf_directory(tmp_path, kind):
    """A tiny random model of ``kind`` with a byte tokenizer of its vocabulary."""
    config_cls, model_cls, extra = FAMILIES[kind]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**{**COMMON, "vocab_size": 256, **extra})
    directory = tmp_path / kind
    getattr(transformers, model_cls)(config).save_pretrained(directory)
    byte_tokenizer().save(str(directory / "tokenizer.json"))
    return directory


def run_overrides(tmp_path, **extra):
    """The small-run settings without any model key: the model comes from init_from."""
    return [o for o in small_overrides(tmp_path, **extra) if not o.startswith("model.")]


def train(tmp_path, run_dir, *args, launcher=(sys.executable, "-m", "moe.train"), **extra):
    command = [*launcher, *run_overrides(tmp_path, **extra), f"hydra.run.dir={run_dir}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def losses(run_dir):
    return [r["lm_loss"] for r in read_metrics(run_dir) if "split" not in r]


@pytest.mark.parametrize(
    "kind", ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v3", "dots1"]
)
def test_training_starts_from_a_hugging_face_model(tmp_path, kind):
    source = hf_directory(tmp_path, kind)
    run = tmp_path / "run"
    out = train(tmp_path, run, f"init_from={source}", **{"train.max_steps": 10})
    assert out.returncode == 0, out.stderr[-3000:]
    trained = losses(run)
    assert trained[-1] < trained[0]
    stored = json.loads((run / "run_config.json").read_text())["model"]
    hf = json.loads((source / "config.json").read_text())
    assert stored["d_model"] == hf["hidden_size"] and stored["vocab_size"] == 256
    assert stored["moe"]["top_k"] == hf["num_experts_per_tok"]


# Every family under EP=2; among them Qwen2-MoE's gated shared expert (dense, on every
# rank) and DeepSeek-V3's latent attention, group-limited routing and selection bias (which
# the trainer updates from global loads).
@pytest.mark.parametrize(
    "kind", ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v3", "dots1"]
)
def test_two_processes_with_expert_parallelism(tmp_path, kind):
    source = hf_directory(tmp_path, kind)
    run = tmp_path / "run"
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    out = train(
        tmp_path,
        run,
        f"init_from={source}",
        "parallel.ep=2",
        launcher=(*torchrun, "-m", "moe.train"),
        **{"train.max_steps": 6},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    trained = losses(run)
    assert len(trained) == 6 and trained[-1] < trained[0]


def test_starting_from_our_checkpoint_keeps_its_quality(tmp_path):
    first = tmp_path / "first"
    out = subprocess.run(
        [sys.executable, "-m", "moe.train", *small_overrides(tmp_path), f"hydra.run.dir={first}"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    second = tmp_path / "second"
    out = train(tmp_path, second, f"init_from={first}", **{"train.max_steps": 2})
    assert out.returncode == 0, out.stderr[-3000:]
    val = lambda run: [r["loss"] for r in read_metrics(run) if r.get("split") == "val"]  # noqa: E731
    assert val(second)[0] == pytest.approx(val(first)[-1], rel=1e-6)  # step 0 = the source


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.moe.num_experts=8", "contradicts init_from"),
        ("model=tiny_dense", "brings its own"),
    ],
)
def test_a_contradicting_model_override_is_one_line(tmp_path, override, message):
    source = hf_directory(tmp_path, "qwen3_moe")
    out = train(tmp_path, tmp_path / "run", f"init_from={source}", override)
    assert out.returncode == 2 and message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path):
    source = hf_directory(tmp_path, "mixtral")
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "vocab_size": 200}))
    out = train(tmp_path, tmp_path / "run", f"init_from={source}")
    assert out.returncode == 2 and "does not match the model" in out.stderr


def test_chat_fine_tuning_renders_with_the_model_chat_template(tmp_path):
    """``data.format=chat`` on an imported model: its ``tokenizer_config.json`` template
    (ChatML with two special tokens) renders the data, the run lowers the reply loss, and a
    record without the chat fields is one line, exit 2."""
    from moe.data import DataSection, build_data
    from tests.data.test_chat import CHATML, write_chats

    config_cls, model_cls, extra = FAMILIES["qwen3_moe"]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**{**COMMON, "vocab_size": 258, **extra})
    source = tmp_path / "chat_model"
    getattr(transformers, model_cls)(config).save_pretrained(source)
    tokenizer = byte_tokenizer()
    tokenizer.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tokenizer.save(str(source / "tokenizer.json"))
    settings = {"chat_template": CHATML, "eos_token": "<|im_end|>"}
    (source / "tokenizer_config.json").write_text(json.dumps(settings))
    chats = write_chats(tmp_path / "chat.jsonl", n=300)

    data = DataSection(path=str(chats), format="chat", cache_dir=str(tmp_path / "cache"))
    stream = build_data(data, 16, tokenizer, model_dir=source).train.stream
    assert (stream == tokenizer.token_to_id("<|im_start|>")).sum() > 0

    run = tmp_path / "run"
    args = [f"init_from={source}", f"data.path={chats}", "data.format=chat", "optim.lr=3e-3"]
    out = train(tmp_path, run, *args, **{"train.max_steps": 20})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "assistant replies" in out.stdout + out.stderr
    val = [r["loss"] for r in read_metrics(run) if r.get("split") == "val"]
    assert val[-1] < val[0]
    # The checkpoint carries the template: moe-eval renders the data as the run did.
    assert "<|im_start|>" in (run / "checkpoints/step_20/tokenizer_config.json").read_text()
    evaluated = subprocess.run(
        [sys.executable, "-m", "moe.cli.eval", f"checkpoint={run}"], capture_output=True, text=True
    )
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert json.loads(evaluated.stdout.splitlines()[-1])["loss"] == pytest.approx(val[-1], rel=1e-5)

    (tmp_path / "bad.jsonl").write_text('{"question": "1+1", "answer": "2"}\n')
    args = [f"init_from={source}", f"data.path={tmp_path / 'bad.jsonl'}", "data.format=chat"]
    out = train(tmp_path, tmp_path / "bad_run", *args)
    assert out.returncode == 2 and "'prompt' and 'response'" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
