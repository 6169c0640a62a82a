"""The eval command lines: agreement with stock ``lm_eval`` on an exported checkpoint, the offline
failure without a datasets cache, and prefetch."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TASK_DATA = REPO / "tests" / "data" / "eval_tasks"

from fms_dyt.eval.cli import main, parse_args
from fms_dyt.eval.run import run
from fms_dyt.eval.tasks import DEFAULT_TASKS, load_tasks, task_manager

sys.path.insert(0, str(REPO / "eval"))
import prefetch  # noqa: E402

# acc + acc_norm, our record override (em, f1), and a continuous score (mc2's probability mass).
AGREEMENT_TASKS = ["tiny_arc_easy", "tiny_hellaswag", "tiny_record", "tiny_truthfulqa_mc2"]


@pytest.fixture(scope="module")
def run_dir(quickstart_run):
    return quickstart_run.dir


def test_zero_shot_on_a_checkpoint_equals_stock_lm_eval_on_its_export(run_dir, quickstart_run, tmp_path, monkeypatch,
                                                                     capsys):
    from fms_dyt import export

    exported = tmp_path / "exported"
    assert export.main([str(run_dir), str(exported), "--format", "fms_dyt"]) == 0  # python -m fms_dyt.export
    # Stock lm-eval (`lm_eval` is the console script of `python -m lm_eval`) loads the directory
    # itself, with the model code exported beside the weights. It runs while ours does.
    stock = subprocess.Popen(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
         f"pretrained={exported},trust_remote_code=True,add_bos_token=True,dtype=float32",
         "--include_path", str(TASK_DATA), "--tasks", ",".join(AGREEMENT_TASKS), "--batch_size", "4",
         "--device", "cpu", "--output_path", str(tmp_path / "stock")],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # what main() sets after probing the hub here
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    try:
        code = main([str(run_dir), "--include-path", str(TASK_DATA), "--tasks", *AGREEMENT_TASKS,
                     "--batch-size", "4", "--output", str(tmp_path / "ours.json")])
    finally:
        stock_log, _ = stock.communicate(timeout=600)
    assert code == 0
    assert "primary mean" in capsys.readouterr().out
    assert stock.returncode == 0, stock_log[-3000:]
    (stock_file,) = (tmp_path / "stock").rglob("results_*.json")
    theirs = json.loads(stock_file.read_text())["results"]
    report = json.loads((tmp_path / "ours.json").read_text())
    assert report["checkpoint"]["step"] == quickstart_run.steps
    compared = 0
    for task in AGREEMENT_TASKS:
        for key, value in report["lm_eval_results"][task].items():
            if "," in key:
                assert theirs[task][key] == pytest.approx(value, abs=1e-6), (task, key)
                compared += 1
        assert {k for k in theirs[task] if "," in k} == {k for k in report["lm_eval_results"][task] if "," in k}
    assert compared == 2 * (2 + 2 + 2 + 1)  # every metric and its stderr
    # zero_shot.py also takes the exported directory itself (its own tokenizer, no training config).
    direct = run(parse_args([str(exported), "--include-path", str(TASK_DATA), "--tasks",
                             "tiny_truthfulqa_mc2", "--batch-size", "4"]))
    assert direct["checkpoint"]["kind"] == "exported" and direct["checkpoint"]["step"] is None
    assert direct["training_config"] is None and direct["model"]["norm"]["kind"] == "dyt"
    assert direct["rows"][0]["value"] == pytest.approx(theirs["tiny_truthfulqa_mc2"]["acc,none"], abs=1e-6)


def test_offline_without_cache_fails_fast_naming_the_dataset(run_dir, tmp_path):
    empty = tmp_path / "hf"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(empty),
           "HF_DATASETS_CACHE": str(empty / "datasets")}
    done = subprocess.run([sys.executable, "eval/zero_shot.py", str(run_dir), "--tasks", "arc_easy"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "allenai/ai2_arc (ARC-Easy)" in done.stderr
    assert "python eval/prefetch.py --tasks arc_easy" in done.stderr
    assert f"python eval/zero_shot.py {run_dir} --include-path tests/data/eval_tasks --tasks tiny_arc_easy\n" in done.stderr
    assert "Traceback" not in done.stderr


def test_offline_the_quickstarts_next_step_shows_prefetch_and_the_bundled_tiny_tasks(run_dir, tmp_path, monkeypatch):
    """`python eval/zero_shot.py runs/quickstart`, as the quickstart suggests, on a machine without
    network or cache: the error names eval/prefetch.py and a command that works offline."""
    empty = tmp_path / "hf"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(empty),
           "HF_DATASETS_CACHE": str(empty / "datasets")}
    elsewhere = tmp_path / "work"
    (elsewhere / "runs").mkdir(parents=True)
    (elsewhere / "runs" / "quickstart").symlink_to(run_dir)
    done = subprocess.run([sys.executable, str(REPO / "eval" / "zero_shot.py"), "runs/quickstart"],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"python eval/prefetch.py --tasks {' '.join(DEFAULT_TASKS)}" in done.stderr
    assert f"from the repository root ({REPO})" in done.stderr
    (hint,) = [line.strip() for line in done.stderr.splitlines()
               if line.strip().startswith("python eval/zero_shot.py")]
    command = shlex.split(hint)
    assert command[:2] == ["python", "eval/zero_shot.py"]
    args = parse_args(command[2:])
    assert args.ckpt == (elsewhere / "runs" / "quickstart").resolve()
    assert args.include_path == [Path("tests/data/eval_tasks")]
    assert args.tasks == [f"tiny_{t}" for t in DEFAULT_TASKS]
    # The hinted command finds its tasks and their data offline, from the repository root.
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    manager = task_manager(args.tasks, args.include_path)
    loaded = load_tasks(manager, args.tasks, args.include_path, progress=lambda msg: None)
    assert sorted(loaded) == sorted(args.tasks)


@pytest.fixture()
def offline_env(monkeypatch):
    """What prefetch sets after probing the hub here; monkeypatch restores it afterwards."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def test_prefetch_loads_every_task(monkeypatch, caplog, offline_env):
    monkeypatch.chdir(REPO)
    caplog.set_level("INFO", logger="fms_dyt.eval")
    assert prefetch.main(["--tasks", "tiny_arc_easy,tiny_record", "--include-path", str(TASK_DATA)]) == 0
    assert "tiny_arc_easy" in caplog.text and "tiny_record" in caplog.text
    assert any("tiny_record" in m and m.rstrip().endswith("4 documents") for m in caplog.messages)


def test_prefetch_reports_missing_local_files(monkeypatch, tmp_path, capsys, offline_env):
    monkeypatch.chdir(tmp_path)  # the local tasks' relative data paths do not resolve here
    assert prefetch.main(["--tasks", "tiny_piqa", "--include-path", str(TASK_DATA)]) == 2
    err = capsys.readouterr().err
    assert "tiny_piqa" in err and "piqa.jsonl" in err and "relative to the current directory" in err
