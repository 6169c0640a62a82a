"""The benchmark suite runs (quick mode) and writes every key; its numbers are not checked here."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from harness import interleaved, ratio  # noqa: E402

KEYS = [
    "dyt_over_rms_eager_fwdbwd", "dyt_over_rms_best_fwdbwd", "dyt_over_rms_eager_fwdbwd_fp32",
    "dyt_over_rms_best_fwdbwd_fp32", "fms_over_hf_step_eager", "fms_over_hf_step_compiled",
    "dyt_over_rms_step", "dyt_over_rms_step_compiled", "ce_fused_over_torch_fwdbwd",
    "shared_kernels_over_hf_step_compiled", "data_over_tokenizer", "ckpt_save_over_dd",
    "ckpt_load_s", "gloo_1rank_tokens_per_s", "gloo_2rank_tokens_per_s", "gloo_2rank_over_1rank_throughput",
    "quickstart_tokens_per_s",
]


def test_interleaved_alternates_order_and_counts_calls():
    calls = []
    times = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert [len(v) for v in times.values()] == [3, 3]
    assert ratio({"a": [1.0, 2.0, 9.0], "b": [2.0, 4.0, 4.0]}, "a", "b") == 0.5


def test_quick_run_writes_every_key(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "bench/run.py", "--quick", "--output", str(out), "--workdir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    for key in KEYS:
        assert isinstance(report[key], float) and math.isfinite(report[key]) and report[key] > 0, key
        assert key in proc.stdout  # the printed table
    assert set(report["targets"]) <= set(KEYS)
    assert all(isinstance(t["met"], bool) for t in report["targets"].values())
    assert report["quick"] is True and report["details"]["machine_before"]["cores"] >= 1
    assert list(tmp_path.iterdir()) == [out]  # scratch checkpoints removed


@pytest.mark.parametrize("value,target,met", [(0.5, "<= 0.6", True), (0.7, "<= 0.6", False), (0.9, ">= 0.8", True)])
def test_targets(value, target, met):
    import run

    assert run.meets(value, target) is met
