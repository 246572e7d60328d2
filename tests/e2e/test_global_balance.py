"""Global load balancing (the default): the loss, and so the training run, is the same
whatever the micro-batch and the layout; micro-batch balancing is not (the check that the
comparison can fail)."""

import sys

import pytest

from moe.train.metrics import read_metrics
from tests.e2e.runs import losses, run
from tests.train.helpers import small_overrides

pytest.importorskip("hydra")

STEPS = 10


def command(tmp_path, name, procs, ep, micro, **extra):
    overrides = small_overrides(
        tmp_path,
        **{
            "train.deterministic": True,
            "train.max_steps": STEPS,
            "train.global_batch_size": 8,
            "train.micro_batch_size": micro,
            "eval.every": STEPS,
            "checkpoint.every": STEPS,
            # A strong balancing term, so that a split-dependent one would show in the loss.
            "train.aux_loss_coef": 0.1,
            **extra,
        },
    )
    head = [sys.executable, "-m", "moe.train"]
    if procs > 1:
        head = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}"]
        head += ["--standalone", "-m", "moe.train"]
    return [*head, *overrides, f"parallel.ep={ep}", f"hydra.run.dir={tmp_path / name}"]


def aux_losses(run_dir):
    return {r["step"]: r["aux_loss"] for r in read_metrics(run_dir) if "split" not in r}


def assert_same_losses(a, b):
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5), step


def test_global_balance_does_not_depend_on_micro_batch_or_layout(tmp_path):
    run(command(tmp_path, "micro8", 1, 1, 8))
    reference = losses(tmp_path / "micro8")
    # micro-batch 2: four micro-batches per step; EP=4: 4 ranks x 1 sequence, two
    # micro-batches per step; DP2 x EP2: 4 ranks x 2 sequences, one micro-batch per step.
    for name, procs, ep, micro in [("micro2", 1, 1, 2), ("ep4", 4, 4, 1), ("dp2ep2", 4, 2, 2)]:
        run(command(tmp_path, name, procs, ep, micro))
        assert_same_losses(reference, losses(tmp_path / name))
        assert_same_losses(aux_losses(tmp_path / "micro8"), aux_losses(tmp_path / name))


def test_micro_batch_balance_depends_on_the_micro_batch(tmp_path):
    run(command(tmp_path, "micro8", 1, 1, 8, **{"model.moe.balance": "micro"}))
    run(command(tmp_path, "micro2", 1, 1, 2, **{"model.moe.balance": "micro"}))
    a, b = losses(tmp_path / "micro8"), losses(tmp_path / "micro2")
    # The first step's loss already differs (same weights, same sequences).
    assert a[1] != pytest.approx(b[1], rel=1e-4)
    assert aux_losses(tmp_path / "micro8")[1] != pytest.approx(aux_losses(tmp_path / "micro2")[1])
