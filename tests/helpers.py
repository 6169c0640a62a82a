"""What several test files share (they import it as ``helpers``; test files never import each
other): short training runs (``train.py`` or in the test's own process), reading a run's
``metrics.jsonl``, and a base for in-memory training sources."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def tiny_sample_run(*overrides: str, steps: int, interval: int) -> list[str]:
    """The overrides of a few steps of a two-layer tiny model on the sample corpus, in fp32, every
    step's loss logged and a checkpoint every ``interval`` steps; ``overrides`` (norm, tokenizer,
    optimizer, validation) come after the model's."""
    return ["model=tiny", "model.n_layers=2", *overrides, "data=sample", "data.num_workers=1", "train.seq_len=32",
            "train.micro_batch_size=2", "train.global_batch_tokens=128", f"train.max_steps={steps}",
            f"checkpoint.interval={interval}", "checkpoint.keep=2", "parallel.param_dtype=float32",
            "logging.interval=1", "logging.wandb.mode=disabled"]


def train_py(run_dir, *overrides: str) -> subprocess.CompletedProcess:
    """``python train.py <overrides> run_dir=<run_dir>`` as a user runs it, from the repository root."""
    return subprocess.run([sys.executable, "train.py", *overrides, f"run_dir={run_dir}"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def trained(run_dir: Path, *overrides: str) -> Path:
    """``run_dir`` after :func:`train_py` ended with exit code 0 (its output's ends in the failure)."""
    done = train_py(run_dir, *overrides)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return run_dir


def metrics_by_step(run_dir) -> dict[int, dict]:
    """``metrics.jsonl`` of a run by step: a step logged again after a resume keeps its later
    record; a last line still being written (no newline yet) and a missing file read as nothing,
    so a test may poll a run in progress."""
    path = Path(run_dir) / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True) if path.exists() else []
    return {r["step"]: r for r in (json.loads(line) for line in lines if line.endswith("\n"))}


def losses(run_dir) -> dict[int, float]:
    """The training loss by step (see :func:`metrics_by_step`)."""
    return {step: r["loss"] for step, r in metrics_by_step(run_dir).items() if "loss" in r}


def train_here(cfg, data) -> None:
    """``fms_dyt.trainer.train(cfg, data)`` in this process, which must end with 0. The environment
    variables (RANK, WORLD_SIZE of its one-process group) and the signal handlers it sets are put
    back: a module fixture runs outside the per-test restore of conftest.py."""
    from fms_dyt.trainer import train

    saved_env = dict(os.environ)
    saved_handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        assert train(cfg, data=data) == 0
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        for sig, handler in saved_handlers.items():
            signal.signal(sig, handler)


class CountedBatches:
    """A base for the tests' in-memory training sources: the loader interface the trainer uses
    (``state_dict``/``load_state_dict``/``stats``) over a batch counter ``i``; subclasses yield
    ``(inputs, targets)`` from ``__iter__`` as a function of ``i``, so a resumed run continues exactly."""

    def __init__(self):
        self.i = 0

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, states):
        self.i = states[0]["i"]

    def stats(self):
        return {"batches": self.i}


class RandomBatches(CountedBatches):
    """Random token batches [micro, seq] with ids in [low, high): batch ``i`` from seed ``i``, so every
    run sees the same ones and a resumed run continues exactly."""

    def __init__(self, micro: int, seq: int, low: int = 0, high: int = 500):
        super().__init__()
        self.micro, self.seq, self.low, self.high = micro, seq, low, high

    def __iter__(self):
        while True:
            row = torch.randint(self.low, self.high, (self.micro, self.seq + 1),
                                generator=torch.Generator().manual_seed(self.i))
            self.i += 1
            yield row[:, :-1], row[:, 1:]
