"""``moe-sweep-report SWEEP_DIR``: one table and one plot for every run of a sweep.

Writes ``report.csv``, ``report.md`` and ``report.png`` into the sweep directory. A run is
any directory below it with a ``.hydra/overrides.yaml``. Columns: the swept values (the
override keys whose values differ between runs), status (finished, failed, unfinished),
final train and validation loss, mean tokens/s, active/total parameters, mean dropped-token
fraction, steps. Failed and unfinished runs are listed, never hidden.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import yaml

from moe.train.metrics import read_metrics

METRICS = [
    "status",
    "steps",
    "train_loss",
    "val_loss",
    "tokens_per_s",
    "params_active",
    "params_total",
    "dropped_fraction",
]


def find_runs(sweep_dir: Path) -> list[Path]:
    runs = [p.parent.parent for p in sweep_dir.rglob(".hydra/overrides.yaml")]
    return sorted(runs, key=lambda p: (len(p.parts), _natural(p.relative_to(sweep_dir))))


def _natural(path: Path) -> tuple:
    return tuple(int(part) if part.isdigit() else part for part in path.parts)


def overrides_of(run: Path) -> dict[str, str]:
    items = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text()) or []
    return dict(item.split("=", 1) for item in items if "=" in item)


def run_row(run: Path) -> dict:
    """A run's numbers, read from its own files (metrics.jsonl, summary.json, status.json)."""
    lines = read_metrics(run)
    train = [r for r in lines if "split" not in r]
    val = [r for r in lines if r.get("split") == "val"]
    summary_path, status_path = run / "summary.json", run / "status.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    status = json.loads(status_path.read_text()) if status_path.exists() else {}
    # Runs from before status.json existed count as finished when they left a summary.
    state = status.get("status", "finished" if summary else "unfinished")
    if state == "running":  # nobody finishes a run without writing "finished"
        state = "unfinished"
    if state == "failed" and status.get("error"):
        state = f"failed: {status['error']}"
    mean = lambda key: sum(r[key] for r in train) / len(train) if train else None  # noqa: E731
    return {
        "status": state,
        "steps": train[-1]["step"] if train else 0,
        "train_loss": train[-1]["loss"] if train else None,
        "val_loss": val[-1]["loss"] if val else None,
        "tokens_per_s": mean("tokens_per_s"),
        "params_active": summary.get("params_active"),
        "params_total": summary.get("params_total"),
        "dropped_fraction": mean("dropped_fraction"),
    }


def build_report(sweep_dir: Path) -> tuple[list[str], list[dict]]:
    runs = find_runs(sweep_dir)
    if not runs:
        raise FileNotFoundError(f"no runs (directories with .hydra/overrides.yaml) in {sweep_dir}")
    overrides = [overrides_of(r) for r in runs]
    keys = sorted({k for o in overrides for k in o})
    swept = [k for k in keys if len({o.get(k) for o in overrides}) > 1] or keys
    rows = []
    for run, ov in zip(runs, overrides, strict=True):
        row = {"run": str(run.relative_to(sweep_dir))}
        row.update({k: ov.get(k, "") for k in swept})
        row.update(run_row(run))
        rows.append(row)
    return ["run", *swept, *METRICS], rows


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_report(sweep_dir: Path) -> list[dict]:
    columns, rows = build_report(sweep_dir)
    with (sweep_dir / "report.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    md = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(_fmt(r[c]) for c in columns) + " |" for r in rows]
    (sweep_dir / "report.md").write_text("\n".join(md) + "\n")
    _plot(sweep_dir, columns, rows)
    return rows


def _plot(sweep_dir: Path, columns: list[str], rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    swept = columns[1 : columns.index("status")]
    labels = [", ".join(f"{k.split('.')[-1]}={r[k]}" for k in swept) or r["run"] for r in rows]
    losses = [r["val_loss"] if r["val_loss"] is not None else float("nan") for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows) + 2), 4.5))
    colors = ["tab:blue" if r["status"] == "finished" else "tab:gray" for r in rows]
    bars = ax.bar(range(len(rows)), losses, color=colors)
    ax.bar_label(bars, fmt="%.4f", fontsize=8)
    ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("final validation loss")
    ax.set_title(f"{sweep_dir.name}: final validation loss (gray: not finished)", fontsize=10)
    finite = [v for v in losses if v == v]
    if finite:
        ax.set_ylim(min(finite) * 0.95, max(finite) * 1.02)
    fig.tight_layout()
    fig.savefig(sweep_dir / "report.png", dpi=120)
    plt.close(fig)
