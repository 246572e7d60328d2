"""Wall time of one Optuna sweep (``moe-sweep``) run with 1 worker and with N workers.

Each sweep is a fresh study of the same trials (same sampler seed, no pruning) in its own
directory under ``--out``; the table gives the wall time of each and the speed-up.

    python scripts/bench_sweep.py --trials 6 --workers 1,2 --steps 60
    python scripts/bench_sweep.py --json benchmarks/results/<date>-sweep/sweep_workers.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import torch


def sweep(out: Path, trials: int, workers: int, steps: int) -> float:
    command = [
        sys.executable,
        "-m",
        "moe.cli.sweep",
        "+sweep=optuna_lr_aux",
        f"optuna.dir={out}",
        f"optuna.n_trials={trials}",
        f"optuna.workers={workers}",
        "optuna.pruner=none",
        f"train.max_steps={steps}",
        f"eval.every={steps}",
        f"checkpoint.every={steps}",
        "logger.wandb.mode=disabled",
        "logger.progress_bar=false",
    ]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--steps", type=int, default=60, help="train.max_steps of each trial")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for workers in [int(w) for w in args.workers.split(",")]:
            wall = sweep(Path(tmp) / f"w{workers}", args.trials, workers, args.steps)
            rows.append({"workers": workers, "trials": args.trials, "wall_s": round(wall, 1)})
    base = rows[0]["wall_s"]
    cores = os.cpu_count()
    print(f"{args.trials} trials of the tiny model, {args.steps} steps each, {cores} cores")
    print("| workers | wall s | speed-up |\n|---|---|---|")
    for row in rows:
        row["speedup"] = round(base / row["wall_s"], 2)
        print(f"| {row['workers']} | {row['wall_s']} | {row['speedup']}x |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "optuna": optuna.__version__,
            "date": time.strftime("%Y-%m-%d"),
        }
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
