"""The results of one evaluation: metric rows, the two averages, the table and the JSON report.

The report's schema is ``Report`` below; ``build_report`` writes it and ``read_report`` reads it
back (``fms_dyt.analysis`` reads results through it).
"""

# No `from __future__ import annotations`: TypedDict sees NotRequired only in evaluated annotations.
import json
import math
import os
import typing
from pathlib import Path
from typing import Any, Optional

import typing_extensions
from typing_extensions import NotRequired, TypedDict

from fms_dyt.eval import EvalError

# The primary metric of a task is the first of these it reports.
PRIMARY_ORDER = ("acc_norm", "acc", "em", "f1")


# ---- schema -----------------------------------------------------------------------------------------
class Row(TypedDict):
    """One (task, metric) of lm-eval's results; ``metric`` carries its filter when not "none"."""

    task: str
    metric: str
    value: float
    stderr: Optional[float]


class PrimaryMean(TypedDict):
    value: float
    n: int
    metrics: dict[str, str]  # task -> its primary metric
    definition: NotRequired[str]


class OpenLlamaMean(TypedDict):
    value: float
    n: int
    definition: NotRequired[str]


class Averages(TypedDict):
    primary_mean: PrimaryMean
    openllama_mean: OpenLlamaMean


class Checkpoint(TypedDict):
    kind: str  # "training" or "exported"
    run_dir: Optional[str]
    step: Optional[int]
    path: NotRequired[str]
    tokens_seen: NotRequired[Optional[int]]


class Evaluation(TypedDict):
    """The settings of the evaluation (tasks, batch size, dtype, date, ...)."""

    limit: Optional[float]


class TaskInfo(TypedDict):
    version: Any
    dataset_path: NotRequired[Optional[str]]
    dataset_name: NotRequired[Optional[str]]
    split: NotRequired[Optional[str]]
    num_fewshot: NotRequired[Optional[int]]
    n_samples: NotRequired[Optional[int]]
    n_docs: NotRequired[Optional[int]]
    metrics: NotRequired[dict[str, dict]]  # metric -> {"value", "stderr"}


class Report(TypedDict):
    checkpoint: Checkpoint
    evaluation: Evaluation
    tasks: dict[str, TaskInfo]  # in evaluation order
    rows: list[Row]
    averages: Averages
    model: NotRequired[dict]  # model and norm config, parameter count
    training_config: NotRequired[Optional[dict]]
    versions: NotRequired[dict]  # lm_eval, transformers, torch, datasets, fms_dyt, each task's
    lm_eval_results: NotRequired[dict]  # lm-eval's own results dict per task


# read_report raises one of these for a file that is not a report; each message names file and key.
REPORT_ERRORS = (ValueError, KeyError, TypeError)


def read_report(path: Path) -> Report:
    """The report in ``path``, checked against ``Report``."""
    path = Path(path)
    try:
        report = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not JSON ({e})") from None
    try:
        _check(report, Report, "the report")
    except (KeyError, TypeError) as e:
        raise type(e)(f"{path}: {e.args[0]}") from None
    rows = {(r["task"], r["metric"]) for r in report["rows"]}
    for task, metric in report["averages"]["primary_mean"]["metrics"].items():
        if (task, metric) not in rows:
            raise KeyError(f"{path}: averages.primary_mean.metrics names {task} {metric}, which no row holds")
    return report


_SCALARS = {int: "an integer", float: "a number", str: "a string"}


def _check(value, schema, where: str) -> None:
    """Raise KeyError/TypeError (naming ``where``) unless ``value`` has the shape of ``schema``."""
    origin, args = typing.get_origin(schema), typing.get_args(schema)
    inside = "" if where == "the report" else f"{where}."
    if typing_extensions.is_typeddict(schema):
        if not isinstance(value, dict):
            raise TypeError(f"{where} is a {type(value).__name__}, not an object")
        missing = sorted(schema.__required_keys__ - value.keys())
        if missing:
            raise KeyError(f"{where} has no key {missing[0]!r}")
        for key, hint in typing_extensions.get_type_hints(schema).items():
            if key in value:
                _check(value[key], hint, f"{inside}{key}")
    elif origin in (list, dict):
        if not isinstance(value, origin):
            raise TypeError(f"{where} is a {type(value).__name__}, not a{' list' if origin is list else 'n object'}")
        for key, item in enumerate(value) if origin is list else value.items():
            _check(item, args[-1], f"{where}[{key!r}]")
    elif origin is typing.Union:  # Optional[X]
        if value is not None:
            _check(value, next(a for a in args if a is not type(None)), where)
    elif schema in _SCALARS:
        accepted = (int, float) if schema is float else schema
        if isinstance(value, bool) or not isinstance(value, accepted):
            raise TypeError(f"{where} is {value!r}, not {_SCALARS[schema]}")


# ---- rows and averages ------------------------------------------------------------------------------
def metric_rows(results: dict, tasks: list[str]) -> list[Row]:
    """One row per (task, metric) of lm-eval's ``results``, in task order."""
    rows = []
    for task in tasks:
        for key, value in results[task].items():
            if "," not in key or "_stderr," in key:
                continue
            metric, filt = key.split(",", 1)
            stderr = results[task].get(f"{metric}_stderr,{filt}")
            rows.append({
                "task": task,
                "metric": metric if filt == "none" else f"{metric} ({filt})",
                "value": value,
                "stderr": stderr if isinstance(stderr, (int, float)) else None,
            })
    return rows


def primary_metric(rows: list[Row], task: str) -> str:
    names = [r["metric"] for r in rows if r["task"] == task]
    for want in PRIMARY_ORDER:
        if want in names:
            return want
    if not names:
        raise EvalError(f"lm-eval reported no metric for task {task}")
    return names[0]


def averages(rows: list[Row], tasks: list[str]) -> Averages:
    """The two averages, each with its definition and what went into it."""
    primary = {t: primary_metric(rows, t) for t in tasks}
    picked = [r["value"] for r in rows if primary[r["task"]] == r["metric"]]
    by_metric: dict[str, list[str]] = {}
    for t, m in primary.items():
        by_metric.setdefault(m, []).append(t)
    spelled = "; ".join(f"{m} for {', '.join(ts)}" for m, ts in by_metric.items())
    return {
        "primary_mean": {
            "value": _mean(picked),
            "n": len(picked),
            "metrics": primary,
            "definition": f"unweighted mean over the {len(tasks)} tasks of one metric each "
                          f"(acc_norm where defined, else acc; em for record): {spelled}",
        },
        "openllama_mean": {
            "value": _mean([r["value"] for r in rows]),
            "n": len(rows),
            "definition": f"OpenLLaMA-style: unweighted mean of all {len(rows)} metric rows "
                          "(acc and acc_norm both counted where a task has both; record's em and f1 both counted)",
        },
    }


def primary_scores(report: Report) -> dict[str, tuple[str, float]]:
    """task -> (its primary metric, that metric's value)."""
    values = {(r["task"], r["metric"]): float(r["value"]) for r in report["rows"]}
    return {t: (m, values[(t, m)]) for t, m in report["averages"]["primary_mean"]["metrics"].items()}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


# ---- the table and the report -----------------------------------------------------------------------
def format_table(report: Report) -> str:
    rows, tasks = report["rows"], report["tasks"]
    avg = report["averages"]
    primary = avg["primary_mean"]["metrics"]
    width = max([len("task"), *(len(t) for t in tasks)])
    head = f"{'task':<{width}}  {'version':>7}  {'metric':<9} {'value':>7}   {'stderr':>7}  {'n':>6}  primary"
    lines = [head, "-" * len(head)]
    last = None
    for r in rows:
        t = tasks[r["task"]]
        se = f"± {r['stderr']:.4f}" if r["stderr"] is not None else ""
        first = r["task"] != last
        lines.append(
            f"{r['task'] if first else '':<{width}}  {str(t['version']) if first else '':>7}  "
            f"{r['metric']:<9} {r['value']:>7.4f}  {se:>8}  {str(t['n_samples']) if first else '':>6}  "
            f"{'*' if primary[r['task']] == r['metric'] else ''}"
        )
        last = r["task"]
    lines.append("")
    for label, key in (("primary mean  ", "primary_mean"), ("OpenLLaMA mean", "openllama_mean")):
        a = avg[key]
        lines.append(f"{label} = {a['value']:.4f}  ({a['n']} number{'s' if a['n'] != 1 else ''}): {a['definition']}")
    return "\n".join(lines)


def build_report(out: dict, task_names: list[str], ckpt_info: dict, model, settings: dict) -> Report:
    """Everything worth keeping about one evaluation (``out``: lm-eval's ``simple_evaluate`` result)."""
    from importlib.metadata import version

    import torch

    import fms_dyt

    rows = metric_rows(out["results"], task_names)
    tasks = {}
    for t in task_names:
        cfg = out.get("configs", {}).get(t, {})
        n = out.get("n-samples", {}).get(t, {})
        tasks[t] = {
            "version": out.get("versions", {}).get(t),
            "dataset_path": cfg.get("dataset_path"),
            "dataset_name": cfg.get("dataset_name"),
            "split": cfg.get("test_split") or cfg.get("validation_split"),
            "num_fewshot": out.get("n-shot", {}).get(t),
            "n_samples": n.get("effective"),
            "n_docs": n.get("original"),
            "metrics": {r["metric"]: {"value": r["value"], "stderr": r["stderr"]} for r in rows if r["task"] == t},
        }
    config = model.config
    return {
        "checkpoint": {k: v for k, v in ckpt_info.items() if k != "training_config"},
        "model": {
            "model": dict(config.model),
            "norm": dict(config.norm),
            "parameters": sum(p.numel() for p in model.parameters()),
        },
        "training_config": ckpt_info.get("training_config"),
        "evaluation": settings,
        "versions": {
            "lm_eval": version("lm_eval"),
            "transformers": version("transformers"),
            "torch": torch.__version__,
            "datasets": version("datasets"),
            "fms_dyt": fms_dyt.__version__,
            "tasks": {t: tasks[t]["version"] for t in task_names},
        },
        "tasks": tasks,
        "rows": rows,
        "averages": averages(rows, task_names),
        "lm_eval_results": {t: out["results"][t] for t in task_names},
    }


def default_output(checkpoint: Checkpoint, limit) -> Path:
    """``<run_dir>/eval/zero_shot_step_<N>.json`` for training checkpoints, else ``./zero_shot_<name>.json``."""
    suffix = f"_limit{limit}" if limit is not None else ""
    if checkpoint["run_dir"]:
        return Path(checkpoint["run_dir"]) / "eval" / f"zero_shot_step_{checkpoint['step']}{suffix}.json"
    return Path(f"zero_shot_{Path(checkpoint['path']).name}{suffix}.json")


def write_json(report: Report, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    os.replace(tmp, path)
