"""The benchmark scripts run end to end at toy sizes and their rows add up (no timing is
judged here: only that every configuration is measured and the ratios are the ratios of
the times they print). A script that breaks would otherwise be found on a GPU lease."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from moe.kernels.cpu_gemm import avx512_available

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
GRID = ["--tokens", "64", "--d-model", "32", "--d-ff", "32", "--experts", "4,6", "--top-k", "1,2"]


def run(script: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / script), *args], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def cell(row: dict) -> tuple[int, int]:
    return row["num_experts"], row["top_k"]


def test_layer_benchmark_measures_every_cell(tmp_path):
    out = tmp_path / "layer.json"
    run("bench_moe_layer.py", *GRID, "--dtypes", "float32", "--backends", "auto", "--peers", "",
        "--reps", "2", "--warmup", "1", "--json", str(out))  # fmt: skip
    rows = json.loads(out.read_text())
    growth = [r for r in rows if r["impl"] == "growth"]
    rows = [r for r in rows if r["impl"] != "growth"]
    ms = {(*cell(r), r["impl"]): r["ms"] for r in rows}
    assert set(ms) == {(E, k, i) for E in (4, 6) for k in (1, 2) for i in ("ours_auto", "dense")}
    for r in rows:
        dense = ms[(*cell(r), "dense")]
        assert r["ms"] > 0 and r["samples"] == 2
        assert r["pct_of_dense"] == pytest.approx(100 * dense / r["ms"], rel=0.02, abs=0.2)
        assert r["pct_of_limit"] >= r["pct_of_dense"] - 0.1  # the limit is at least dense
    assert all(r["max_abs_diff_vs_ours"] == 0 for r in rows if r["impl"] == "ours_auto")
    # The cost growth, E=6 over E=4, measured interleaved: one row per k.
    assert sorted((r["top_k"], r["base_experts"], r["num_experts"]) for r in growth) == [
        (1, 4, 6),
        (2, 4, 6),
    ]
    for r in growth:
        assert r["ms"] > 0 and r["base_ms"] > 0 and r["samples"] == 2
        assert r["growth"] == pytest.approx(r["ms"] / r["base_ms"], rel=0.01)


def test_experts_alone_benchmark_measures_every_cell(tmp_path):
    out = tmp_path / "gemms.json"
    run("bench_expert_gemms.py", *GRID, "--dtypes", "float32", "--reps", "2", "--warmup", "1",
        "--json", str(out))  # fmt: skip
    rows = json.loads(out.read_text())
    assert {cell(r) for r in rows} == {(E, k) for E in (4, 6) for k in (1, 2)}
    for r in rows:
        assert r["experts_ms"] > 0 and r["dense_ms"] > 0
        ratio = 100 * r["dense_ms"] / r["experts_ms"]
        assert r["experts_pct_of_dense"] == pytest.approx(ratio, rel=0.02, abs=0.2)


def test_training_step_benchmark_reports_ratio_and_mfu(tmp_path):
    out = tmp_path / "train.json"
    run("bench_train.py", "--presets", "tiny", "--dtypes", "float32", "--steps", "1",
        "--compile", "false", "--json", str(out))  # fmt: skip
    (row,) = json.loads(out.read_text())["rows"]
    moe, dense = row["moe"], row["dense"]
    assert row["moe_over_dense"] == pytest.approx(moe["tokens_per_s"] / dense["tokens_per_s"])
    for model in (moe, dense):
        mfu = model["tokens_per_s"] * model["flops_per_token"] / row["peak_flops"]
        assert model["mfu"] == pytest.approx(mfu) and model["mfu"] > 0
    assert (
        moe["params_total"]
        > moe["params_active"]
        == pytest.approx(dense["params_active"], rel=0.05)
    )
    # The ceiling: the dense step plus AdamW's 28 bytes per parameter the dense twin lacks.
    dense_step = row["tokens_per_step"] / dense["tokens_per_s"]
    traffic = (moe["params_total"] - dense["params_total"]) * 28 / row["copy_bytes_per_s"]
    assert row["moe_ceiling"] == pytest.approx(dense_step / (dense_step + traffic))
    assert 0 < row["moe_ceiling"] < 1


def test_profile_prints_the_step_table():
    out = run("profile_moe_layer.py", "--tokens", "64", "--d-model", "32", "--d-ff", "32",
              "--experts", "4", "--steps", "1", "--rows", "30")  # fmt: skip
    # The experts' grouped GEMM, whichever backend runs it (the eager autograd function).
    assert "Self CPU time total" in out and "_EagerGroupedMM" in out


@pytest.mark.skipif(not avx512_available(), reason="times our avx512 module: not on this CPU")
def test_cpu_op_times_covers_the_layer_with_our_calls():
    out = run("cpu_op_times.py", "--tokens", "64", "--d-model", "32", "--d-ff", "32",
              "--experts", "4", "--dtype", "float32", "--steps", "2", "--warmup", "1")  # fmt: skip
    head = re.search(r"E=4: layer ([\d.]+), dense FFN ([\d.]+) .* in our calls ([\d.]+)", out)
    assert head, out
    layer_ms, dense_ms, ours_ms = map(float, head.groups())
    # A line per call site: the function, its operands' shapes, its milliseconds.
    ops = re.findall(r"^ {4}(\w+)((?: \d+(?:x\d+)+)*) +([\d.]+)$", out, re.MULTILINE)
    # Every GEMM of the experts and SwiGLU ran through our module, inside the layer's time.
    names = {name for name, _, _ in ops}
    assert {"gmm_x_wt", "gmm_x_w", "gmm_at_b", "swiglu_forward", "swiglu_backward"} <= names
    assert sum(float(ms) for _, _, ms in ops) == pytest.approx(ours_ms, abs=0.05 * len(ops))
    # The two projections' forward GEMMs apart (4 experts: [2F, D] = 64x32 and [D, F] = 32x32).
    labels = {name + shapes for name, shapes, _ in ops}
    assert {"gmm_x_wt 64x32 4x64x32", "gmm_x_wt 64x32 4x32x32"} <= labels, labels
    assert 0 < ours_ms <= layer_ms and dense_ms > 0


@pytest.mark.skipif(
    not importlib.util.find_spec("triton") or os.environ.get("TRITON_INTERPRET") != "1",
    reason="on a CPU this needs triton and its interpreter (TRITON_INTERPRET=1, conftest)",
)
def test_gemm_kernel_benchmark_builds_six_gemms_whose_kernels_agree():
    """``bench_gemm_kernels.py`` times GPU kernels only (on a CPU it stops with one line);
    the six GEMMs it builds and every implementation it compares, at a toy size under
    Triton's interpreter, agree with grouped_mm and their FLOPs match their shapes."""
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / "bench_gemm_kernels.py")], capture_output=True, text=True
    )
    assert done.returncode != 0 and "no CUDA device" in done.stderr
    sys.path.insert(0, str(SCRIPTS))
    try:
        import bench_gemm_kernels as bench
    finally:
        sys.path.remove(str(SCRIPTS))
    T, D, F, E, k = 96, 64, 64, 4, 2
    built = list(bench.roles(T, D, F, E, k, "cpu"))
    assert [name for name, *_ in built] == ["in", "out", "in_dx", "out_dx", "in_dw", "out_dw"]
    inner_outer = {"in": (D, 2 * F), "out": (F, D), "in_dx": (2 * F, D), "out_dx": (D, F)}
    inner_outer |= {"in_dw": (2 * F, D), "out_dw": (D, F)}
    for name, flops, dense, grouped, impls in built:
        assert flops == 2 * T * k * inner_outer[name][0] * inner_outer[name][1]
        expected = grouped()
        assert dense().numel() * (E if name.endswith("dw") else 1) == expected.numel()
        assert len(impls) == 2
        for impl, call in impls.items():
            assert bench.rel_diff(call(), expected) < 1e-2, (name, impl)
