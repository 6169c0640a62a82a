"""Imports point down: no module imports, at any level (function-local imports included), the
modules above it; and training never imports the lab (analysis, evaluation, studies, plotting)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fms_dyt"
# What a training process must never load: the lab around training, and what only it needs
LAB = ["fms_dyt.analysis", "fms_dyt.analyze", "fms_dyt.eval", "fms_dyt.study", "fms_dyt.tune", "fms_dyt.probe",
       "matplotlib", "lm_eval"]
# Loaded only when a run asks for it (parallel.float8), never by importing the trainer
ON_REQUEST = ["torchao"]
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
    """Every module ``path`` imports anywhere in it; ``from fms_dyt import x`` and relative imports
    as the full name of each module they name."""
    package = ".".join(("fms_dyt", *path.relative_to(PACKAGE).parent.parts))
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module
            if node.level:  # from . import x, from .norms import y: relative to this file's package
                parts = package.split(".")[:len(package.split(".")) + 1 - node.level]
                base = ".".join(parts + ([node.module] if node.module else []))
            modules.add(base)
            modules.update(f"{base}.{alias.name}" for alias in node.names if _source(f"{base}.{alias.name}"))
    return modules


def _source(module: str) -> Path | None:
    """The file of an fms_dyt module, or None for anything else."""
    if module != "fms_dyt" and not module.startswith("fms_dyt."):
        return None
    path = PACKAGE.parent.joinpath(*module.split("."))
    return next((p for p in (path.with_suffix(".py"), path / "__init__.py") if p.is_file()), None)


@pytest.mark.parametrize("name", sorted(BELOW))
def test_module_does_not_import_the_layers_above(name):
    imported = imported_modules(PACKAGE / name)
    bad = sorted(m for m in imported for above in BELOW[name] if m == above or m.startswith(above + "."))
    assert not bad, f"fms_dyt/{name} imports {bad}"


def _lab(modules) -> list[str]:
    return sorted(m for m in modules for lab in LAB if m == lab or m.startswith(lab + "."))


def test_training_never_imports_the_lab():
    """Every fms_dyt module the trainer can reach, through function-local imports too (the ones
    that run at the end of a run or on a resume), imports nothing of the lab."""
    reached, todo = set(), ["fms_dyt.trainer"]
    while todo:
        module = todo.pop()
        if module in reached:
            continue
        reached.add(module)
        imported = imported_modules(_source(module))
        bad = _lab(imported)
        assert not bad, f"{_source(module).relative_to(PACKAGE.parent)} imports {bad}, which training must not load"
        todo += [m for m in imported if _source(m)]
    assert {"fms_dyt.telemetry", "fms_dyt.metrics", "fms_dyt.data.pipeline"} <= reached


def test_importing_the_trainer_loads_no_lab():
    """What a fresh interpreter holds after ``import fms_dyt.trainer`` (train.py's first import)."""
    code = "import sys, fms_dyt.trainer; print(' '.join(sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], cwd=PACKAGE.parent, capture_output=True, text=True,
                          check=True)
    loaded = done.stdout.split()
    assert "fms_dyt.trainer" in loaded and not _lab(loaded), _lab(loaded)
    assert not [m for m in loaded for lib in ON_REQUEST if m == lib or m.startswith(lib + ".")]


def test_exit_codes_are_defined_once():
    """Every command takes its exit codes from fms_dyt/errors.py: no other module defines one or
    returns a bare number for a failure."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
            if isinstance(node, ast.Assign) and any(n.startswith("EXIT_") for n in names):
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} defines {names}")
            if isinstance(node, ast.Return) and isinstance(node.value, ast.Constant) and type(node.value.value) is int \
                    and node.value.value > 0:
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} returns {node.value.value}")
    assert [f for f in found if not f.startswith("errors.py")] == []
