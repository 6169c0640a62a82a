"""Imports point down: no module imports, at any level (function-local imports included), the
modules above it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fms_dyt"
DATA_LIBRARY = sorted(p.name for p in (PACKAGE / "data").glob("*.py") if p.name != "__main__.py")

# file (relative to fms_dyt/) -> modules it must not import
BELOW = {
    "checkpoint.py": ["transformers", "fms_dyt.config", "fms_dyt.hf"],
    "parallel.py": ["fms_dyt.config", "fms_dyt.trainer"],
    "plan.py": ["fms_dyt.trainer"],
    "errors.py": ["fms_dyt"],
    # below parallel and config, which import it; torchao only inside its functions
    "float8.py": ["fms_dyt.config", "fms_dyt.parallel", "fms_dyt.trainer"],
    # the data library; its `python -m fms_dyt.data` entry point composes the training config
    **{f"data/{name}": ["fms_dyt.config", "fms_dyt.trainer"] for name in DATA_LIBRARY},
}


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
    return modules


@pytest.mark.parametrize("name", sorted(BELOW))
def test_module_does_not_import_the_layers_above(name):
    imported = imported_modules(PACKAGE / name)
    bad = sorted(m for m in imported for above in BELOW[name] if m == above or m.startswith(above + "."))
    assert not bad, f"fms_dyt/{name} imports {bad}"
