"""Fixtures shared by several test files (their plain functions are in helpers.py; test files
never import each other), and the ``gpu`` marker: tests marked ``gpu`` need a CUDA GPU; without
one they are skipped, saying so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import losses

REPO = Path(__file__).resolve().parent.parent


# ---- every test gets the environment back -----------------------------------------------------


@pytest.fixture(autouse=True)
def _restore_environment():
    """``train()`` run in this process exports RANK and WORLD_SIZE (a one-process group), and
    some tests set MASTER_PORT: they must not reach the next test's ``train.py`` or torchrun
    subprocesses, which would then join a rendezvous that is not theirs."""
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


# ---- a one-process gloo group -----------------------------------------------------------------


@pytest.fixture
def one_rank(tmp_path):
    """A process group of one rank (gloo) for code that calls collectives (e.g. the Checkpointer)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


# ---- SIGKILL and resume on torchrun ranks ------------------------------------------------------


def _torchrun(run_dir, *args, nproc=2) -> subprocess.Popen:
    """``train.py <args> run_dir=<run_dir>`` on ``nproc`` torchrun ranks, output piped."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "train.py", *args, f"run_dir={run_dir}"]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _kill_and_resume(run_dir, args, kill_after: int, resume_step: int, nproc=2) -> str:
    """Train ``args`` in ``run_dir`` on ``nproc`` ranks, SIGKILL torchrun and every rank once step
    ``kill_after`` is logged (no chance to save), then run the same command again, which must
    resume from ``resume_step``; returns its output."""
    import time

    import psutil

    proc = _torchrun(run_dir, *args, nproc=nproc)
    deadline = time.time() + 600
    while not (run_dir / "metrics.jsonl").exists() or kill_after not in losses(run_dir):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.05)
    # torchrun and its ranks (torchrun puts workers in sessions of their own)
    tree = psutil.Process(proc.pid)
    for p in [tree, *tree.children(recursive=True)]:
        p.kill()
    proc.wait()
    out, _ = _torchrun(run_dir, *args, nproc=nproc).communicate(timeout=600)
    assert "resumed from" in out and f"(step {resume_step}," in out, out
    return out


@pytest.fixture
def killed_runs():
    """``.torchrun(run_dir, *args, nproc=2)`` (a Popen), ``.losses(run_dir)`` (losses by step of a
    run's metrics.jsonl) and ``.kill_and_resume(run_dir, args, kill_after, resume_step, nproc=2)``."""
    return SimpleNamespace(torchrun=_torchrun, losses=losses, kill_and_resume=_kill_and_resume)


# ---- a trained run: resumed, evaluated ------------------------------------------------------


@pytest.fixture
def resumed_copy(tmp_path):
    """``resume(run_dir, last_step, resume_step, train) -> copy``: a copy of a finished run without
    its checkpoint at ``last_step``, trained again by ``train(copy)`` (a ``subprocess.run``
    result), which must resume from ``resume_step``."""
    def resume(run_dir: Path, last_step: int, resume_step: int, train) -> Path:
        copy = tmp_path / "resumed"
        subprocess.run(["cp", "-r", str(run_dir), str(copy)], check=True)
        subprocess.run(["rm", "-r", str(copy / "checkpoints" / f"step_{last_step}")], check=True)
        done = train(copy)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        assert f"(step {resume_step}," in done.stdout + done.stderr  # "resumed from …/step_2 (step 2, …"
        return copy
    return resume


@pytest.fixture
def exported_fms_dyt(tmp_path, capsys):
    """``export(run_dir, refusal) -> (config.json, exported model)``: ``--format llama`` must exit 2
    with ``refusal`` in its message and write nothing; the default format (fms_dyt) must load with
    remote code and give the logits of the trained model within 1e-4."""
    def export(run_dir: Path, refusal: str):
        import torch
        from transformers import AutoModelForCausalLM

        from fms_dyt.export import main as export_main
        from fms_dyt.inference import load_for_inference

        out, llama = tmp_path / "exported", tmp_path / "llama"
        assert export_main([str(run_dir), str(llama), "--format", "llama"]) == 2
        assert refusal in capsys.readouterr().err and not llama.exists()
        assert export_main([str(run_dir), str(out)]) == 0  # the default format: fms_dyt
        ours, _, _ = load_for_inference(run_dir)
        theirs = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
        tokens = torch.randint(0, theirs.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert torch.allclose(ours(tokens).logits, theirs(tokens).logits, atol=1e-4, rtol=0)
        return json.loads((out / "config.json").read_text()), theirs
    return export


@pytest.fixture
def tiny_zero_shot(tmp_path):
    """``run(source) -> report``: eval/zero_shot.py on the bundled tiny_arc_easy task, offline."""
    def run(source: Path) -> dict:
        report = tmp_path / "zero_shot.json"
        done = subprocess.run(
            [sys.executable, "eval/zero_shot.py", str(source), "--include-path", str(REPO / "tests" / "data" / "eval_tasks"),
             "--tasks", "tiny_arc_easy", "--batch-size", "4", "--output", str(report)],
            cwd=REPO, capture_output=True, text=True, timeout=600,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        result = json.loads(report.read_text())
        assert "tiny_arc_easy" in result["lm_eval_results"]
        return result
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
