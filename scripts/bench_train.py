"""Training-step throughput: an MoE model against its dense twin with equal active
parameters (every MoE FFN replaced by a dense SwiGLU FFN of width ``top_k * moe.d_ff``).

Both train on the same random token batches, steps interleaved in one process (forward,
backward, the trainer's AdamW), medians after warm-up. Columns: tokens/s of each, the ratio
MoE/dense, training FLOPs per token (``MoETransformer.flops_per_token``) and MFU against the
measured rate of one large matmul in the same dtype on this machine (the peak it states),
and the MoE/dense ceiling that the optimizer's memory traffic sets: the dense twin's step time
plus ``BYTES_PER_EXTRA_PARAM`` bytes for each parameter the dense twin lacks, at the measured
rate of one large copy.
On the CPU the process keeps freed memory for reuse, as the trainer does
(``moe/train/host_memory.py``).

    python scripts/bench_train.py                      # tiny and small, float32 and bfloat16
    python scripts/bench_train.py --presets gpu_1b --dtypes bfloat16 --json out.json
"""

from __future__ import annotations

import moe  # noqa: F401  first, as in moe-train: torch's allocator options (moe/__init__.py)

# isort: split
import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from moe.model import ModelConfig, MoETransformer
from moe.train.compile import compile_blocks
from moe.train.config import OptimSection
from moe.train.host_memory import keep_freed_host_memory
from moe.train.optim import build_optimizer
from moe.typed_config import from_dict

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
BATCH = {"tiny": (16, 128), "small": (8, 256), "gpu_1b": (8, 2048)}  # sequences, tokens
# Fused AdamW's memory traffic a step per float32 parameter: it reads the parameter, its
# gradient and both moments and writes the parameter and the moments. It is a phase of its
# own, so its time adds to the step. The ceiling assumes the MoE forward and backward take
# the dense twin's time (the GEMMs' weight traffic can overlap their compute); where our
# grouped GEMMs outrun the dense twin's library matmuls (float32 on the CPU), the ratio
# can pass it.
BYTES_PER_EXTRA_PARAM = 16 + 12


def preset(name: str, backend: str = "auto") -> ModelConfig:
    values = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    values.pop("defaults", None)
    cfg = from_dict(ModelConfig, values, "model.")
    return dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, backend=backend))


def dense_twin(cfg: ModelConfig) -> ModelConfig:
    """Every block dense, FFN width ``top_k * moe.d_ff``: the MoE model's active FFN."""
    width = cfg.moe.top_k * cfg.moe.d_ff
    if cfg.moe_every != 1 and width != cfg.d_ff:
        raise SystemExit(f"{cfg}: dense blocks of width {cfg.d_ff} differ from {width}")
    return dataclasses.replace(cfg, moe_every=0, d_ff=width)


def matmul_peak(dtype: torch.dtype, device: torch.device) -> float:
    """FLOP/s of one n x n x n matmul, the machine's practical peak in this dtype (n large
    enough on a GPU that launch latency does not count)."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / median_seconds(lambda: a @ b, device)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s (read + write) of one 256 MB float32 copy, the machine's practical memory rate."""
    a = torch.randn(64 * 2**20, device=device)
    b = torch.empty_like(a)
    return 2 * a.numel() * a.element_size() / median_seconds(lambda: b.copy_(a), device)


def median_seconds(fn, device: torch.device, reps: int = 6) -> float:
    """Median time of ``fn`` over ``reps`` calls after the first."""
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def moe_ceiling(row: dict) -> float:
    """The best MoE/dense ratio the optimizer's memory traffic allows: the dense twin's step
    time plus AdamW's pass over the parameters it lacks (their compute is the dense twin's)."""
    dense_step = row["tokens_per_step"] / row["dense"]["tokens_per_s"]
    extra = row["moe"]["params_total"] - row["dense"]["params_total"]
    return dense_step / (dense_step + extra * BYTES_PER_EXTRA_PARAM / row["copy_bytes_per_s"])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_step(model: MoETransformer, dtype: torch.dtype, device: torch.device):
    optimizer = build_optimizer(model, OptimSection())  # the trainer's AdamW

    def step(ids: torch.Tensor) -> float:
        sync(device)
        start = time.perf_counter()
        torch.compiler.cudagraph_mark_step_begin()  # a new step for CUDA graphs, if any
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = model(ids[:, :-1])
        loss = F.cross_entropy(out.logits.float().flatten(0, 1), ids[:, 1:].flatten())
        (loss + 0.001 * out.aux_loss).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        return time.perf_counter() - start

    return step


def bench(
    name: str,
    dtype_name: str,
    steps: int,
    device: torch.device,
    compile: str,
    mode: str,
    backend: str = "auto",
) -> dict:
    cfg = preset(name, backend)
    sequences, seq_len = BATCH[name]
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    models = {
        "moe": MoETransformer(cfg).to(device),
        "dense": MoETransformer(dense_twin(cfg)).to(device),
    }
    setting = {"true": True, "false": False}.get(compile, compile)
    for model in models.values():  # both or neither: the same setting on the same device
        compiled = compile_blocks(model, setting, expert_parallel=False, mode=mode)
    steppers = {kind: make_step(m, dtype, device) for kind, m in models.items()}
    times = {kind: [] for kind in models}
    for i in range(steps + 2):  # two warm-up steps each
        ids = torch.randint(0, cfg.vocab_size, (sequences, seq_len + 1), device=device)
        for kind in models if i % 2 == 0 else reversed(list(models)):
            seconds = steppers[kind](ids)
            if i >= 2:
                times[kind].append(seconds)
    tokens = sequences * seq_len
    peak = matmul_peak(dtype, device)
    row = {"preset": name, "dtype": dtype_name, "tokens_per_step": tokens, "peak_flops": peak}
    row["compiled"] = compiled
    row["backend"] = backend
    row["compile_mode"] = mode if compiled else None
    for kind, model in models.items():
        per_s = tokens / statistics.median(times[kind])
        flops = model.flops_per_token(seq_len)
        counts = model.parameter_counts()
        row[kind] = {
            "tokens_per_s": per_s,
            "flops_per_token": flops,
            "mfu": per_s * flops / peak,
            "params_active": counts["active"],
            "params_total": counts["total"],
        }
    row["moe_over_dense"] = row["moe"]["tokens_per_s"] / row["dense"]["tokens_per_s"]
    row["copy_bytes_per_s"] = copy_bandwidth(device)
    row["moe_ceiling"] = moe_ceiling(row)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--presets", default="tiny,small")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument(
        "--steps",
        type=int,
        default=20,
        help="timed steps per model after two warm-up steps (the ratio of a 'small' model read "
        "0.77-0.93 over four runs of 10 on a drifting 2-core VM)",
    )
    p.add_argument(
        "--compile",
        choices=("auto", "true", "false"),
        default="auto",
        help="compile each block of both models, as train.compile does (auto: on CUDA only); "
        "compile time is paid in the two warm-up steps",
    )
    p.add_argument(
        "--compile-mode",
        choices=("default", "reduce-overhead", "max-autotune-no-cudagraphs"),
        default="default",
        help="torch.compile mode of the blocks (reduce-overhead: CUDA graphs; the trainer "
        "uses default)",
    )
    p.add_argument(
        "--backend", default="auto", help="the MoE layers' grouped GEMM backend (model.moe.backend)"
    )
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        keep_freed_host_memory()  # as the trainer does on the CPU
    rows = []
    header = ["preset", "dtype", "compiled", "MoE tok/s", "dense tok/s", "MoE/dense"]
    header += ["ceiling", "MoE MFU", "dense MFU", "peak TFLOP/s", "copy GB/s"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name in args.presets.split(","):
        for dtype_name in args.dtypes.split(","):
            r = bench(
                name, dtype_name, args.steps, device, args.compile, args.compile_mode, args.backend
            )
            rows.append(r)
            print(
                f"| {name} | {dtype_name} | {r['compiled']} | {r['moe']['tokens_per_s']:.0f} | "
                f"{r['dense']['tokens_per_s']:.0f} | {r['moe_over_dense']:.2f} | "
                f"{r['moe_ceiling']:.2f} | {r['moe']['mfu']:.1%} | {r['dense']['mfu']:.1%} | "
                f"{r['peak_flops'] / 1e12:.2f} | {r['copy_bytes_per_s'] / 1e9:.0f} |",
                flush=True,
            )
    if args.json:
        args.json.write_text(
            json.dumps({"device": str(device), "torch": torch.__version__, "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
