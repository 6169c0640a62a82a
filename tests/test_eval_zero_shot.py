"""eval/zero_shot.py on a tiny trained checkpoint: the 15 task formats through lm-eval, the JSON
report, checkpoint resolution, BOS handling and W&B logging."""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch

from fms_dyt.eval import EvalError
from fms_dyt.eval.cli import parse_args
from fms_dyt.eval.lm import load_model, prepare_tokenizer
from fms_dyt.eval.report import averages, default_output, write_json
from fms_dyt.eval.run import run
from fms_dyt.eval.tasks import task_config, task_manager
from fms_dyt.eval.wandb_log import log_wandb

REPO = Path(__file__).resolve().parent.parent
TASK_DATA = REPO / "tests" / "data" / "eval_tasks"

TINY_TASKS = sorted(p.stem for p in TASK_DATA.glob("tiny_*.yaml"))
STEPS, INTERVAL = 4, 2


@pytest.fixture(scope="module")
def run_dir(quickstart_run):
    assert (quickstart_run.steps, quickstart_run.interval) == (STEPS, INTERVAL)
    return quickstart_run.dir


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)  # the local tasks' data_files are relative to the repository root


@pytest.fixture(scope="module")
def manager():
    """One task index for the whole module (built-in folders of the 15 tasks + the local tasks)."""
    return task_manager(TINY_TASKS, [TASK_DATA])


def evaluate(ckpt, tasks, manager, *extra, batch_size="8"):
    args = parse_args([str(ckpt), "--include-path", str(TASK_DATA), "--tasks", *tasks,
                       "--batch-size", batch_size, *extra])
    return run(args, manager=manager)


@pytest.fixture(scope="module")
def full_report(run_dir, manager):
    return evaluate(run_dir, TINY_TASKS, manager)


def test_all_15_formats_are_scored_through_lm_eval(full_report, run_dir, manager):
    r = full_report
    assert list(r["tasks"]) == TINY_TASKS
    # The same 21 metric rows as the real 15 tasks: acc everywhere, acc_norm on 5, em and f1 on record.
    assert len(r["rows"]) == 21
    assert {m for t in ("tiny_arc_easy", "tiny_arc_challenge", "tiny_hellaswag", "tiny_openbookqa", "tiny_piqa")
            for m in r["tasks"][t]["metrics"]} == {"acc", "acc_norm"}
    assert set(r["tasks"]["tiny_record"]["metrics"]) == {"em", "f1"}
    for row in r["rows"]:
        assert 0.0 <= row["value"] <= 1.0 and row["stderr"] is not None and not math.isnan(row["stderr"])
    for task, info in r["tasks"].items():
        cfg = task_config(manager, task)
        data = REPO / cfg["dataset_kwargs"]["data_files"]["validation"]
        assert info["n_samples"] == info["n_docs"] == len(data.read_text().splitlines()), task
        assert info["num_fewshot"] == 0
    avg = r["averages"]
    assert avg["primary_mean"]["n"] == 15 and avg["openllama_mean"]["n"] == 21
    assert avg["openllama_mean"]["value"] == pytest.approx(sum(x["value"] for x in r["rows"]) / 21)
    # The checkpoint: the newest of the run, with its step, tokens and model config.
    meta = json.loads((run_dir / "checkpoints" / f"step_{STEPS}" / "meta.json").read_text())
    assert r["checkpoint"]["step"] == STEPS and r["checkpoint"]["tokens_seen"] == meta["tokens_seen"] > 0
    assert r["checkpoint"]["run_dir"] == str(run_dir.resolve())
    assert r["model"]["model"]["dim"] == r["training_config"]["model"]["dim"]
    assert r["model"]["norm"]["kind"] == "dyt"
    assert r["versions"]["lm_eval"] and r["versions"]["tasks"]["tiny_truthfulqa_mc2"] == 3.0


def test_scores_are_the_models_own_loglikelihoods_with_bos(full_report, run_dir):
    """truthfulqa_mc2 recomputed by hand from the model: BOS + prompt + answer, as in training."""
    from fms_dyt.inference import load_for_inference
    from fms_dyt.data import load_tokenizer
    from lm_eval.tasks import TaskManager

    model, cfg, _ = load_for_inference(run_dir)
    tok = load_tokenizer(cfg.tokenizer)
    task = TaskManager(include_path=[str(TASK_DATA)], include_defaults=False).load(["tiny_truthfulqa_mc2"])["tasks"]
    task = task["tiny_truthfulqa_mc2"]
    masses = []
    for doc in task.validation_docs():
        context = task.doc_to_text(doc)
        logliks = []
        for choice in doc["mc2_targets"]["choices"]:
            ctx = tok(context, add_special_tokens=False)["input_ids"]
            whole = tok(context + " " + choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([[1] + whole])  # BOS (id 1) first
            with torch.no_grad():
                logp = model(ids).logits.float().log_softmax(-1)[0]
            cont = whole[len(ctx):]
            start = 1 + len(ctx)
            logliks.append(sum(logp[start + i - 1, t].item() for i, t in enumerate(cont)))
        probs = torch.tensor(logliks, dtype=torch.float64).exp()
        labels = torch.tensor(doc["mc2_targets"]["labels"])
        masses.append((probs[labels == 1].sum() / probs.sum()).item())
    assert full_report["tasks"]["tiny_truthfulqa_mc2"]["metrics"]["acc"]["value"] == pytest.approx(
        sum(masses) / len(masses), abs=1e-5)


def test_a_step_directory_and_the_json_file(run_dir, manager, tmp_path):
    step_dir = run_dir / "checkpoints" / f"step_{INTERVAL}"
    args = parse_args([str(step_dir), "--include-path", str(TASK_DATA), "--tasks", "tiny_arc_easy",
                       "tiny_record", "--limit", "2", "--batch-size", "2"])
    report = run(args, manager=manager)
    assert report["checkpoint"]["step"] == INTERVAL
    assert report["checkpoint"]["run_dir"] == str(run_dir.resolve())
    assert report["evaluation"]["limit"] == 2 and report["tasks"]["tiny_arc_easy"]["n_samples"] == 2
    out = default_output(report["checkpoint"], 2)
    assert out == run_dir.resolve() / "eval" / f"zero_shot_step_{INTERVAL}_limit2.json"
    write_json(report, tmp_path / "r.json")
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["averages"]["openllama_mean"]["definition"].startswith("OpenLLaMA-style")
    assert saved["tasks"]["tiny_record"]["metrics"]["em"]["value"] == report["tasks"]["tiny_record"]["metrics"]["em"]["value"]
    assert saved["training_config"]["train"]["max_steps"] == STEPS


def test_a_step_directory_copied_out_of_its_run(run_dir, tmp_path):
    import shutil

    copied = tmp_path / f"step_{INTERVAL}"
    shutil.copytree(run_dir / "checkpoints" / f"step_{INTERVAL}", copied)
    _, _, info = load_model(copied)
    assert info["kind"] == "training" and info["step"] == INTERVAL and info["run_dir"] is None
    assert default_output(info, None) == Path(f"zero_shot_step_{INTERVAL}.json")
    with pytest.raises(EvalError, match="cannot load CKPT"):
        load_model(tmp_path / "empty_run")


def test_batch_size_auto_finds_the_largest_that_runs(run_dir, manager):
    report = evaluate(run_dir, ["tiny_piqa"], manager, "--limit", "2", "--max-batch-size", "4", batch_size="auto")
    assert report["evaluation"]["batch_size"] == "auto"
    assert report["evaluation"]["batch_sizes"] == [4]  # nothing runs out of memory here: the cap wins


def test_bos_is_prepended_and_eos_never():
    from fms_dyt.data import TokenizerConfig, load_tokenizer

    tok = prepare_tokenizer(load_tokenizer(TokenizerConfig()), bos_id=1, eos_id=2)
    assert tok("Question: why?", add_special_tokens=True)["input_ids"][0] == 1
    tok.add_eos_token = True
    with pytest.raises(EvalError, match="BOS"):
        prepare_tokenizer(tok, bos_id=1, eos_id=2)


# ---- W&B -------------------------------------------------------------------------------------------
class FakeRun:
    def __init__(self, **kwargs):
        self.init, self.logged, self.metrics, self.finished = kwargs, [], [], False
        self.summary, self.dir = {}, "wandb/run-x/files"

    def define_metric(self, name, **kwargs):
        self.metrics.append((name, kwargs))

    def log(self, data):
        self.logged.append(data)

    def finish(self):
        self.finished = True


@pytest.fixture()
def fake_wandb(monkeypatch):
    runs = []

    def init(**kwargs):
        runs.append(FakeRun(**kwargs))
        return runs[-1]

    module = types.SimpleNamespace(init=init, Table=lambda columns, data: ("table", columns, data))
    monkeypatch.setitem(sys.modules, "wandb", module)
    return runs


def small_report(run_dir, step=7):
    rows = [{"task": "a", "metric": "acc", "value": 0.25, "stderr": 0.1},
            {"task": "a", "metric": "acc_norm", "value": 0.5, "stderr": 0.1}]
    return {
        "checkpoint": {"path": str(run_dir), "kind": "training", "run_dir": str(run_dir), "step": step},
        "training_config": {"logging": {"wandb": {"project": "dyt-runs", "entity": None}}},
        "model": {}, "evaluation": {}, "rows": rows, "averages": averages(rows, ["a"]),
    }


def test_wandb_logs_into_the_training_run(fake_wandb, tmp_path):
    (tmp_path / "wandb_id").write_text("run123\n")
    log_wandb(small_report(tmp_path), "offline", None)
    (run,) = fake_wandb
    assert run.init["id"] == "run123" and run.init["resume"] == "allow" and run.init["project"] == "dyt-runs"
    assert run.init["mode"] == "offline" and run.init["dir"] == str(tmp_path)
    assert ("eval/*", {"step_metric": "eval/step"}) in run.metrics
    (logged,) = run.logged
    assert logged["eval/step"] == 7 and logged["eval/a/acc_norm"] == 0.5
    assert logged["eval/avg_primary"] == 0.5 and logged["eval/avg_openllama"] == pytest.approx(0.375)
    assert logged["eval/zero_shot"][2][1] == ["a", "acc_norm", 0.5, 0.1, True]
    assert run.summary["eval/avg_primary"] == 0.5 and run.summary["eval/a/acc"] == 0.25
    assert run.finished


def test_wandb_starts_a_new_run_for_an_exported_model(fake_wandb, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    report = small_report(tmp_path)
    report["checkpoint"].update(kind="exported", run_dir=None, step=None)
    report["training_config"] = None
    log_wandb(report, "auto", "my-evals")
    (run,) = fake_wandb
    assert "id" not in run.init and run.init["job_type"] == "eval" and run.init["project"] == "my-evals"
    assert run.init["mode"] == "offline"  # auto without an API key
    assert run.logged[0]["eval/step"] == 0


def test_wandb_offline_run_reuses_the_training_run_id(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb_id").write_text("evalrun42\n")
    where = log_wandb(small_report(tmp_path), "offline", None)
    assert Path(where).is_relative_to(tmp_path / "wandb")
    (offline,) = (tmp_path / "wandb").glob("offline-run-*-evalrun42")
    assert (offline / "run-evalrun42.wandb").stat().st_size > 0
