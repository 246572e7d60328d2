"""scripts/expert_scaling_report.py on hand-made runs: grouping, means, the baseline and
the steps to reach its final loss."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "expert_scaling_report.py"


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("expert_scaling_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_run(root: Path, name: str, experts: int, d_ff: int, val: dict[int, float]) -> None:
    run = root / name
    run.mkdir(parents=True)
    config = {"model": {"moe": {"num_experts": experts, "d_ff": d_ff}}}
    (run / "run_config.json").write_text(json.dumps(config))
    lines = [{"step": s, "split": "val", "loss": v} for s, v in val.items()]
    lines.insert(1, {"step": 5, "loss": 9.0})  # a training record: not a validation point
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (run / "summary.json").write_text("{}")


def test_groups_by_experts_against_the_dense_model(tmp_path, report):
    fake_run(tmp_path, "E1_s0", 1, 256, {0: 5.0, 50: 2.0, 100: 1.6})
    fake_run(tmp_path, "E1_s1", 1, 256, {0: 5.0, 50: 2.2, 100: 1.8})
    fake_run(tmp_path, "E8_s0", 8, 128, {0: 5.0, 50: 1.6, 100: 1.5})
    fake_run(tmp_path, "E8_unfinished", 8, 128, {0: 5.0})
    (tmp_path / "E8_unfinished" / "summary.json").unlink()
    rows = report.table(report.val_curves(tmp_path))
    assert [(r["experts"], r["seeds"]) for r in rows] == [(1, 2), (8, 1)]
    assert rows[0]["final_val_mean"] == pytest.approx(1.7)
    assert rows[0]["final_val_min"] == 1.6 and rows[0]["final_val_max"] == 1.8
    # the dense mean final is 1.7; E=8's curve is at 1.6 by step 50
    assert rows[1]["steps_to_dense_final"] == 50
    assert rows[1]["fraction_of_steps"] == pytest.approx(0.5)


def test_groups_by_width_against_the_narrowest(tmp_path, report):
    fake_run(tmp_path, "F256", 1, 256, {0: 5.0, 50: 2.0, 100: 1.6})
    fake_run(tmp_path, "F1024", 1, 1024, {0: 5.0, 50: 1.9, 100: 1.55})
    fake_run(tmp_path, "E8", 8, 128, {0: 5.0, 50: 1.5, 100: 1.4})  # d_ff 128: the narrowest
    rows = report.table(report.val_curves(tmp_path, "d_ff"), "d_ff")
    assert [r["d_ff"] for r in rows] == [128, 256, 1024]
    assert [r["steps_to_dense_final"] for r in rows] == [100, None, None]
    table = report.markdown(rows, "d_ff")
    assert "| d_ff |" in table and "steps to narrowest final" in table
    assert "| 256 | 1 | 1.6000 | 1.6000 - 1.6000 | not reached | - |" in table
