"""``moe-sweep-report SWEEP_DIR``: the table and plot of a sweep (``moe.sweep.report``)."""

from __future__ import annotations

import sys
from pathlib import Path

from moe.sweep.report import write_report

from .errors import fail

PROGRAM = "moe-sweep-report"


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        fail(PROGRAM, "usage: moe-sweep-report SWEEP_DIR")
    sweep_dir = Path(args[0])
    try:
        rows = write_report(sweep_dir)
    except FileNotFoundError as err:
        fail(PROGRAM, str(err))
    print((sweep_dir / "report.md").read_text(), end="")
    print(f"{len(rows)} runs; wrote report.csv, report.md, report.png to {sweep_dir}")


if __name__ == "__main__":
    main()
