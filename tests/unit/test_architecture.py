"""The layout's rules, checked on the source tree: every module is named in docs/architecture.md, no
file is over 450 lines, there is no import cycle, and the core never reaches into Ray or Kubeflow."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "src" / "softprompt"
MAX_LINES = 450
LAYERS = ("ray", "kubeflow", "cli")
"""Subpackages allowed to import the Ray layer and Kubeflow (the command line picks a trainer)."""
OUTSIDE_THE_CORE = ("ray", "kfp", "kubernetes", "softprompt.ray", "softprompt.kubeflow")


def _modules() -> dict[str, Path]:
    """`softprompt.x.y` -> its file, for every Python file of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: Path, module: str) -> set[str]:
    """Every module `path` imports, at any depth (lazy imports inside functions count too)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {m for m in _imports(path, name) if m in modules and m != name} for name, path in modules.items()}


def test_every_module_is_named_in_the_architecture_doc() -> None:
    doc = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`([\w/]+\.py)`", doc))
    files = {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")}
    assert sorted(files - named) == [], "modules missing from docs/architecture.md (add a row with its one concept)"
    assert sorted(named - files) == [], "docs/architecture.md names files that do not exist"


def test_no_file_is_over_the_line_limit() -> None:
    long = {p.relative_to(PACKAGE).as_posix(): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"files over {MAX_LINES} lines: split them by concept"


def test_there_is_no_import_cycle() -> None:
    graph = _graph()
    # A package imports its own submodules to re-export them; that edge is not a design dependency.
    edges = {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in graph.items()}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("module", sorted(m for m in _modules() if m.split(".")[1:2] and m.split(".")[1] not in LAYERS))
def test_the_core_never_imports_ray_or_kubeflow(module: str) -> None:
    path = _modules()[module]
    bad = sorted(m for m in _imports(path, module) if any(m == o or m.startswith(o + ".") for o in OUTSIDE_THE_CORE))
    assert bad == [], f"{module} (the core) imports {bad}; only softprompt.ray, softprompt.kubeflow and the CLI may"
