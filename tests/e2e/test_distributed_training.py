"""The trainer under torchrun (gloo, CPU) against one process: per-step losses, checkpoints
resumed at another layout, and preemption with several ranks."""

import json
import os
import signal
import subprocess
import time

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from moe import load_model
from moe.checkpoint import complete_checkpoints
from moe.layers import is_expert_param
from tests.e2e.runs import launch, losses, run
from tests.train.helpers import small_overrides

pytest.importorskip("hydra")


@pytest.mark.parametrize("procs, ep", [(2, 2), (4, 4), (4, 2)], ids=["ep2", "ep4", "dp2xep2"])
def test_expert_parallel_training_matches_one_process(tmp_path, procs, ep):
    extra = {"train.max_steps": 20, "eval.every": 10}
    run(launch(tmp_path, tmp_path / "one", 1, 1, **extra))
    run(launch(tmp_path, tmp_path / "many", procs, ep, **extra))
    one, many = losses(tmp_path / "one"), losses(tmp_path / "many")
    assert sorted(many) == list(range(1, 21))
    # Same global micro-batches; float32 sums in another order (all-reduce, per-rank
    # partial sums) differ by ulps that AdamW keeps around 1e-6 relative over 20 steps.
    for step in one:
        assert many[step] == pytest.approx(one[step], rel=1e-5, abs=1e-5), step
    for step, value in losses(tmp_path / "one", "val").items():
        assert losses(tmp_path / "many", "val")[step] == pytest.approx(value, rel=1e-5)


def test_checkpoint_from_four_ranks_resumes_on_two_and_on_one(tmp_path):
    extra = {"train.max_steps": 12, "checkpoint.every": 6, "checkpoint.keep": 4}
    run(launch(tmp_path, tmp_path / "straight", 1, 1, **extra))
    run(launch(tmp_path, tmp_path / "ep4", 4, 4, **{**extra, "train.max_steps": 6}))
    saved = tmp_path / "ep4" / "checkpoints" / "step_6"
    assert saved.exists()
    # Sharded: every expert tensor (weights and moments) was written as 4 slices, one per
    # EP rank, each from its own rank's file.
    metadata = FileSystemReader(saved).read_metadata().state_dict_metadata
    experts = [k for k in metadata if is_expert_param(k) and len(metadata[k].size) > 0]
    assert experts and all(len(metadata[k].chunks) == 4 for k in experts)
    assert len(list(saved.glob("__*_0.distcp"))) == 4
    # The expert-parallel checkpoint exports like any other (it holds the full experts).
    transformers = pytest.importorskip("transformers")
    from moe.checkpoint import load_tokenizer
    from moe.export.hf import export_hf

    model = load_model(saved)
    export_hf(model, load_tokenizer(saved), tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf(ids).logits
    assert ((ours - theirs).abs().max() / ours.abs().max()).item() <= 1e-5
    for name, procs, ep in [("on_two", 2, 2), ("on_one", 1, 1)]:
        run(launch(tmp_path, tmp_path / name, procs, ep, **{**extra, "resume": str(saved)}))
        reference, resumed = losses(tmp_path / "straight"), losses(tmp_path / name)
        assert sorted(resumed) == list(range(7, 13))
        for step in resumed:
            assert resumed[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-5), (name, step)
        a = load_model(tmp_path / "straight").state_dict()
        b = load_model(tmp_path / name).state_dict()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)


def test_sigterm_with_two_ranks_checkpoints_and_resumes(tmp_path):
    run_dir = tmp_path / "preempted"
    cmd = launch(tmp_path, run_dir, 2, 2, **{"train.max_steps": 2000, "checkpoint.every": 500})
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    # A logged training step means both ranks have their signal handlers installed.
    while not losses(run_dir) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # torchrun forwards it to both ranks
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "SIGTERM received: stopped after step" in err
    assert json.loads((run_dir / "status.json").read_text())["status"] == "preempted"
    step = int(complete_checkpoints(run_dir)[-1].name.split("_")[1])
    assert 0 < step < 500
    resume = launch(
        tmp_path,
        run_dir,
        2,
        2,
        **{"train.max_steps": step + 2, "checkpoint.every": 500, "resume": "auto"},
    )
    run(resume)
    assert json.loads((run_dir / "summary.json").read_text())["steps_this_run"] == 2


def test_single_node_launch_file(tmp_path):
    overrides = small_overrides(tmp_path, **{"train.max_steps": 2, "train.micro_batch_size": 2})
    out = subprocess.run(
        ["bash", "launch/torchrun_single_node.sh", "2", "parallel.ep=2", *overrides],
        capture_output=True,
        text=True,
        env={**os.environ, "RUN_DIR": str(tmp_path / "run")},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "step_2" / "complete.json").exists()
