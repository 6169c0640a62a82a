"""The trainer on one CUDA GPU (tests marked ``gpu``: skipped without CUDA, see tests/conftest.py;
bench/gpu_check.sh runs them), and the GPU check's dry run, which any machine runs."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from helpers import losses

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8
# 128 x 4 tokens a micro-batch on one GPU, 1,024 a step: 2 micro-batches accumulated.
ARGS = ["experiment=quickstart", "train.device=cuda", "parallel.param_dtype=bfloat16", "parallel.compile=true",
        "train.seq_len=128", "train.micro_batch_size=4", "train.global_batch_tokens=1024",
        f"train.max_steps={STEPS}", "checkpoint.interval=2", "checkpoint.async_save=true",
        "logging.interval=1", "logging.wandb.mode=disabled"]


def _torchrun(run_dir: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           "train.py", *ARGS, f"run_dir={run_dir}"]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.gpu
def test_nccl_bf16_compiled_accumulation_async_save_sigterm_and_resume(tmp_path):
    """torchrun with NCCL, bf16 mixed precision, compiled blocks, 2 micro-batches a step, async
    checkpoints; SIGTERM -> exit 75 -> resume with the losses of an uninterrupted run."""
    ref, stopped = tmp_path / "ref", tmp_path / "stopped"
    out, _ = _torchrun(ref).communicate(timeout=300)
    assert sorted(losses(ref)) == list(range(1, STEPS + 1)), out
    assert "2 micro-batches a step" in out, out

    proc = _torchrun(stopped)
    deadline = time.time() + 300
    while 3 not in losses(stopped):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.1)
    for worker in psutil.Process(proc.pid).children(recursive=True):
        worker.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    # torchrun reports the worker's exit 75 (checkpoint saved, run again to resume) as a failure.
    assert re.search(r"exitcode\s*:\s*75", out), out
    last = max(losses(stopped))
    assert 3 <= last < STEPS and (stopped / "checkpoints" / f"step_{last}" / "meta.json").is_file(), out

    out, _ = _torchrun(stopped).communicate(timeout=300)
    assert "resumed from" in out, out
    again, expected = losses(stopped), losses(ref)
    for step in range(last + 1, STEPS + 1):
        assert again[step] == expected[step], (step, again[step], expected[step])


SYNC_STEPS, LOG_INTERVAL = 9, 4


@pytest.mark.gpu
def test_no_device_sync_between_log_steps(tmp_path, monkeypatch):
    """The trainer's loop on one GPU with torch.cuda.set_sync_debug_mode("error") from the start of
    every non-log step after the first until the next step starts, so that any device-to-host
    read there (``.item()``, a copy to the host, a data-dependent shape) raises. Log steps (every
    4th, with validation and telemetry, and the last) and the first step (lazy initialisation) may
    sync. 2 micro-batches a step, bf16, DyT."""
    import torch

    from fms_dyt import trainer
    from fms_dyt.config import load_config

    cfg = load_config(["experiment=quickstart", "train.device=cuda", "parallel.param_dtype=bfloat16",
                       "train.seq_len=128", "train.micro_batch_size=4", "train.global_batch_tokens=1024",
                       f"train.max_steps={SYNC_STEPS}", f"logging.interval={LOG_INTERVAL}",
                       f"logging.console_interval={LOG_INTERVAL}", f"logging.telemetry_interval={LOG_INTERVAL}",
                       f"validation.interval={LOG_INTERVAL}", "validation.tokens=1032", "checkpoint.interval=100",
                       "data.num_workers=2", "logging.wandb.mode=disabled", f"run_dir={tmp_path / 'run'}"])
    step_of_call = iter(range(1, SYNC_STEPS + 1))
    strict = []
    train_step = trainer.train_step

    def step_under_sync_debug(*args, **kwargs):
        step = next(step_of_call)
        quiet = step > 1 and step % LOG_INTERVAL and step != SYNC_STEPS
        torch.cuda.set_sync_debug_mode("error" if quiet else "default")
        if quiet:
            strict.append(step)
        return train_step(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", step_under_sync_debug)
    try:
        code = trainer.train(cfg)
    except RuntimeError as e:
        pytest.fail(f"a device sync between log steps (step {strict[-1] if strict else '?'}): {e}")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert code == 0
    assert strict == [2, 3, 5, 6, 7]
    assert sorted(losses(tmp_path / "run")) == [4, 8, 9]


def test_gpu_check_dry_run_collects_the_gpu_tests_and_checks_the_benchmarks(tmp_path):
    out = tmp_path / "gpu_check.json"
    run = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run", "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "nothing ran on a GPU" in run.stdout
    result = json.loads(out.read_text())
    assert result["ran_on_gpu"] is False and result["gpu_tests_collected"] >= 2
    assert result["sync_debug_test"] == "tests/test_gpu.py::test_no_device_sync_between_log_steps"
    assert result["bench"]["benchmarks"] == ["norm", "step", "mfu", "memory", "fp8"]
    assert {"fp8_dyt_bf16", "fp8_dyt_tensorwise", "fp8_rmsnorm_rowwise", "fp8_dyt_tensorwise_static"} <= set(
        result["bench"]["configs_checked"])  # the FP8 configurations load (torchao importable)
    # The commands a GPU run would make, printed for whoever reads the dry run.
    assert "would run: timeout 120 python -m pytest -q tests/test_gpu.py::test_no_device_sync_between_log_steps" in run.stdout
    assert result["commands"][0].endswith("tests/test_gpu.py::test_no_device_sync_between_log_steps")
