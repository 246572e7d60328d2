"""Every package directory ships in the wheel (an editable install would hide a gap)."""

from pathlib import Path

tomllib = __import__("pytest").importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed_in_pyproject():
    if not (ROOT / "pyproject.toml").exists():
        __import__("pytest").skip("tests copied out of the source tree")
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setup["packages"])
    on_disk = {
        "moe." + ".".join(p.parent.relative_to(ROOT / "moe").parts)
        for p in (ROOT / "moe").rglob("__init__.py")
    }
    config_groups = {"moe.configs." + d.name for d in (ROOT / "configs").iterdir() if d.is_dir()}
    on_disk = {name.rstrip(".") for name in on_disk} | {"moe.kernels", "moe.configs"}
    on_disk |= config_groups
    assert on_disk == listed


def test_the_kernel_sources_ship_as_package_data():
    """The C++ kernels build from the installed package: every source and header they use
    matches a package-data pattern (an editable install would not notice one missing)."""
    from fnmatch import fnmatch

    from moe.kernels import cpu_gemm

    if not (ROOT / "pyproject.toml").exists():
        __import__("pytest").skip("tests copied out of the source tree")
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = setup["package-data"]["moe.kernels"]
    used = [Path(p) for p in cpu_gemm.SOURCES] + [cpu_gemm.HEADER]
    assert all(p.exists() for p in used)
    included = {p.name for p in (ROOT / "kernels").iterdir() if p.suffix in (".cpp", ".h")}
    assert {p.name for p in used} <= included
    assert all(any(fnmatch(name, pattern) for pattern in patterns) for name in included)
