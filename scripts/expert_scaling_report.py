"""Report of ``moe-train -m +experiment=expert_scaling``: validation loss against steps for
each number of experts (mean and min-max over seeds), and how many steps each E needs to
reach the dense model's (E=1) final validation loss.

    python scripts/expert_scaling_report.py multirun/expert_scaling
    python scripts/expert_scaling_report.py multirun/ffn_headroom --by d_ff

``--by d_ff`` groups by expert width instead (``+experiment=ffn_headroom``: dense models of
growing FFN width; the narrowest is the baseline). Writes ``expert_scaling.md``, ``.csv``
and ``.png`` into the sweep directory and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path

from moe.train.metrics import read_metrics

GROUPS = {"experts": "num_experts", "d_ff": "d_ff"}  # --by: the model.moe key of a group


def val_curves(sweep_dir: Path, by: str = "experts") -> dict[int, list[dict[int, float]]]:
    """Per value of ``model.moe.<GROUPS[by]>``, one ``{step: val_loss}`` per finished seed."""
    curves = defaultdict(list)
    for summary in sorted(sweep_dir.rglob("summary.json")):
        run = summary.parent
        config = json.loads((run / "run_config.json").read_text())
        curve = {r["step"]: r["loss"] for r in read_metrics(run) if r.get("split") == "val"}
        curves[config["model"]["moe"][GROUPS[by]]].append(curve)
    return dict(sorted(curves.items()))


def steps_to_reach(curve: dict[int, float], target: float) -> int | None:
    return next((step for step, loss in sorted(curve.items()) if loss <= target), None)


def mean_curve(curves: list[dict[int, float]]) -> dict[int, float]:
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    return {s: statistics.fmean(c[s] for c in curves) for s in steps}


def table(curves: dict[int, list[dict[int, float]]], by: str = "experts") -> list[dict]:
    """One row per group; the baseline is E=1 (the dense model), or the narrowest width."""
    base = 1 if by == "experts" else min(curves)
    dense = mean_curve(curves[base]) if base in curves else None
    target = dense[max(dense)] if dense else None
    last = max(mean_curve(curves[min(curves)]))
    rows = []
    for key, runs in curves.items():
        finals = [c[max(c)] for c in runs]
        mean = mean_curve(runs)
        reach = steps_to_reach(mean, target) if target is not None else None
        rows.append(
            {
                by: key,
                "seeds": len(runs),
                "final_val_mean": statistics.fmean(finals),
                "final_val_min": min(finals),
                "final_val_max": max(finals),
                "steps_to_dense_final": reach,
                "fraction_of_steps": reach / last if reach is not None else None,
            }
        )
    return rows


def markdown(rows: list[dict], by: str = "experts") -> str:
    baseline = "dense" if by == "experts" else "narrowest"
    lines = [
        f"| {by} | seeds | final val loss (mean) | min - max | steps to {baseline} final "
        "| of steps |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        reach = r["steps_to_dense_final"]
        share = f"{r['fraction_of_steps']:.0%}" if reach is not None else "-"
        lines.append(
            f"| {r[by]} | {r['seeds']} | {r['final_val_mean']:.4f} | "
            f"{r['final_val_min']:.4f} - {r['final_val_max']:.4f} | "
            f"{reach if reach is not None else 'not reached'} | {share} |"
        )
    return "\n".join(lines) + "\n"


def plot(curves: dict[int, list[dict[int, float]]], path: Path, by: str = "experts") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, runs in curves.items():
        steps = sorted(mean_curve(runs))
        steps = [s for s in steps if s > 0]  # the step-0 loss dwarfs the rest
        mean = [statistics.fmean(c[s] for c in runs) for s in steps]
        low = [min(c[s] for c in runs) for s in steps]
        high = [max(c[s] for c in runs) for s in steps]
        if by == "d_ff":
            label = f"dense, FFN width {key}"
        else:
            label = "E=1 (dense)" if key == 1 else f"E={key}"
        (line,) = ax.plot(steps, mean, label=label)
        ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/byte)")
    what = "Equal active parameters" if by == "experts" else "FFN width"
    ax.set_title(f"{what}: mean and min-max over seeds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument(
        "--by", choices=sorted(GROUPS), default="experts", help="group runs by this key"
    )
    args = parser.parse_args()
    curves = val_curves(args.sweep_dir, args.by)
    if not curves:
        parser.error(f"no finished runs (summary.json) under {args.sweep_dir}")
    rows = table(curves, args.by)
    (args.sweep_dir / "expert_scaling.md").write_text(markdown(rows, args.by))
    with (args.sweep_dir / "expert_scaling.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(curves, args.sweep_dir / "expert_scaling.png", args.by)
    print(markdown(rows, args.by), end="")


if __name__ == "__main__":
    main()
