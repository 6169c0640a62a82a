"""Which lm-eval tasks, where their definitions and data come from, and loading them.

Task definitions are lm-eval's own, found through its public ``TaskManager``: the built-in ones,
fms-dyt's ``eval/tasks/`` (always included: its ``record`` replaces the built-in one) and any
``--include-path`` folders (a task named like a built-in one replaces it). ``tests/data/eval_tasks/``
holds small offline tasks in the format of each of the paper's 15.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
from pathlib import Path
from typing import Callable, Iterable, Optional

from fms_dyt.eval import EvalError
from fms_dyt.eval.hub import is_offline, prefetch_command

log = logging.getLogger("fms_dyt.eval")

REPO_ROOT = Path(__file__).resolve().parents[2]
BUNDLED_TASKS = REPO_ROOT / "eval" / "tasks"  # always on the include path (record)
TINY_TASKS = REPO_ROOT / "tests" / "data" / "eval_tasks"  # offline tasks; data paths relative to REPO_ROOT

DEFAULT_TASKS = [
    "anli_r1", "anli_r2", "anli_r3", "arc_challenge", "arc_easy", "boolq", "hellaswag",
    "openbookqa", "piqa", "record", "rte", "truthfulqa_mc1", "truthfulqa_mc2", "wic", "winogrande",
]
# datasets' packaged builders: a task with one of these as dataset_path reads local files.
LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas", "imagefolder", "audiofolder"}


# ---- finding task definitions ---------------------------------------------------------------------
def task_manager(tasks: list[str], include_paths: Iterable[Path] = ()):
    """A ``TaskManager`` that knows ``tasks``: eval/tasks and ``include_paths`` override built-ins.

    Indexing all of lm-eval's ~15k task files takes 15 s or more, so the folder of each built-in
    task is remembered from the first full index (per lm-eval installation, in fms-dyt's cache)
    and later runs index only the folders of the tasks they ask for.
    """
    from lm_eval.tasks import TaskManager

    include_paths = [Path(p) for p in include_paths]
    for p in include_paths:
        if not p.is_dir():
            raise EvalError(f"--include-path {p} is not a directory (give a folder of lm-eval task YAMLs)")
    ours = [BUNDLED_TASKS, *include_paths]
    resolved = [p.resolve() for p in ours]
    known = _builtin_folders()
    quick = _indexing_only(tasks, ours, known)
    if quick is not None:
        return quick
    log.info("indexing all of lm-eval's tasks (%s: not a built-in task indexed before, nor in %s)",
             ", ".join(t for t in tasks if t not in known), ", ".join(map(str, ours)))
    full = TaskManager(include_path=[str(p) for p in ours])
    folders = {name: str(entry.yaml_path.resolve().parent) for name, entry in full.task_index.items()
               if _is_plain_task(entry) and not any(entry.yaml_path.resolve().is_relative_to(p) for p in resolved)}
    _save_builtin_folders(folders)
    return _indexing_only(tasks, ours, folders) or full


def _indexing_only(tasks: list[str], ours: list[Path], folders: dict[str, str]):
    """A ``TaskManager`` over the built-in folders of ``tasks`` and ``ours``; None unless every
    task is a plain task there (a group or tag may draw on folders this index does not hold)."""
    from lm_eval.tasks import TaskManager

    wanted = sorted({folders[t] for t in tasks if t in folders})
    manager = TaskManager(include_path=wanted + [str(p) for p in ours], include_defaults=False)
    if all(t in manager.task_index and _is_plain_task(manager.task_index[t]) for t in tasks):
        return manager
    return None


def _is_plain_task(entry) -> bool:
    """A task defined by one YAML file (not a group, not a tag)."""
    cfg = entry.cfg or {}
    return entry.yaml_path is not None and isinstance(cfg.get("task"), str) and "group" not in cfg


def builtin_folders_file() -> Path:
    """Where the folders of lm-eval's built-in tasks are remembered, for this lm-eval installation."""
    import hashlib
    from importlib.metadata import version

    import lm_eval

    from fms_dyt.data.tokenizer import cache_root

    where = hashlib.sha1(str(Path(lm_eval.__file__).resolve()).encode()).hexdigest()[:12]
    return cache_root() / "eval" / f"lm_eval-{version('lm_eval')}-{where}-task-folders.json"


def _builtin_folders() -> dict[str, str]:
    path = builtin_folders_file()
    if not path.is_file():
        return {}
    try:
        folders = json.loads(path.read_text())
    except ValueError as e:
        log.warning("ignoring %s (%s); it is rebuilt from a full task index", path, e)
        return {}
    return {name: folder for name, folder in folders.items() if Path(folder).is_dir()}


def _save_builtin_folders(folders: dict[str, str]) -> None:
    path = builtin_folders_file()
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # ranks of a torchrun may write at once
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(folders, sort_keys=True))
        os.replace(tmp, path)
    except OSError as e:  # a read-only cache costs time, not results
        log.warning("cannot write %s (%s): every run will index all of lm-eval's tasks; set FMS_DYT_CACHE "
                    "to a writable folder", path, e)


def check_task_names(manager, tasks: list[str]) -> None:
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        hints = []
        for t in unknown:
            close = difflib.get_close_matches(t, manager.all_tasks, n=3)
            hints.append(f"  {t}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise EvalError(
            "unknown lm-eval task(s):\n" + "\n".join(hints)
            + "\nList tasks with `lm_eval ls tasks`; add your own YAMLs with --include-path DIR."
        )


# ---- where the data come from ---------------------------------------------------------------------
def task_config(manager, name: str) -> dict:
    """A task's configuration as its YAML files spell it (includes merged, ``!function`` unresolved)."""
    entry = manager.task_index.get(name)
    return dict(entry.cfg or {}) if entry is not None else {}


def task_source(manager, name: str) -> dict:
    """Where a task's data come from: ``dataset_path``, ``dataset_name`` and local ``data_files``."""
    cfg = task_config(manager, name)
    return {"path": cfg.get("dataset_path", "?"), "name": cfg.get("dataset_name"),
            "data_files": (cfg.get("dataset_kwargs") or {}).get("data_files")}


def describe(source: dict) -> str:
    return (source["path"] + (f" ({source['name']})" if source["name"] else "")
            + (f" files {source['data_files']}" if source["data_files"] else ""))


def is_local(source: dict) -> bool:
    """True for data read from local files (a datasets builder such as json, or a local folder)."""
    return source["path"] in LOCAL_BUILDERS or Path(source["path"]).exists()


# ---- loading ----------------------------------------------------------------------------------------
def load_tasks(manager, tasks: list[str], include_paths: Iterable[Path] = (), progress: Callable = print,
               ckpt: Optional[Path] = None) -> dict:
    """Build each task (this loads its data); all missing data is reported at once.

    ``ckpt``: the checkpoint being evaluated, named in the offline alternative the error offers.
    """
    loaded, missing = {}, []
    for i, name in enumerate(tasks, 1):
        source = task_source(manager, name)
        progress(f"[{i}/{len(tasks)}] {name}: {describe(source)}")
        try:
            loaded.update(manager.load([name])["tasks"])
        except (OSError, ValueError) as e:
            # Missing data are OSErrors (no such local file; offline and not cached), except that
            # datasets raises a ValueError offline when its cache lacks the configuration asked for.
            if isinstance(e, ValueError) and not (is_offline() and not is_local(source)):
                raise
            first_line = str(e).splitlines()[0] if str(e) else ""
            missing.append((name, source, f"{type(e).__name__}: {first_line}"))
    if missing:
        raise EvalError(missing_data_message(missing, list(include_paths), ckpt))
    return loaded


def missing_data_message(missing: list[tuple[str, dict, str]], include_paths: list[Path],
                         ckpt: Optional[Path]) -> str:
    """What could not be loaded, and the ways on: prefetch, or the bundled offline tasks."""
    msg = (f"the data of {len(missing)} task(s) could not be loaded"
           + (" (offline: HF_DATASETS_OFFLINE=1)" if is_offline() else "") + ":\n"
           + "\n".join(f"  {name}: {describe(source)}\n      {why}" for name, source, why in missing))
    hub = [name for name, source, _ in missing if not is_local(source)]
    if hub:
        msg += ("\nFetch the Hugging Face datasets on a machine with network access, then copy its "
                "Hugging Face cache (~/.cache/huggingface, or $HF_HOME) here:\n  "
                + prefetch_command(hub, include_paths))
        if ckpt is not None and TINY_TASKS.is_dir():
            msg += "\n" + tiny_tasks_hint(hub, ckpt)
    if len(hub) < len(missing):
        msg += "\nLocal data files are read relative to the current directory: check the paths above."
    return msg


def tiny_tasks_hint(tasks: list[str], ckpt: Path) -> str:
    """The command that evaluates ``ckpt`` offline on the bundled tiny tasks of the same formats."""
    from lm_eval.tasks import TaskManager

    index = TaskManager(include_path=str(TINY_TASKS), include_defaults=False).task_index
    tiny_of = {(e.cfg or {}).get("metadata", {}).get("format_of"): name for name, e in sorted(index.items())}
    tiny = [tiny_of[t] for t in tasks if t in tiny_of] or sorted(index)
    here = Path.cwd().resolve() == REPO_ROOT
    target = ckpt if here or ckpt.is_absolute() else ckpt.resolve()
    folder = TINY_TASKS.relative_to(REPO_ROOT)
    command = f"python eval/zero_shot.py {target} --include-path {folder} --tasks {' '.join(tiny)}"
    return ("Or, to try the evaluation without any download, use the tiny tasks bundled in "
            f"{folder}/ (a few hand-written rows in the same formats; scores mean nothing), "
            + ("here" if here else f"from the repository root ({REPO_ROOT})") + ":\n  " + command)
