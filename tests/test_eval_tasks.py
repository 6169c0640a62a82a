"""eval/: task definitions, the record override, the averages and the report table (no model)."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import socket
import sys
import threading
import types
from pathlib import Path

import pytest

from fms_dyt.eval import EvalError
from fms_dyt.eval.cli import parse_args
from fms_dyt.eval.hub import offline_if_hub_unreachable
from fms_dyt.eval.report import averages, format_table, metric_rows, primary_scores, read_report, write_json
from fms_dyt.eval.tasks import (BUNDLED_TASKS, DEFAULT_TASKS, builtin_folders_file, check_task_names, describe, is_local,
                                task_config, task_manager, task_source)

REPO = Path(__file__).resolve().parent.parent
TASK_DATA = REPO / "tests" / "data" / "eval_tasks"

# The prompt and scoring fields that make a task what it is (not where its data come from).
FORMAT_FIELDS = ("output_type", "doc_to_text", "doc_to_target", "doc_to_choice", "process_docs",
                 "process_results", "metric_list", "num_fewshot")


@functools.cache
def builtin_tasks() -> dict:
    """lm-eval's own task index (its built-in tasks, without fms-dyt's record): name -> entry."""
    from lm_eval.tasks import TaskManager

    return TaskManager().task_index


@functools.cache
def local_tasks():
    """The index of the tiny tasks and of eval/tasks (our record)."""
    return task_manager([], [TASK_DATA])


def builtin_yaml(task: str) -> Path:
    """The built-in YAML that defines ``task``."""
    return builtin_tasks()[task].yaml_path


def builtin_config(task: str) -> dict:
    return dict(builtin_tasks()[task].cfg)


def fields(cfg: dict) -> dict:
    """The format fields of a task config; ``!function`` values reduced to their function's name."""
    out = {}
    for key in FORMAT_FIELDS:
        value = cfg.get(key)
        if isinstance(value, str) and "/" in value:  # an unresolved !function: ".../<module>.<function>"
            value = "function " + value.rsplit(".", 1)[-1]
        out[key] = value
    return out


def function_of(value):
    """The function an unresolved ``!function`` value ("<folder of the YAML>/<module>.<function>")
    names, imported as lm-eval does: the module file beside the YAML, else an importable module."""
    if not (isinstance(value, str) and os.path.isabs(value)):
        return None
    folder, spec = os.path.split(value)
    module_name, name = spec.rsplit(".", 1)
    module_file = Path(folder, *module_name.split(".")).with_suffix(".py")
    if module_file.is_file():
        loader = importlib.util.spec_from_file_location(f"task_functions_{module_name}_{len(folder)}", module_file)
        module = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    return getattr(module, name)


def function_sources(cfg: dict) -> dict:
    """Source code of every ``!function`` field."""
    import inspect

    return {key: inspect.getsource(f) for key, value in cfg.items() if (f := function_of(value)) is not None}


TINY = sorted(p for p in TASK_DATA.glob("tiny_*.yaml"))


def tiny_config(path: Path) -> dict:
    return task_config(local_tasks(), path.stem)


def test_there_is_a_local_task_in_each_of_the_15_formats():
    formats = {tiny_config(p)["metadata"]["format_of"] for p in TINY}
    assert formats == set(DEFAULT_TASKS)


@pytest.mark.parametrize("path", TINY, ids=lambda p: p.stem)
def test_local_task_has_the_format_of_its_builtin(path):
    cfg = tiny_config(path)
    target = cfg["metadata"]["format_of"]
    reference = task_config(local_tasks(), "record") if target == "record" else builtin_config(target)
    assert fields(cfg) == fields(reference)
    if target != "record":  # the built-in record cannot even be imported (see test below)
        assert function_sources(cfg) == function_sources(reference)
    # Data: local JSON rows with every field the prompt reads.
    assert cfg["dataset_path"] == "json"
    files = cfg["dataset_kwargs"]["data_files"]["validation"]
    rows = [json.loads(line) for line in (REPO / files).read_text().splitlines()]
    assert len(rows) >= 4


def test_record_override_replaces_the_broken_builtin():
    ours = BUNDLED_TASKS / "record" / "record.yaml"
    mine, builtin = task_config(local_tasks(), "record"), builtin_config("record")
    assert fields(mine) == fields(builtin)
    for key in ("task", "dataset_path", "dataset_name", "validation_split"):
        assert mine[key] == builtin[key]
    manager = task_manager(["record"])
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
    spec = importlib.util.spec_from_file_location("fms_dyt_record_utils", BUNDLED_TASKS / "record" / "utils.py")
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
    for task in DEFAULT_TASKS:
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
    rows = metric_rows(lm_eval_results(), DEFAULT_TASKS)
    assert len(rows) == 21  # as many rows as OpenLLaMA's table
    avg = averages(rows, DEFAULT_TASKS)
    primary = avg["primary_mean"]
    assert primary["metrics"] == {
        **{t: "acc" for t in DEFAULT_TASKS},
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
    assert metric_rows(results, ["x"]) == [
        {"task": "x", "metric": "acc", "value": 0.25, "stderr": 0.1},
        {"task": "x", "metric": "acc_norm", "value": 0.5, "stderr": None},
    ]


def test_table_marks_primary_metrics_and_prints_both_definitions():
    results = lm_eval_results()
    rows = metric_rows(results, DEFAULT_TASKS)
    report = {
        "rows": rows,
        "tasks": {t: {"version": 1.0, "n_samples": 100} for t in DEFAULT_TASKS},
        "averages": averages(rows, DEFAULT_TASKS),
    }
    table = format_table(report)
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
    args = parse_args(["ckpt", "--tasks", "arc_easy,piqa", "boolq", "--limit", "10"])
    assert args.tasks == ["arc_easy", "piqa", "boolq"] and args.limit == 10
    assert parse_args(["ckpt", "--limit", "0.5"]).limit == 0.5
    assert parse_args(["ckpt"]).tasks == DEFAULT_TASKS
    with pytest.raises(SystemExit):
        parse_args(["ckpt", "--batch-size", "big"])


def test_default_tasks_are_found_without_indexing_all_of_lm_eval():
    manager = task_manager(DEFAULT_TASKS)
    check_task_names(manager, DEFAULT_TASKS)
    assert len(manager.all_tasks) < 500  # only the few folders of the 15 tasks (lm-eval has ~15k)
    source = task_source(manager, "arc_easy")
    assert describe(source) == "allenai/ai2_arc (ARC-Easy)" and not is_local(source)


def test_unknown_task_names_are_reported_with_suggestions():
    manager = task_manager(["arc_easy"], [TASK_DATA])
    with pytest.raises(EvalError, match=r"arc_esy \(did you mean arc_easy"):
        check_task_names(manager, ["arc_esy"])
    with pytest.raises(EvalError, match="is not a directory"):
        task_manager(["arc_easy"], [TASK_DATA / "nope"])


def test_a_second_lookup_indexes_only_the_folders_of_its_tasks(monkeypatch):
    import lm_eval.tasks

    task_manager(DEFAULT_TASKS)  # the first lookup of an lm-eval installation may index all its tasks
    made, real = [], lm_eval.tasks.TaskManager
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", lambda **kwargs: made.append(kwargs) or real(**kwargs))
    manager = task_manager(DEFAULT_TASKS)
    assert [kwargs["include_defaults"] for kwargs in made] == [False]
    assert {Path(p).name for p in made[0]["include_path"]} >= {"arc", "anli", "tasks"}  # eval/tasks: record
    assert manager.task_index["arc_easy"].yaml_path.name == "arc_easy.yaml"


# ---- the hub probe ---------------------------------------------------------------------------------
class FakeServer:
    """A local TCP server that records the first line of each request and answers ``reply``."""

    def __init__(self, reply: bytes):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port, self.reply, self.requests = self.sock.getsockname()[1], reply, []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data and (chunk := conn.recv(4096)):
                    data += chunk
                self.requests.append(data.split(b"\r\n", 1)[0].decode())
                conn.sendall(self.reply)

    def close(self):
        self.sock.close()


@pytest.fixture()
def hub_env(monkeypatch):
    """Online settings and no proxies but those a test sets."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    for name in list(os.environ):
        if name.lower() in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_the_hub_probe_reaches_the_endpoints_port_through_the_https_proxy(hub_env):
    proxy = FakeServer(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
    hub_env.setenv("HF_ENDPOINT", "https://hub.example:8443")
    hub_env.setenv("https_proxy", f"http://127.0.0.1:{proxy.port}")
    try:
        assert offline_if_hub_unreachable(timeout=5)  # the proxy cannot open the tunnel: offline
    finally:
        proxy.close()
    assert proxy.requests == ["CONNECT hub.example:8443 HTTP/1.0"]
    assert os.environ["HF_HUB_OFFLINE"] == os.environ["HF_DATASETS_OFFLINE"] == "1"


def test_a_gateway_error_of_the_http_proxy_means_offline(hub_env):
    proxy = FakeServer(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
    hub_env.setenv("HF_ENDPOINT", "http://hub.example:8080")
    hub_env.setenv("http_proxy", f"http://127.0.0.1:{proxy.port}")
    try:
        assert offline_if_hub_unreachable(timeout=5)
    finally:
        proxy.close()
    assert proxy.requests == ["HEAD http://hub.example:8080 HTTP/1.1"]


def test_online_mode_is_kept_when_the_hub_answers_on_its_port(hub_env):
    hub = FakeServer(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    hub_env.setenv("HF_ENDPOINT", f"http://127.0.0.1:{hub.port}")
    hub_env.setenv("http_proxy", "http://127.0.0.1:9")  # bypassed: no_proxy names the hub
    hub_env.setenv("no_proxy", "127.0.0.1")
    try:
        assert not offline_if_hub_unreachable(timeout=5)
    finally:
        hub.close()
    assert hub.requests == ["HEAD / HTTP/1.1"]
    assert os.environ["HF_DATASETS_OFFLINE"] == "0"


def test_offline_mode_is_switched_on_when_nothing_listens_on_the_endpoints_port(hub_env):
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    hub_env.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    assert offline_if_hub_unreachable(timeout=5)
    assert os.environ["HF_HUB_OFFLINE"] == os.environ["HF_DATASETS_OFFLINE"] == "1"


def test_an_unreadable_task_folders_file_is_rebuilt(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("FMS_DYT_CACHE", str(tmp_path))
    path = builtin_folders_file()
    path.parent.mkdir(parents=True)
    path.write_text('{"arc_easy": "/tmp/a-folder-cut-')  # a write cut short
    manager = task_manager(["arc_easy"])
    assert "ignoring" in caplog.text and str(path) in caplog.text
    assert manager.task_index["arc_easy"].yaml_path.name == "arc_easy.yaml" and len(manager.all_tasks) < 500
    folders = json.loads(path.read_text())
    assert Path(folders["arc_easy"]) == manager.task_index["arc_easy"].yaml_path.resolve().parent
    assert "record" not in folders  # eval/tasks' record is ours, not a built-in folder to remember


# ---- the report ------------------------------------------------------------------------------------
def small_report() -> dict:
    rows = metric_rows(lm_eval_results(), DEFAULT_TASKS)
    return {"checkpoint": {"kind": "training", "run_dir": "/runs/x", "step": 5}, "evaluation": {"limit": None},
            "tasks": {t: {"version": 1.0} for t in DEFAULT_TASKS}, "rows": rows,
            "averages": averages(rows, DEFAULT_TASKS)}


def test_read_report_returns_what_was_written(tmp_path):
    write_json(small_report(), tmp_path / "r.json")
    report = read_report(tmp_path / "r.json")
    assert report == small_report()
    assert primary_scores(report)["arc_easy"] == ("acc_norm", 0.6) and primary_scores(report)["record"] == ("em", 0.3)


@pytest.mark.parametrize("change, error, where", [
    (lambda r: r.pop("averages"), KeyError, "has no key 'averages'"),
    (lambda r: r["rows"][1].update(value="0.5"), TypeError, "rows[1].value is '0.5', not a number"),
    (lambda r: r["checkpoint"].update(step="5"), TypeError, "checkpoint.step is '5', not an integer"),
    (lambda r: r["rows"].pop(1), KeyError, "names anli_r2 acc, which no row holds"),
    (lambda r: r["tasks"].update(piqa=[]), TypeError, "tasks['piqa'] is a list, not an object"),
], ids=["missing", "number", "integer", "primary-without-row", "object"])
def test_read_report_names_the_file_and_what_is_wrong(tmp_path, change, error, where):
    report = small_report()
    change(report)
    write_json(report, tmp_path / "r.json")
    with pytest.raises(error) as caught:
        read_report(tmp_path / "r.json")
    assert str(tmp_path / "r.json") in str(caught.value) and where in str(caught.value)


def test_read_report_of_a_file_that_is_not_json(tmp_path):
    (tmp_path / "r.json").write_text('{"checkpoint": ')
    with pytest.raises(ValueError, match="r.json is not JSON"):
        read_report(tmp_path / "r.json")
