"""``moe-sweep-report SWEEP_DIR``: the table and plot of a sweep's runs (``moe.sweep.report``)
and, for an Optuna sweep, the study's report (``moe.sweep.study_report``)."""

from __future__ import annotations

import sys
from pathlib import Path

from moe.sweep.report import write_report
from moe.sweep.study_report import write_study_report

from .errors import fail

PROGRAM = "moe-sweep-report"


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        fail(PROGRAM, "usage: moe-sweep-report SWEEP_DIR")
    sweep_dir = Path(args[0])
    if (sweep_dir / "study.json").exists():  # an Optuna sweep (moe-sweep)
        print(write_study_report(sweep_dir))
        names = ["study.md", "trials.csv", "trials.json", "history.png", "importance.png"]
        print(f"wrote {', '.join(n for n in names if (sweep_dir / n).exists())} to {sweep_dir}")
    try:
        rows = write_report(sweep_dir)
    except FileNotFoundError as err:
        fail(PROGRAM, str(err))
    print((sweep_dir / "report.md").read_text(), end="")
    print(f"{len(rows)} runs; wrote report.csv, report.md, report.png to {sweep_dir}")


if __name__ == "__main__":
    main()
