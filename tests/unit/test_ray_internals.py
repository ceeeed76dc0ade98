"""The private Ray APIs softprompt uses (softprompt.ray.internals) exist in the installed Ray: this
fails on a Ray upgrade until someone re-reads them against the new sources."""

from __future__ import annotations

import ast
from pathlib import Path

from softprompt.ray import internals

RAY_LAYER = Path(internals.__file__).parent


def test_the_installed_ray_is_the_one_the_private_calls_were_read_against() -> None:
    assert internals.problems() == []


def test_no_other_module_reaches_into_ray_internals() -> None:
    """Private Ray names (`_internal`, `_private`, a leading underscore) appear in internals.py only."""
    offenders = []
    for path in sorted(RAY_LAYER.parent.rglob("*.py")):
        if path == Path(internals.__file__):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ray"):
                names = [node.module or "", *(a.name for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("ray")]
            if any("_internal" in n or "_private" in n or n.startswith("_") for n in names):
                offenders.append(f"{path.relative_to(RAY_LAYER.parent)}:{node.lineno}")
    assert offenders == []
