"""The paper's 15 tasks, by their real names and definitions, read offline from a Hugging Face
datasets cache: the cache is laid out as ``eval/prefetch.py`` leaves it, filled with the
hand-written rows of tests/data/eval_tasks/ instead of the downloaded data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from fms_dyt.eval.tasks import DEFAULT_TASKS, task_config, task_manager

REPO = Path(__file__).resolve().parent.parent
TASK_DATA = REPO / "tests" / "data" / "eval_tasks"


def hub_data() -> dict:
    """{(hub dataset, configuration): (splits the task reads, our rows)} from the real task configs."""
    manager = task_manager(DEFAULT_TASKS)
    tiny_tasks = task_manager([], [TASK_DATA])
    wanted = {}
    for tiny in TASK_DATA.glob("tiny_*.yaml"):
        cfg = task_config(tiny_tasks, tiny.stem)
        real = task_config(manager, cfg["metadata"]["format_of"])
        splits = {real.get(k) for k in ("training_split", "validation_split", "test_split", "fewshot_split")} - {None}
        key = (real["dataset_path"], real.get("dataset_name"))
        rows = REPO / cfg["dataset_kwargs"]["data_files"]["validation"]
        wanted.setdefault(key, (set(), rows))[0].update(splits)
    return wanted


def plant(cache: Path, repo: str, config: str | None, splits: list[str], rows: Path) -> None:
    """Write ``rows`` as splits of ``repo`` into a datasets cache, in the layout datasets reads offline:
    ``<namespace>___<name>/<config>/<version>/<hash>/`` with dataset_info.json and ``<name>-<split>.arrow``."""
    import datasets

    builder = datasets.load_dataset_builder("json", data_files={s: str(rows) for s in splits},
                                            cache_dir=str(cache / "_build"))
    builder.download_and_prepare()
    namespace, name = repo.split("/")
    config = config or "default"
    target = cache / f"{namespace}___{name}" / config / "0.0.0" / Path(builder.cache_dir).name
    target.parent.mkdir(parents=True, exist_ok=True)
    Path(builder.cache_dir).rename(target)
    info = json.loads((target / "dataset_info.json").read_text())
    info.update(config_name=config, dataset_name=name)
    (target / "dataset_info.json").write_text(json.dumps(info))
    for arrow in target.glob("json-*.arrow"):
        arrow.rename(target / arrow.name.replace("json-", f"{name}-", 1))


def test_the_15_tasks_run_offline_from_the_datasets_cache(quickstart_run, tmp_path):
    run_dir = quickstart_run.dir
    home = tmp_path / "hf"
    planted = hub_data()
    assert len(planted) == 12  # anli, arc x2, super_glue x3, hellaswag, openbookqa, piqa, glue, truthfulqa, winogrande
    for (repo, config), (splits, rows) in planted.items():
        plant(home / "datasets", repo, config, sorted(splits), rows)
    env = {**os.environ, "HF_HOME": str(home), "HF_DATASETS_CACHE": str(home / "datasets"),
           "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(REPO / "eval" / "zero_shot.py"), str(run_dir), "--output", str(tmp_path / "r.json")],
                          cwd=tmp_path, env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "r.json").read_text())
    assert list(report["tasks"]) == DEFAULT_TASKS
    assert len(report["rows"]) == 21
    assert report["averages"]["primary_mean"]["n"] == 15 and report["averages"]["openllama_mean"]["n"] == 21
    lines = [json.loads(line) for line in (TASK_DATA / "record.jsonl").read_text().splitlines()]
    assert report["tasks"]["record"]["n_samples"] == len(lines)
    assert set(report["tasks"]["record"]["metrics"]) == {"em", "f1"}
    assert report["tasks"]["anli_r2"]["split"] == "test_r2" and report["checkpoint"]["step"] == quickstart_run.steps
    for line in ("primary mean", "OpenLLaMA mean", "record", "winogrande"):
        assert line in done.stdout
