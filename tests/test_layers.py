"""The layer map of docs/ARCHITECTURE.md: imports point downward only (checked on the
source, function-level imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "neuroplastic"

#: package -> the packages above it, which it must never import
FORBIDDEN = {
    "evaluation": ("neuroplastic.training", "neuroplastic.recipes", "neuroplastic.cli"),
    "models": ("neuroplastic.training", "neuroplastic.recipes", "neuroplastic.evaluation",
               "neuroplastic.cli"),
    "plasticity": ("neuroplastic.training", "neuroplastic.recipes", "neuroplastic.evaluation",
                   "neuroplastic.cli", "neuroplastic.models"),
    "rewards": ("neuroplastic.training", "neuroplastic.recipes", "neuroplastic.evaluation",
                "neuroplastic.cli"),
    "ops": ("neuroplastic.training", "neuroplastic.recipes", "neuroplastic.evaluation",
            "neuroplastic.cli", "neuroplastic.models", "neuroplastic.plasticity"),
}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_downward(package):
    bad = []
    for path in sorted((SRC / package).rglob("*.py")):
        for line, mod in imported_modules(path):
            if mod.startswith(FORBIDDEN[package]):
                bad.append(f"{path.relative_to(SRC)}:{line} imports {mod}")
    assert not bad, "\n".join(bad)


def test_the_checker_sees_function_level_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def g():\n    from neuroplastic.training.trainer import Trainer\n")
    assert imported_modules(f) == [(2, "neuroplastic.training.trainer")]
