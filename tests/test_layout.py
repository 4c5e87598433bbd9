"""The package's layout rules: no import cycle, process-level calls only in the launcher."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "modelfleet"


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).with_suffix("")
        name = ".".join(("modelfleet", *rel.parts)).removesuffix(".__init__")
        out[name] = ast.parse(path.read_text())
    return out


def _imports(tree: ast.Module, modules: set[str]) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("modelfleet"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("modelfleet"))
    return {m for m in found if m in modules}


def test_no_import_cycle() -> None:
    mods = _modules()
    graph = {name: _imports(tree, set(mods)) - {name} for name, tree in mods.items()}
    seen: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(name: str, path: list[str]) -> None:
        seen[name] = 1
        for dep in sorted(graph[name]):
            assert seen.get(dep) != 1, "import cycle: " + " -> ".join([*path, name, dep])
            if dep not in seen:
                visit(dep, [*path, name])
        seen[name] = 2

    for name in sorted(graph):
        if name not in seen:
            visit(name, [])


def test_only_the_launcher_touches_processes() -> None:
    for name, tree in _modules().items():
        if name in ("modelfleet.launcher",):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                assert "psutil" not in names, f"{name} imports psutil"
            if isinstance(node, ast.Attribute) and node.attr in ("killpg", "kill"):
                assert not (isinstance(node.value, ast.Name) and node.value.id == "os"), f"{name} signals a process"
