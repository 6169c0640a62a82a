"""Fixtures shared by several test files (test files never import each other), and the ``gpu``
marker: tests marked ``gpu`` need a CUDA GPU; without one they are skipped, saying so."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parent.parent


# ---- every test gets the environment back -----------------------------------------------------


@pytest.fixture(autouse=True)
def _restore_environment():
    """``train()`` run in this process exports RANK, WORLD_SIZE and MASTER_PORT (a one-process
    group): they must not reach the next test's ``train.py`` or torchrun subprocesses, which would
    then join that group's rendezvous on a port already in use."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


# ---- a trained quickstart run, shared by the eval test files ---------------------------------


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory) -> SimpleNamespace:
    """A quickstart run of ``steps`` steps with a checkpoint every ``interval``, trained once per
    session: ``.dir``, ``.steps``, ``.interval``."""
    run = SimpleNamespace(dir=tmp_path_factory.getbasetemp() / "eval_trained_run", steps=4, interval=2)
    if not (run.dir / "checkpoints" / f"step_{run.steps}" / "meta.json").is_file():
        done = subprocess.run(
            [sys.executable, "train.py", "experiment=quickstart", f"train.max_steps={run.steps}",
             f"checkpoint.interval={run.interval}", f"run_dir={run.dir}", "logging.wandb.mode=disabled"],
            cwd=REPO, timeout=600, capture_output=True, text=True,
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return run


# ---- tests marked gpu --------------------------------------------------------------------------


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="marked gpu and this machine has no CUDA GPU; on one, run bash bench/gpu_check.sh")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
