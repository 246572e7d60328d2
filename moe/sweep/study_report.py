"""The report of an Optuna sweep, read back from the study's storage.

Writes into the sweep directory: ``trials.csv`` and ``trials.json`` (one row per trial:
number, state, value, parameters, last reported step, run directory, why it failed or was
retried), ``study.md`` (the best trial with its parameters as ready-to-paste overrides, then
the table), ``history.png`` (optimization history) and ``importance.png`` (parameter
importances, once two trials completed with different parameters).
"""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from .space import trial_overrides
from .study import open_storage, retried

COLUMNS = ["number", "state", "value", "step", "duration_s", "run_dir", "note"]


def load_study(sweep_dir: Path) -> optuna.Study:
    pointer = sweep_dir / "study.json"
    if not pointer.exists():
        raise FileNotFoundError(f"no Optuna study in {sweep_dir} (no study.json)")
    meta = json.loads(pointer.read_text())
    return optuna.load_study(study_name=meta["study_name"], storage=open_storage(meta["storage"]))


def trial_row(trial: FrozenTrial, again: set[int], keys: list[str]) -> dict:
    steps = list(trial.intermediate_values)
    duration = trial.duration.total_seconds() if trial.duration else None
    state = {"fail": "failed"}.get(trial.state.name.lower(), trial.state.name.lower())
    if trial.number in again:
        state = "retried"
    note = trial.user_attrs.get("error") or ""
    if "retry_of" in trial.user_attrs:
        note = f"retry of trial {trial.user_attrs['retry_of']} ({trial.user_attrs['retry_reason']})"
    row = {
        "number": trial.number,
        "state": state,
        "value": trial.value,
        "step": max(steps) if steps else None,
        "duration_s": round(duration, 1) if duration is not None else None,
        "run_dir": trial.user_attrs.get("run_dir", ""),
        "note": note,
    }
    row.update({key: trial.params.get(key) for key in keys})
    return row


def write_study_report(sweep_dir: Path) -> str:
    """Write the report files; returns a few lines naming the best trial."""
    study = load_study(sweep_dir)
    trials = study.get_trials(deepcopy=False)
    keys = sorted({key for t in trials for key in t.params})
    again = retried(trials)
    rows = [trial_row(t, again, keys) for t in trials]
    columns = [*COLUMNS[:3], *keys, *COLUMNS[3:]]
    with (sweep_dir / "trials.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    (sweep_dir / "trials.json").write_text(json.dumps(rows, indent=1))
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = _best_lines(study, complete)
    table = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    table += ["| " + " | ".join(_fmt(r[c]) for c in columns) + " |" for r in rows]
    counts = {
        s: sum(r["state"] == s for r in rows) for s in ("complete", "pruned", "failed", "retried")
    }
    head = f"# Study {study.study_name}\n\n{best}\n\n" + ", ".join(
        f"{n} {s}" for s, n in counts.items()
    )
    if not _varied(complete):
        head += "\n\n(importance.png needs two completed trials with different parameters)"
    (sweep_dir / "study.md").write_text(head + "\n\n" + "\n".join(table) + "\n")
    _plots(study, sweep_dir, complete)
    return best


def _best_lines(study: optuna.Study, complete: list[FrozenTrial]) -> str:
    if not complete:
        return "No trial has completed yet."
    best = study.best_trial
    return (
        f"Best trial {best.number}: value {best.value:.4f} "
        f"({best.user_attrs.get('run_dir', '')})\n"
        f"overrides: {' '.join(trial_overrides(best.params))}"
    )


def _fmt(value) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _plots(study: optuna.Study, sweep_dir: Path, complete: list[FrozenTrial]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for name, plot, enough in (
            ("history.png", optuna_plots.plot_optimization_history, len(complete) >= 1),
            ("importance.png", optuna_plots.plot_param_importances, _varied(complete)),
        ):
            if not enough:
                (sweep_dir / name).unlink(missing_ok=True)
                continue
            axes = plot(study)
            axes.figure.set_size_inches(7, 4.5)
            axes.figure.tight_layout()
            axes.figure.savefig(sweep_dir / name, dpi=120)
            plt.close(axes.figure)


def _varied(complete: list[FrozenTrial]) -> bool:
    """Importances need two completed trials whose parameters differ."""
    return len(complete) >= 2 and len({tuple(sorted(t.params.items())) for t in complete}) > 1
