"""eval/zero_shot.py under torchrun: requests split over 2 processes (CPU, gloo), same scores as one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fms_dyt.eval.cli import parse_args
from fms_dyt.eval.run import run

REPO = Path(__file__).resolve().parent.parent
TASK_DATA = REPO / "tests" / "data" / "eval_tasks"

TASKS = ["tiny_arc_easy", "tiny_truthfulqa_mc2"]


def test_two_processes_score_like_one(quickstart_run, tmp_path, monkeypatch):
    run_dir = quickstart_run.dir
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "eval/zero_shot.py", str(run_dir), "--include-path", str(TASK_DATA), "--tasks", *TASKS,
         "--batch-size", "4", "--device", "cpu", "--output", str(tmp_path / "two.json")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("primary mean") == 1  # only rank 0 reports
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["evaluation"]["processes"] == 2

    monkeypatch.chdir(REPO)
    one = run(parse_args([str(run_dir), "--include-path", str(TASK_DATA), "--tasks", *TASKS,
                          "--batch-size", "4", "--device", "cpu"]))
    assert one["evaluation"]["processes"] == 1
    assert [r["task"] for r in two["rows"]] == [r["task"] for r in one["rows"]]
    for a, b in zip(two["rows"], one["rows"]):
        assert a["metric"] == b["metric"] and a["value"] == pytest.approx(b["value"], abs=1e-6), (a, b)
    assert two["tasks"]["tiny_arc_easy"]["n_samples"] == one["tasks"]["tiny_arc_easy"]["n_samples"] == 5
