"""Dependencies point one way: proto/ and freeze/ at the bottom, ps/ and worker/ on them,
freezeps/ above both. ps/ and worker/ never import each other."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = {"proto", "freeze", "ps", "worker", "freezeps", "bench", "tests"}
ALLOWED = {
    "proto": {"proto"},
    "freeze": {"freeze"},
    "ps": {"ps", "proto", "freeze"},
    "worker": {"worker", "proto", "freeze"},
    "freezeps": {"freezeps", "ps", "worker", "proto", "freeze"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & PROJECT


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_what_it_stands_on(package):
    for path in (ROOT / package).glob("*.py"):
        bad = _imports(path) - ALLOWED[package]
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
