"""The layout shows the architecture: every package says what it holds and what it may import,
imports follow the path a request takes (no package imports one after it, no module imports
itself round a cycle), and modules stay small."""

from __future__ import annotations

import ast
from pathlib import Path

from helpers.paths import REPO

SRC = REPO / "src"
# Each part may import only the parts before it (errors and metrics: everyone's vocabulary).
ORDER = ["errors", "metrics", "tiny", "models", "request", "adapters", "controls", "generation", "protocol", "server",
         "training", "cli", "__main__"]
MAX_LINES = 300


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in SRC.rglob("*.py")}


def imports(module: str) -> set[str]:
    """The sdserve modules ``module`` imports anywhere in it (lazy and type-checking imports too)."""
    path = MODULES[module]
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module or ""
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name in MODULES and name != module}


GRAPH = {module: imports(module) for module in MODULES}


def part(module: str) -> str:
    return module.split(".")[1] if "." in module else "sdserve"


def test_every_part_imports_only_the_parts_before_it():
    wrong = [f"{m} imports {d}" for m, deps in GRAPH.items() for d in deps
             if part(m) != "sdserve" and part(d) != part(m) and ORDER.index(part(d)) > ORDER.index(part(m))]
    assert not wrong, "\n".join(wrong)
    assert {part(m) for m in MODULES} - {"sdserve"} <= set(ORDER), "a new part: give it its place in ORDER"


def test_no_module_imports_itself_round_a_cycle():
    def reaches(start: str, target: str, seen: set[str]) -> list[str] | None:
        for dep in GRAPH[start]:
            if dep == target:
                return [start, dep]
            if dep not in seen:
                seen.add(dep)
                if (path := reaches(dep, target, seen)) is not None:
                    return [start, *path]
        return None

    cycles = [" -> ".join(path) for m in MODULES if (path := reaches(m, m, set())) is not None]
    assert not cycles, "\n".join(cycles)


def test_every_package_says_what_it_holds():
    for path in SRC.rglob("__init__.py"):
        assert ast.get_docstring(ast.parse(path.read_text())), f"{path.relative_to(REPO)} has no docstring"


def test_modules_are_small():
    long = {str(p.relative_to(REPO)): n for p in [*SRC.rglob("*.py"), *(REPO / "tests").rglob("*.py"),
                                                 *(REPO / "bench").rglob("*.py")]
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"over {MAX_LINES} lines: {long}"
