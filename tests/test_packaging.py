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
