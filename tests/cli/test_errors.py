"""Every command leaves through the one error path: one line ``<program>: error: ...`` on
stderr and exit code 2 for bad input."""

import pytest

from moe.cli import eval as eval_cli
from moe.cli import export as export_cli
from moe.cli import sweep_report


@pytest.mark.parametrize(
    "main, argv, program, message",
    [
        (eval_cli.main, ["foo"], "moe-eval", "arguments are key=value"),
        (eval_cli.main, [], "moe-eval", "checkpoint=PATH is required"),
        (eval_cli.main, ["checkpoint=/no/such/run"], "moe-eval", "no complete checkpoint"),
        (export_cli.export_main, ["out=x"], "moe-export", "checkpoint=PATH is required"),
        (export_cli.upcycle_main, ["source=x"], "moe-upcycle", "out=... is required"),
        (sweep_report.main, [], "moe-sweep-report", "usage: moe-sweep-report SWEEP_DIR"),
        (sweep_report.main, ["/no/such/sweep"], "moe-sweep-report", "/no/such/sweep"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, main, argv, program, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"{program}: error: ") and message in err, err
