"""Every shell command of README.md, run as a user runs it, so the docs cannot drift.

The commands are read from the README's fenced ``bash`` blocks. ``PLAN`` says, for each,
how this CPU machine runs it:
- ``Run``: as written, in bash, in one shared workspace (so later commands use earlier
  ones' outputs: eval, export, upcycle, report), with the small-run overrides ``SMALL``
  appended (4 steps; sweeps narrowed to two jobs or two trials);
- ``StandIn``: what runs instead, and why (2 CPU processes for 4 or 8 GPUs, one host for
  several nodes);
- ``NotRun``: why it cannot run here and which test covers the same path.
A README command missing from ``PLAN`` (or a ``PLAN`` entry missing from the README) fails
``test_every_readme_command_is_planned``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from moe.train.metrics import read_metrics
from tests.data.test_chat import write_chats

REPO = Path(__file__).resolve().parents[2]
SMALL = "train.max_steps=4 eval.every=2 eval.batches=1 checkpoint.every=2 logger.progress_bar=false"
TWO_JOBS = "optim.lr=1e-3,3e-3 train.aux_loss_coef=0.01"  # narrows a 9-job sweep


@dataclass
class Run:
    append: str = SMALL


@dataclass
class StandIn:
    command: str
    why: str


@dataclass
class NotRun:
    why: str


QWEN_30B = (  # the fine-tuning options of the README's Qwen3-30B-A3B commands
    "parallel.engine=deepspeed parallel.zero_stage=2 train.dtype=bfloat16 "
    "train.checkpointing=full train.seq_len=4096 train.global_batch_size=64 "
    "train.micro_batch_size=1 data.path=my_chats.jsonl data.format=chat optim.lr=1e-5"
)
INSTALLED = "the install is .ci/run's first step; this suite runs in the environment it made"
PLAN = {
    'pip install -e ".[dev]" && moe-train': StandIn(f"moe-train {SMALL}", INSTALLED),
    'pip install -e ".[dev]" && python -m pytest -q': NotRun(f"this suite itself; {INSTALLED}"),
    "moe-train": Run(),
    "moe-train model=tiny_dense hydra.run.dir=runs/dense": Run(),
    "moe-train model.moe.num_experts=16 model.moe.top_k=2 train.max_steps=2000": Run(),
    "moe-train data.path='my_texts/*.jsonl' data.text_field=content data.tokenizer=bpe": Run(),
    "moe-train train.dtype=bfloat16 train.checkpointing=moe": Run(),
    "moe-train hydra.run.dir=runs/a resume=auto": Run(),
    "moe-train -m +experiment=moe_vs_dense": Run(),
    "moe-eval checkpoint=runs/a": Run(append=""),
    "torchrun --standalone --nproc_per_node=2 -m moe.train parallel.ep=2": Run(),
    "torchrun --standalone --nproc_per_node=4 -m moe.train parallel.ep=4 hydra.run.dir=runs/ep4": (
        StandIn(
            "torchrun --standalone --nproc_per_node=2 -m moe.train parallel.ep=2 "
            f"hydra.run.dir=runs/ep4 {SMALL}",
            "2 CPU cores: 2 processes with EP=2 (EP=4 is tested in tests/parallel)",
        )
    ),
    "torchrun --standalone --nproc_per_node=4 -m moe.train parallel.ep=2 "
    "hydra.run.dir=runs/dp2ep2": (
        StandIn(
            "torchrun --standalone --nproc_per_node=2 -m moe.train parallel.ep=1 "
            f"hydra.run.dir=runs/dp2ep2 {SMALL}",
            "2 CPU cores: data parallel over 2 processes (DP2 x EP2 is tested in tests/parallel)",
        )
    ),
    "bash launch/torchrun_single_node.sh 8 parallel.ep=8 model=gpu_1b train.dtype=bfloat16": (
        StandIn(
            f"bash launch/torchrun_single_node.sh 2 parallel.ep=2 train.dtype=bfloat16 {SMALL}",
            "8 GPUs and the 1B preset: 2 CPU processes with the tiny model",
        )
    ),
    "accelerate launch --config_file launch/accelerate.yaml --num_processes 2 -m moe.train "
    "parallel.ep=2": Run(),
    "accelerate launch --config_file launch/accelerate.yaml -m moe.train parallel.ep=8 "
    "hydra.run.dir=runs/acc": StandIn(
        "accelerate launch --config_file launch/accelerate.yaml --num_processes 2 -m moe.train "
        f"parallel.ep=2 hydra.run.dir=runs/acc {SMALL}",
        "the file's 8 processes are GPUs: 2 CPU processes",
    ),
    "MASTER_ADDR=node0 NNODES=4 RUN_DIR=/shared/runs/a bash launch/torchrun_multi_node.sh 8 "
    "parallel.ep=8": StandIn(
        "MASTER_ADDR=127.0.0.1 NNODES=1 RUN_DIR=runs/multi_node "
        f"bash launch/torchrun_multi_node.sh 2 parallel.ep=2 {SMALL}",
        "several nodes: the same script as one node of 2 processes (c10d rendezvous)",
    ),
    "sbatch --nodes=4 launch/slurm.sbatch parallel.ep=8 model=gpu_1b": NotRun(
        "needs Slurm; launch/slurm.sbatch runs with srun/scontrol stand-ins in "
        "tests/e2e/test_engines_and_launchers.py (preemption and requeue)"
    ),
    "RUN_DIR=/shared/runs/a bash launch/deepspeed.sh launch/hostfile parallel.ep=8": StandIn(
        f"RUN_DIR=runs/ds_ssh bash launch/deepspeed.sh my_hostfile parallel.ep=2 {SMALL}",
        "node0/node1 over ssh: a one-host hostfile (localhost slots=2)",
    ),
    "NODE_RANK=0 MASTER_ADDR=node0 RUN_DIR=/shared/runs/a bash launch/deepspeed.sh "
    "launch/hostfile parallel.ep=8": NotRun(
        "several nodes; the same per-node path (NODE_RANK, no ssh) runs with a one-host "
        "hostfile in tests/e2e/test_engines_and_launchers.py"
    ),
    "RUN_DIR=runs/ds bash launch/deepspeed.sh my_hostfile parallel.ep=2": Run(),
    "moe-train -m model.moe.num_experts=8,16,32 optim.lr=1e-3,3e-3": Run(),
    "moe-train -m +sweep=equal_active_experts": Run(),
    "moe-train -m +launcher=local +sweep=lr_aux": Run(append=f"{SMALL} {TWO_JOBS}"),
    "moe-train -m +launcher=slurm +sweep=lr_aux hydra.launcher.partition=gpu": NotRun(
        "needs a Slurm cluster (submitit submits with sbatch); the same sweep runs with "
        "+launcher=local above"
    ),
    "moe-train -m +sweep=lr_aux hydra.sweep.dir=multirun/lr resume=auto": Run(
        append=f"{SMALL} {TWO_JOBS}"
    ),
    "moe-sweep-report multirun/lr": Run(append=""),
    "moe-sweep +sweep=optuna_lr_aux optuna.n_trials=20 optuna.workers=2": Run(
        append=f"{SMALL} optuna.n_trials=2"
    ),
    "moe-sweep +sweep=optuna_lr_aux optuna.launcher=submitit_local optuna.workers=2 "
    "optuna.study_name=lr_aux_jobs": Run(append=f"{SMALL} optuna.n_trials=2"),
    "moe-sweep +sweep=optuna_lr_aux optuna.launcher=submitit_slurm optuna.storage=journal "
    "optuna.workers=8 optuna.slurm.partition=gpu": NotRun(
        "needs a Slurm cluster (submitit submits with sbatch); the same worker jobs run with "
        "optuna.launcher=submitit_local above, journal storage in tests/sweep/test_optuna.py"
    ),
    "moe-sweep-report sweeps/lr_aux": Run(append=""),
    "moe-export checkpoint=runs/a out=hf_model format=hf": Run(append=""),
    "moe-train init_from=Qwen3-MoE-tiny hydra.run.dir=runs/ft": Run(),
    "moe-train init_from=Qwen3-MoE-tiny data.path='my_texts/*.jsonl' data.text_field=content "
    "model.moe.capacity_factor=1.25 hydra.run.dir=runs/ft_capacity": Run(),
    "torchrun --standalone --nproc_per_node=2 -m moe.train init_from=Qwen3-MoE-tiny "
    "parallel.ep=2 hydra.run.dir=runs/ft_ep": Run(),
    "moe-train init_from=Qwen3-MoE-tiny data.path=my_chats.jsonl data.format=chat "
    "hydra.run.dir=runs/ft_chat": Run(),
    "torchrun --standalone --nproc_per_node=8 -m moe.train init_from=Qwen3-30B-A3B parallel.ep=8 "
    f"{QWEN_30B} hydra.run.dir=runs/qwen3_30b": StandIn(
        "torchrun --standalone --nproc_per_node=2 -m moe.train init_from=Qwen3-MoE-tiny "
        f"{QWEN_30B.replace('seq_len=4096', 'seq_len=128')} parallel.ep=2 "
        f"hydra.run.dir=runs/qwen3_30b {SMALL}",
        "8 GPUs and a 61 GB checkpoint: the same options, 2 CPU processes, the tiny Qwen3-MoE",
    ),
    "MASTER_ADDR=node0 NNODES=2 RUN_DIR=/shared/runs/qwen3_30b bash launch/torchrun_multi_node.sh "
    f"8 init_from=Qwen3-30B-A3B parallel.ep=16 {QWEN_30B}": NotRun(
        "two nodes of GPUs; the command above runs the same options, and the same script "
        "runs as one node of 2 processes in this suite (MASTER_ADDR=127.0.0.1 NNODES=1)"
    ),
    "moe-export checkpoint=runs/qwen3_30b out=qwen3_30b_ft format=hf dtype=bfloat16": Run(
        append=""
    ),
    "moe-export checkpoint=runs/ft out=hf_ft format=hf": Run(append=""),
    "moe-export checkpoint=runs/a out=experts format=experts layers=[0,2] experts=[1,5]": Run(
        append=""
    ),
    "moe-export checkpoint=runs/a out=pruned format=pruned keep=4": Run(append=""),
    "moe-upcycle source=runs/dense out=runs/upcycled num_experts=8 top_k=2": Run(append=""),
}


def readme_commands(text: str) -> list[str]:
    """Each command of the fenced bash blocks, comments and line continuations removed."""
    commands = []
    for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s+)#(\s.*)?$", "", line).strip()
            line = re.sub(r"\s+", " ", line)
            if line and line not in commands:
                commands.append(line)
    return commands


COMMANDS = readme_commands((REPO / "README.md").read_text())


def test_every_readme_command_is_planned():
    assert [c for c in COMMANDS if c not in PLAN] == [], "add these README commands to PLAN"
    assert [c for c in PLAN if c not in COMMANDS] == [], "PLAN lists commands the README lost"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The user's working directory: the repository's launch files and a few inputs the
    README's commands name (texts for data.path, a one-host DeepSpeed hostfile)."""
    root = tmp_path_factory.mktemp("readme")
    (root / "launch").symlink_to(REPO / "launch")
    texts = root / "my_texts"
    texts.mkdir()
    for i in range(2):
        rows = [
            {"content": f"document {i}.{j}: the router sends tokens to experts " * 8}
            for j in range(40)
        ]
        (texts / f"part{i}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "my_hostfile").write_text("localhost slots=2\n")
    write_chats(root / "my_chats.jsonl", n=200)
    open_moe_model(root / "Qwen3-MoE-tiny")
    return root


def open_moe_model(directory: Path) -> None:
    """What a user downloads from a hub, made here: a tiny random Qwen3-MoE with its
    tokenizer (a byte tokenizer saved as tokenizer.json)."""
    import torch
    import transformers

    from moe.data.tokenizer import byte_tokenizer

    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        max_position_embeddings=256,
    )
    transformers.Qwen3MoeForCausalLM(config).save_pretrained(directory)
    byte_tokenizer().save(str(directory / "tokenizer.json"))


def shell(command: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "WANDB_MODE": "disabled",  # honoured (config keys left null); keeps the runs light
        "PYTHONPATH": "",
    }
    return subprocess.run(
        ["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command(command, workspace):
    action = PLAN.get(command)
    if action is None:
        pytest.fail("not in PLAN (see test_every_readme_command_is_planned)")
    if isinstance(action, NotRun):
        pytest.skip(action.why)
    line = action.command if isinstance(action, StandIn) else f"{command} {action.append}"
    out = shell(line, workspace)
    assert out.returncode == 0, f"{line}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    check_outputs(line, workspace, out.stdout)


def check_outputs(command: str, root: Path, stdout: str) -> None:
    """What the command that ran promises to leave behind, where it names it."""
    if "hydra.run.dir=runs/a" in command:
        assert (root / "runs/a/summary.json").exists()
        assert not (root / "runs/a/wandb").exists()  # WANDB_MODE=disabled was honoured
        assert [r for r in read_metrics(root / "runs/a") if r.get("split") == "val"]
    if command.startswith("moe-eval"):
        assert "loss" in json.loads(stdout.strip().splitlines()[-1])
    if command.startswith("moe-sweep-report multirun"):
        for name in ("report.csv", "report.md", "report.png"):
            assert (root / "multirun/lr" / name).stat().st_size > 0
    if command.startswith("moe-sweep-report sweeps"):
        assert "Best trial" in stdout
        for name in ("study.md", "trials.csv", "history.png"):
            assert (root / "sweeps/lr_aux" / name).stat().st_size > 0
    if command.startswith("moe-sweep +"):
        name = "lr_aux_jobs" if "study_name=lr_aux_jobs" in command else "lr_aux"
        assert "Best trial" in stdout and (root / "sweeps" / name / "trial_0001").is_dir()
    if "out=hf_model format=hf" in command:
        assert (root / "hf_model/config.json").exists()
    if "out=hf_ft format=hf" in command:
        exported = json.loads((root / "hf_ft/config.json").read_text())
        assert exported["architectures"] == ["Qwen3MoeForCausalLM"]
    if "init_from=" in command:
        run_dir = root / re.search(r"hydra.run.dir=(\S+)", command).group(1)
        assert json.loads((run_dir / "summary.json").read_text())["params_total"] > 0
    if "out=runs/upcycled" in command:
        assert list((root / "runs/upcycled").rglob("complete.json"))
    for run_dir in re.findall(r"RUN_DIR=(runs/\w+)", command):
        assert (root / run_dir / "summary.json").exists()
