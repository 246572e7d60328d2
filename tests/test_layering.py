"""The package order of docs/architecture.md, enforced: no module under ``moe/`` (or
``kernels/``, installed as ``moe.kernels``) imports a package above its own."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Bottom to top; a package may import its own level and those below it.
LEVELS = [
    ["moe.kernels", "moe.typed_config"],
    ["moe.layers"],
    ["moe.model"],
    ["moe.parallel"],
    ["moe.data", "moe.checkpoint", "moe.hf"],
    ["moe.train"],
    ["moe.export", "moe.sweep"],
    ["moe.cli"],
]
LEVEL = {package: i for i, packages in enumerate(LEVELS) for package in packages}
# ``python -m moe.train`` is the one shim that starts the command line from below it.
ENTRY_SHIMS = {"moe.train.__main__"}


def module_name(path: Path) -> str:
    relative = path.relative_to(REPO).with_suffix("")
    parts = list(relative.parts)
    if parts[0] == "kernels":
        parts = ["moe", "kernels", *parts[1:]]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def package_of(module: str) -> str | None:
    for depth in (2, 1):
        name = ".".join(module.split(".")[:depth])
        if name in LEVEL:
            return name
    return None


def imported_modules(path: Path, module: str) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                is_package = path.name == "__init__.py"
                base = module.split(".")[: len(module.split(".")) - node.level + is_package]
                found.append(".".join([*base, node.module] if node.module else base))
            else:
                found.append(node.module)
    return [name for name in found if name and name.split(".")[0] == "moe"]


def sources() -> list[Path]:
    return sorted([*(REPO / "moe").rglob("*.py"), *(REPO / "kernels").rglob("*.py")])


def test_every_package_has_a_level():
    packages = {package_of(module_name(p)) for p in sources()} - {None}
    modules = {module_name(p) for p in sources() if package_of(module_name(p)) is None}
    assert modules <= {"moe"}, f"modules outside every level: {sorted(modules - {'moe'})}"
    assert packages == set(LEVEL)


def test_imports_point_down():
    upward = []
    for path in sources():
        module = module_name(path)
        mine = package_of(module)
        if mine is None or module in ENTRY_SHIMS:
            continue
        for name in imported_modules(path, module):
            theirs = package_of(name)
            if theirs is not None and LEVEL[theirs] > LEVEL[mine]:
                upward.append(f"{module} imports {name}")
    assert upward == []


def test_the_check_catches_an_upward_import(tmp_path):
    """The walk sees a function-level import of a higher package (it can fail)."""
    path = REPO / "moe" / "layers" / "router.py"
    source = path.read_text() + "\n\ndef _late():\n    from moe.train import trainer\n"
    fake = tmp_path / "router.py"
    fake.write_text(source)
    assert "moe.train" in imported_modules(fake, "moe.layers.router")
