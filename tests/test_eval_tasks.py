"""eval/: task definitions, the record override, the averages and the report table (no model)."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TASK_DATA = REPO / "tests" / "data" / "eval_tasks"
sys.path.insert(0, str(REPO / "eval"))
import zero_shot  # noqa: E402

from lm_eval.tasks._yaml_loader import load_yaml  # noqa: E402

BUILTIN = zero_shot._builtin_root()
# The prompt and scoring fields that make a task what it is (not where its data come from).
FORMAT_FIELDS = ("output_type", "doc_to_text", "doc_to_target", "doc_to_choice", "process_docs",
                 "process_results", "metric_list", "num_fewshot")


def builtin_yaml(task: str) -> Path:
    """The built-in YAML that defines ``task``, found in the folder zero_shot.py indexes for it."""
    for path in (BUILTIN / zero_shot.BUILTIN_TASK_DIRS[task]).rglob("*.yaml"):
        if load_yaml(path, resolve_func=False, recursive=False).get("task") == task:
            return path
    raise AssertionError(f"lm-eval defines no task {task}")


def fields(path: Path) -> dict:
    """The format fields of a task YAML; ``!function`` values reduced to their function's name."""
    cfg = load_yaml(path, resolve_func=False)
    out = {}
    for key in FORMAT_FIELDS:
        value = cfg.get(key)
        if isinstance(value, str) and "/" in value:  # an unresolved !function: ".../<module>.<function>"
            value = "function " + value.rsplit(".", 1)[-1]
        out[key] = value
    return out


def function_sources(path: Path) -> dict:
    """Source code of every ``!function`` field, loaded the way lm-eval loads them."""
    import inspect

    cfg = load_yaml(path, resolve_func=True)
    return {k: inspect.getsource(v) for k, v in cfg.items() if callable(v)}


TINY = sorted(p for p in TASK_DATA.glob("tiny_*.yaml"))


def test_there_is_a_local_task_in_each_of_the_15_formats():
    formats = {load_yaml(p, resolve_func=False)["metadata"]["format_of"] for p in TINY}
    assert formats == set(zero_shot.DEFAULT_TASKS)


@pytest.mark.parametrize("path", TINY, ids=lambda p: p.stem)
def test_local_task_has_the_format_of_its_builtin(path):
    cfg = load_yaml(path, resolve_func=False)
    target = cfg["metadata"]["format_of"]
    reference = zero_shot.FMS_DYT_TASKS / "record" / "record.yaml" if target == "record" else builtin_yaml(target)
    assert fields(path) == fields(reference)
    if target != "record":  # the built-in record cannot even be imported (see test below)
        assert function_sources(path) == function_sources(reference)
    # Data: local JSON rows with every field the prompt reads.
    assert cfg["dataset_path"] == "json"
    files = cfg["dataset_kwargs"]["data_files"]["validation"]
    rows = [json.loads(line) for line in (REPO / files).read_text().splitlines()]
    assert len(rows) >= 4


def test_record_override_replaces_the_broken_builtin():
    ours = zero_shot.FMS_DYT_TASKS / "record" / "record.yaml"
    builtin = builtin_yaml("record")
    assert fields(ours) == fields(builtin)
    for key in ("task", "dataset_path", "dataset_name", "validation_split"):
        assert load_yaml(ours, resolve_func=False)[key] == load_yaml(builtin, resolve_func=False)[key]
    manager = zero_shot.task_manager(["record"])
    assert manager.task_index["record"].yaml_path.resolve() == ours.resolve()


@pytest.fixture()
def builtin_record_util(monkeypatch):
    """lm-eval's own record util.py, importable thanks to a stand-in for the removed module."""
    for name in ("transformers.data", "transformers.data.metrics"):
        monkeypatch.setitem(sys.modules, name, sys.modules.get(name) or types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "transformers.data.metrics.squad_metrics",
                        types.ModuleType("transformers.data.metrics.squad_metrics"))
    spec = importlib.util.spec_from_file_location("builtin_record_util", builtin_yaml("record").with_name("util.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def record_utils():
    spec = importlib.util.spec_from_file_location("fms_dyt_record_utils", zero_shot.FMS_DYT_TASKS / "record" / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_record_prompts_equal_lm_evals(builtin_record_util):
    import datasets

    ours = record_utils()
    rows = datasets.Dataset.from_list([json.loads(line) for line in (TASK_DATA / "record.jsonl").read_text().splitlines()])
    mine, theirs = ours.process_docs(rows), builtin_record_util.process_docs(rows)
    assert mine.to_list() == theirs.to_list()
    assert mine[0]["entities"] == ["Benfica", "Lisbon", "Porto"]  # duplicates removed, sorted
    for doc in mine:
        for fn in ("doc_to_text", "doc_to_target", "doc_to_choice"):
            assert getattr(ours, fn)(doc) == getattr(builtin_record_util, fn)(doc)


def test_record_squad_metrics():
    r = record_utils()
    assert r.normalize_answer("  The  Eiffel-Tower, Paris! ") == "eiffeltower paris"
    assert r.exact_match("the Porto", "Porto.") == 1
    assert r.exact_match("Porto FC", "Porto") == 0
    assert r.token_f1("Barack Obama", "Obama") == pytest.approx(2 / 3)  # precision 1/2, recall 1
    assert r.token_f1("x b c", "b c d e") == pytest.approx(2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4))
    assert r.token_f1("the", "an") == 1.0  # both empty after normalisation
    assert r.token_f1("the", "Porto") == 0.0
    assert r.token_f1("Lisbon", "Porto") == 0.0


def test_record_scores_the_most_likely_entity_against_every_answer():
    r = record_utils()
    doc = {"entities": ["Benfica", "Porto", "Porto FC"], "answers": ["Porto", "Porto FC"]}
    # log-likelihoods per entity: "Porto FC" wins, matching the second answer exactly.
    assert r.process_results(doc, [(-3.0, False), (-2.0, False), (-1.0, True)]) == {"f1": 1.0, "em": 1}
    # "Benfica" wins: wrong.
    assert r.process_results(doc, [(-0.5, False), (-2.0, False), (-1.0, True)]) == {"f1": 0.0, "em": 0}
    doc = {"entities": ["Porto", "Porto FC"], "answers": ["Porto FC"]}
    assert r.process_results(doc, [(-0.5, True), (-2.0, False)]) == {"f1": pytest.approx(2 / 3), "em": 0}


# ---- averages --------------------------------------------------------------------------------------
def lm_eval_results() -> dict:
    """lm-eval's results dict shape for the 15 tasks: acc 0.5 everywhere, acc_norm 0.6, record 0.3/0.4."""
    out = {}
    for task in zero_shot.DEFAULT_TASKS:
        entry = {"alias": task, "name": task, "sample_len": 100}
        if task == "record":
            entry.update({"f1,none": 0.4, "f1_stderr,none": 0.01, "em,none": 0.3, "em_stderr,none": 0.01})
        else:
            entry.update({"acc,none": 0.5, "acc_stderr,none": 0.02})
            if task in ("arc_challenge", "arc_easy", "hellaswag", "openbookqa", "piqa"):
                entry.update({"acc_norm,none": 0.6, "acc_norm_stderr,none": 0.03})
        out[task] = entry
    return out


def test_the_two_averages_from_a_known_results_dict():
    rows = zero_shot.metric_rows(lm_eval_results(), zero_shot.DEFAULT_TASKS)
    assert len(rows) == 21  # as many rows as OpenLLaMA's table
    avg = zero_shot.averages(rows, zero_shot.DEFAULT_TASKS)
    primary = avg["primary_mean"]
    assert primary["metrics"] == {
        **{t: "acc" for t in zero_shot.DEFAULT_TASKS},
        **{t: "acc_norm" for t in ("arc_challenge", "arc_easy", "hellaswag", "openbookqa", "piqa")},
        "record": "em",
    }
    # 9 tasks at acc 0.5, 5 at acc_norm 0.6, record em 0.3.
    assert primary["n"] == 15 and primary["value"] == pytest.approx((9 * 0.5 + 5 * 0.6 + 0.3) / 15)
    # 14 acc rows, 5 acc_norm rows, em and f1.
    openllama = avg["openllama_mean"]
    assert openllama["n"] == 21 and openllama["value"] == pytest.approx((14 * 0.5 + 5 * 0.6 + 0.3 + 0.4) / 21)
    assert "acc_norm for arc_challenge, arc_easy, hellaswag, openbookqa, piqa" in primary["definition"]
    assert "em for record" in primary["definition"]


def test_metric_rows_keep_stderr_and_skip_bookkeeping():
    results = {"x": {"alias": "x", "sample_len": 3, "acc,none": 0.25, "acc_stderr,none": 0.1,
                     "acc_norm,none": 0.5, "acc_norm_stderr,none": "N/A"}}
    assert zero_shot.metric_rows(results, ["x"]) == [
        {"task": "x", "metric": "acc", "value": 0.25, "stderr": 0.1},
        {"task": "x", "metric": "acc_norm", "value": 0.5, "stderr": None},
    ]


def test_table_marks_primary_metrics_and_prints_both_definitions():
    results = lm_eval_results()
    rows = zero_shot.metric_rows(results, zero_shot.DEFAULT_TASKS)
    report = {
        "rows": rows,
        "tasks": {t: {"version": 1.0, "n_samples": 100} for t in zero_shot.DEFAULT_TASKS},
        "averages": zero_shot.averages(rows, zero_shot.DEFAULT_TASKS),
    }
    table = zero_shot.format_table(report)
    lines = table.splitlines()
    assert sum(line.rstrip().endswith("*") for line in lines) == 15
    assert any(line.startswith("arc_easy") and "acc " in line for line in lines)
    assert any("acc_norm" in line and "0.6000" in line and line.rstrip().endswith("*") for line in lines)
    assert f"primary mean   = {(9 * 0.5 + 5 * 0.6 + 0.3) / 15:.4f}" in table
    assert f"OpenLLaMA mean = {(14 * 0.5 + 5 * 0.6 + 0.7) / 21:.4f}" in table
    assert "unweighted mean over the 15 tasks of one metric each" in table
    assert "unweighted mean of all 21 metric rows" in table


# ---- command line and task lookup --------------------------------------------------------------------
def test_arguments():
    args = zero_shot.parse_args(["ckpt", "--tasks", "arc_easy,piqa", "boolq", "--limit", "10"])
    assert args.tasks == ["arc_easy", "piqa", "boolq"] and args.limit == 10
    assert zero_shot.parse_args(["ckpt", "--limit", "0.5"]).limit == 0.5
    assert zero_shot.parse_args(["ckpt"]).tasks == zero_shot.DEFAULT_TASKS
    with pytest.raises(SystemExit):
        zero_shot.parse_args(["ckpt", "--batch-size", "big"])


def test_default_tasks_are_found_without_indexing_all_of_lm_eval():
    manager = zero_shot.task_manager(zero_shot.DEFAULT_TASKS)
    zero_shot.check_task_names(manager, zero_shot.DEFAULT_TASKS)
    assert len(manager.all_tasks) < 500  # only the few folders of the 15 tasks (lm-eval has ~15k)
    source = zero_shot.task_source(manager, "arc_easy")
    assert zero_shot.describe(source) == "allenai/ai2_arc (ARC-Easy)" and not zero_shot.is_local(source)


def test_unknown_task_names_are_reported_with_suggestions():
    manager = zero_shot.task_manager(["arc_easy"], [TASK_DATA])
    with pytest.raises(zero_shot.EvalError, match=r"arc_esy \(did you mean arc_easy"):
        zero_shot.check_task_names(manager, ["arc_esy"])
    with pytest.raises(zero_shot.EvalError, match="is not a directory"):
        zero_shot.task_manager(["arc_easy"], [TASK_DATA / "nope"])


def test_offline_mode_is_switched_on_when_the_hub_is_unreachable(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example:8443")
    tried = []

    def refuse(address, timeout=None):
        tried.append(address)
        raise ConnectionRefusedError("refused")

    monkeypatch.setattr(zero_shot.socket, "create_connection", refuse)
    assert zero_shot.offline_if_hub_unreachable(timeout=0.5)
    assert tried == [("hub.example", 443)]
    assert zero_shot.os.environ["HF_HUB_OFFLINE"] == zero_shot.os.environ["HF_DATASETS_OFFLINE"] == "1"


def test_online_mode_is_kept_when_the_hub_answers(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.setattr(zero_shot.socket, "create_connection", lambda address, timeout=None: types.SimpleNamespace(close=lambda: None))
    assert not zero_shot.offline_if_hub_unreachable()
    assert zero_shot.os.environ["HF_DATASETS_OFFLINE"] == "0"
