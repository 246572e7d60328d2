"""Report of ``moe-train -m +experiment=expert_scaling``: validation loss against steps for
each number of experts (mean and min-max over seeds), and how many steps each E needs to
reach the dense model's (E=1) final validation loss.

    python scripts/expert_scaling_report.py multirun/expert_scaling

Writes ``expert_scaling.md``, ``expert_scaling.csv`` and ``expert_scaling.png`` into the
sweep directory and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path

from moe.train.metrics import read_metrics


def val_curves(sweep_dir: Path) -> dict[int, list[dict[int, float]]]:
    """Per number of experts, one ``{step: val_loss}`` per finished seed."""
    curves = defaultdict(list)
    for summary in sorted(sweep_dir.rglob("summary.json")):
        run = summary.parent
        config = json.loads((run / "run_config.json").read_text())
        curve = {r["step"]: r["loss"] for r in read_metrics(run) if r.get("split") == "val"}
        curves[config["model"]["moe"]["num_experts"]].append(curve)
    return dict(sorted(curves.items()))


def steps_to_reach(curve: dict[int, float], target: float) -> int | None:
    return next((step for step, loss in sorted(curve.items()) if loss <= target), None)


def mean_curve(curves: list[dict[int, float]]) -> dict[int, float]:
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    return {s: statistics.fmean(c[s] for c in curves) for s in steps}


def table(curves: dict[int, list[dict[int, float]]]) -> list[dict]:
    dense = mean_curve(curves[1]) if 1 in curves else None
    target = dense[max(dense)] if dense else None
    last = max(mean_curve(curves[min(curves)]))
    rows = []
    for experts, runs in curves.items():
        finals = [c[max(c)] for c in runs]
        mean = mean_curve(runs)
        reach = steps_to_reach(mean, target) if target is not None else None
        rows.append(
            {
                "experts": experts,
                "seeds": len(runs),
                "final_val_mean": statistics.fmean(finals),
                "final_val_min": min(finals),
                "final_val_max": max(finals),
                "steps_to_dense_final": reach,
                "fraction_of_steps": reach / last if reach is not None else None,
            }
        )
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| experts | seeds | final val loss (mean) | min - max | steps to dense final | of steps |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        reach = r["steps_to_dense_final"]
        share = f"{r['fraction_of_steps']:.0%}" if reach is not None else "-"
        lines.append(
            f"| {r['experts']} | {r['seeds']} | {r['final_val_mean']:.4f} | "
            f"{r['final_val_min']:.4f} - {r['final_val_max']:.4f} | "
            f"{reach if reach is not None else 'not reached'} | {share} |"
        )
    return "\n".join(lines) + "\n"


def plot(curves: dict[int, list[dict[int, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for experts, runs in curves.items():
        steps = sorted(mean_curve(runs))
        steps = [s for s in steps if s > 0]  # the step-0 loss dwarfs the rest
        mean = [statistics.fmean(c[s] for c in runs) for s in steps]
        low = [min(c[s] for c in runs) for s in steps]
        high = [max(c[s] for c in runs) for s in steps]
        label = "E=1 (dense)" if experts == 1 else f"E={experts}"
        (line,) = ax.plot(steps, mean, label=label)
        ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title("Equal active parameters: mean and min-max over seeds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path)
    args = parser.parse_args()
    curves = val_curves(args.sweep_dir)
    if not curves:
        parser.error(f"no finished runs (summary.json) under {args.sweep_dir}")
    rows = table(curves)
    (args.sweep_dir / "expert_scaling.md").write_text(markdown(rows))
    with (args.sweep_dir / "expert_scaling.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(curves, args.sweep_dir / "expert_scaling.png")
    print(markdown(rows), end="")


if __name__ == "__main__":
    main()
