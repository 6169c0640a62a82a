"""``python eval/zero_shot.py CKPT``: the paper's 15 zero-shot lm-eval tasks on an fms-dyt model.

CKPT is a training run directory (its newest complete checkpoint), one ``checkpoints/step_<N>``
directory (loaded in one process whatever world size wrote it) or a directory written by
``python -m fms_dyt.export``. Every score comes from lm-eval itself: its ``HFLM`` wraps our
Hugging Face model (``fms_dyt.hf.FmsDytForCausalLM``) and ``simple_evaluate`` runs its task
definitions, so numbers match the stock ``lm_eval`` command on an exported directory. BOS is
prepended to every request, as in training.

Prints one table row per task and metric, then two averages, each with its definition:

- primary mean: one metric per task (acc_norm where the task defines it, else acc; em for
  record), so 15 numbers for the default tasks;
- OpenLLaMA mean: every metric row of the table (acc and acc_norm both counted, record's em and
  f1 both counted), 21 rows for the default tasks, as OpenLLaMA's "Average".

and writes all of it to a JSON file (with lm-eval and task versions, checkpoint step, tokens seen
and the model config). Data come from the Hugging Face datasets cache; fetch them beforehand with
``python eval/prefetch.py`` on a machine with network access. Under ``torchrun`` or ``accelerate
launch`` the requests are split across processes (data parallel).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import difflib
import json
import logging
import math
import os
import socket
import sys
import time
import warnings
from pathlib import Path
from urllib.parse import urlparse

FMS_DYT_TASKS = Path(__file__).resolve().parent / "tasks"  # always on the include path (record)

DEFAULT_TASKS = [
    "anli_r1", "anli_r2", "anli_r3", "arc_challenge", "arc_easy", "boolq", "hellaswag",
    "openbookqa", "piqa", "record", "rte", "truthfulqa_mc1", "truthfulqa_mc2", "wic", "winogrande",
]
# Where lm-eval 0.4.13 keeps the default tasks, under lm_eval/tasks/. Indexing only these folders
# takes milliseconds; indexing all of lm-eval's ~15k task files takes 15 s or more, so that only
# happens when a requested task is found nowhere else.
BUILTIN_TASK_DIRS = {
    "anli_r1": "anli", "anli_r2": "anli", "anli_r3": "anli", "arc_challenge": "arc",
    "arc_easy": "arc", "boolq": "super_glue", "hellaswag": "hellaswag", "openbookqa": "openbookqa",
    "piqa": "piqa", "record": "super_glue", "rte": "glue", "truthfulqa_mc1": "truthfulqa",
    "truthfulqa_mc2": "truthfulqa", "wic": "super_glue", "winogrande": "winogrande",
}
# The primary metric of a task is the first of these it reports.
PRIMARY_ORDER = ("acc_norm", "acc", "em", "f1")
# datasets' packaged builders: a task with one of these as dataset_path reads local files.
LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas", "imagefolder", "audiofolder"}
EXIT_USAGE = 2

log = logging.getLogger("fms_dyt.eval")


class EvalError(Exception):
    """A problem the user can fix; its message says what and how. Printed without a traceback."""


# ---- command line ---------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python eval/zero_shot.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("ckpt", type=Path, help="run dir, checkpoints/step_<N> dir, or fms_dyt.export output")
    p.add_argument("--tasks", nargs="+", default=DEFAULT_TASKS, metavar="TASK",
                   help="lm-eval task names, space or comma separated (default: the paper's 15)")
    p.add_argument("--limit", type=float, default=None,
                   help="first N documents per task (a fraction < 1: that share of each task); for quick checks")
    p.add_argument("--batch-size", default=None,
                   help="an integer or `auto` (largest that fits, found by lm-eval); default auto on GPU, 8 on CPU")
    p.add_argument("--max-batch-size", type=int, default=64, help="upper bound for --batch-size auto")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="weights and compute dtype; auto: bfloat16 on GPUs that support it, else float32")
    p.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--include-path", action="append", type=Path, default=[], metavar="DIR",
                   help="folder of extra lm-eval task YAMLs (repeatable); a task named like a built-in one replaces it")
    p.add_argument("--output", type=Path, default=None,
                   help="JSON file (default: <run_dir>/eval/zero_shot_step_<N>.json for training checkpoints, "
                        "./zero_shot_<name>.json for exported directories)")
    p.add_argument("--wandb", nargs="?", const="auto", choices=("auto", "online", "offline"), default=None,
                   help="log to W&B: into the training run when CKPT is a training checkpoint, else a new run "
                        "(auto: online when WANDB_API_KEY is set, else offline)")
    p.add_argument("--wandb-project", default=None, help="W&B project (default: the training config's, else fms-dyt)")
    args = p.parse_args(argv)
    args.tasks = [t for item in args.tasks for t in item.split(",") if t]
    if args.limit is not None:
        if args.limit <= 0:
            p.error(f"--limit={args.limit:g} must be positive")
        args.limit = int(args.limit) if args.limit >= 1 else args.limit
    if args.batch_size is not None and args.batch_size != "auto" and not str(args.batch_size).isdigit():
        p.error(f"--batch-size={args.batch_size!r} must be a positive integer or `auto`")
    return args


# ---- offline behaviour ----------------------------------------------------------------------------
def offline_if_hub_unreachable(timeout: float = 3.0) -> bool:
    """Switch Hugging Face libraries to offline mode when the hub cannot be reached.

    Without this, ``datasets`` retries an unreachable hub for ~25 s per dataset before failing.
    Must run before ``datasets``/``huggingface_hub`` are imported (they read the variables then).
    Returns True when offline mode is on (set here or by the user).
    """
    if any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
        return True
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return False
    except OSError as e:
        log.warning("%s is unreachable (%s): using the local Hugging Face cache only", host, e)
        os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
        return True


def prefetch_command(tasks: list[str], include_paths: list[Path] = ()) -> str:
    extra = "".join(f" --include-path {p}" for p in include_paths)
    return f"python eval/prefetch.py --tasks {' '.join(tasks)}{extra}"


# ---- tasks ----------------------------------------------------------------------------------------
def _builtin_root() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def task_manager(tasks: list[str], include_paths: list[Path] = ()):
    """A ``TaskManager`` that knows ``tasks``: eval/tasks and ``include_paths`` override built-ins."""
    from lm_eval.tasks import TaskManager

    for p in include_paths:
        if not Path(p).is_dir():
            raise EvalError(f"--include-path {p} is not a directory (give a folder of lm-eval task YAMLs)")
    ours = [FMS_DYT_TASKS, *map(Path, include_paths)]
    dirs = sorted({BUILTIN_TASK_DIRS[t] for t in tasks if t in BUILTIN_TASK_DIRS})
    root = _builtin_root()
    quick = TaskManager(include_path=[str(root / d) for d in dirs] + [str(p) for p in ours], include_defaults=False)
    if all(t in quick.all_tasks for t in tasks):
        return quick
    log.info("indexing all of lm-eval's tasks (a %s is not one of the usual 15)", [t for t in tasks if t not in quick.all_tasks])
    return TaskManager(include_path=[str(p) for p in ours])


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


def task_source(manager, name: str) -> dict:
    """Where a task's data come from: ``dataset_path``, ``dataset_name`` and local ``data_files``."""
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = manager.task_index.get(name)
    cfg = load_yaml(entry.yaml_path, resolve_func=False) if entry is not None and entry.yaml_path else {}
    return {"path": cfg.get("dataset_path", "?"), "name": cfg.get("dataset_name"),
            "data_files": (cfg.get("dataset_kwargs") or {}).get("data_files")}


def describe(source: dict) -> str:
    return (source["path"] + (f" ({source['name']})" if source["name"] else "")
            + (f" files {source['data_files']}" if source["data_files"] else ""))


def is_local(source: dict) -> bool:
    """True for data read from local files (a datasets builder such as json, or a local folder)."""
    return source["path"] in LOCAL_BUILDERS or Path(source["path"]).exists()


def load_tasks(manager, tasks: list[str], include_paths: list[Path] = (), progress=print) -> dict:
    """Build each task (this loads its data); all missing data is reported at once."""
    loaded, missing = {}, []
    for i, name in enumerate(tasks, 1):
        source = task_source(manager, name)
        progress(f"[{i}/{len(tasks)}] {name}: {describe(source)}")
        try:
            loaded.update(manager.load([name])["tasks"])
        except (OSError, ValueError) as e:
            # Offline and not cached, or no such file: OSError subclasses. datasets raises a
            # ValueError when the cache holds the dataset but not this configuration.
            if isinstance(e, ValueError) and "Couldn't find cache" not in str(e):
                raise
            first_line = str(e).splitlines()[0] if str(e) else ""
            missing.append((name, source, f"{type(e).__name__}: {first_line}"))
    if missing:
        offline = os.environ.get("HF_DATASETS_OFFLINE") == "1"
        msg = (f"the data of {len(missing)} task(s) could not be loaded"
               + (" (offline: HF_DATASETS_OFFLINE=1)" if offline else "") + ":\n"
               + "\n".join(f"  {name}: {describe(source)}\n      {why}" for name, source, why in missing))
        hub = [name for name, source, _ in missing if not is_local(source)]
        if hub:
            msg += ("\nFetch the Hugging Face datasets on a machine with network access, then copy its "
                    "Hugging Face cache (~/.cache/huggingface, or $HF_HOME) here:\n  "
                    + prefetch_command(hub, include_paths))
        if len(hub) < len(missing):
            msg += "\nLocal data files are read relative to the current directory: check the paths above."
        raise EvalError(msg)
    return loaded


# ---- model ----------------------------------------------------------------------------------------
def pick_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"--device {name}: CUDA is not available here (use --device cpu)")
    return device


def pick_dtype(name: str, device):
    import torch

    if name == "auto":
        use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if use_bf16 else torch.float32
    return getattr(torch, name)


def load_model(ckpt: Path):
    """(model, tokenizer, info) for a run dir, a step dir or an exported directory."""
    from fms_dyt.inference import load_for_inference

    try:
        model, cfg, meta = load_for_inference(ckpt)
    except (FileNotFoundError, ValueError) as e:
        raise EvalError(f"cannot load CKPT {ckpt}: {e}") from None
    exported = (ckpt / "config.json").is_file()
    if exported:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(ckpt)
        except (OSError, ValueError) as e:
            raise EvalError(
                f"{ckpt} has no usable tokenizer ({e}); export it again from a training checkpoint, "
                "which writes the tokenizer beside the weights"
            ) from None
        run_dir = None
    else:
        from fms_dyt.data import load_tokenizer

        tokenizer = load_tokenizer(cfg.tokenizer)
        if not (ckpt / "meta.json").is_file():
            run_dir = ckpt
        else:  # a step directory: its run, unless it was copied out of one
            run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None
    info = {
        "path": str(ckpt.resolve()),
        "kind": "exported" if exported else "training",
        "run_dir": str(run_dir.resolve()) if run_dir is not None else None,
        "step": meta.get("step"),
        "tokens_seen": meta.get("tokens_seen"),
        "training_config": _plain(cfg),
    }
    return model, tokenizer, info


def _plain(cfg):
    if cfg is None:
        return None
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)


def prepare_tokenizer(tokenizer, bos_id: int, eos_id: int | None):
    """Make ``add_special_tokens=True`` prepend BOS (and nothing else), as training did."""
    probe = "fms-dyt"
    ids = tokenizer(probe, add_special_tokens=True)["input_ids"]
    if ids[:1] != [bos_id] and hasattr(tokenizer, "add_bos_token"):
        tokenizer.add_bos_token = True
        ids = tokenizer(probe, add_special_tokens=True)["input_ids"]
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    if ids != [bos_id, *plain]:
        raise EvalError(
            f"the tokenizer encodes {probe!r} with special tokens as {ids}, not BOS ({bos_id}) + {plain}: "
            f"evaluation would not see text as training did (BOS first, no EOS); fix the tokenizer's "
            f"add_bos_token/add_eos_token settings"
        )
    if eos_id is not None and tokenizer.eos_token_id not in (None, eos_id):
        raise EvalError(f"tokenizer EOS id {tokenizer.eos_token_id} differs from the model's {eos_id}")
    return tokenizer


def make_lm(model, tokenizer, batch_size, max_batch_size: int, accelerator=None):
    """lm-eval's ``HFLM`` around our model; with an ``accelerate`` accelerator, data parallel."""
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size,
              max_batch_size=max_batch_size, add_bos_token=True)
    if accelerator is not None and accelerator.num_processes > 1:
        # HFLM sets up data parallelism only for models it loads itself; these are the same three
        # attributes it sets in that case (the evaluator splits requests by rank and gathers).
        lm.accelerator = accelerator
        lm._rank = accelerator.process_index
        lm._world_size = accelerator.num_processes
    return lm


# ---- results --------------------------------------------------------------------------------------
def metric_rows(results: dict, tasks: list[str]) -> list[dict]:
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


def primary_metric(rows: list[dict], task: str) -> str:
    names = [r["metric"] for r in rows if r["task"] == task]
    for want in PRIMARY_ORDER:
        if want in names:
            return want
    if not names:
        raise EvalError(f"lm-eval reported no metric for task {task}")
    return names[0]


def averages(rows: list[dict], tasks: list[str]) -> dict:
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


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def format_table(report: dict) -> str:
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


def build_report(out: dict, task_names: list[str], ckpt_info: dict, model, settings: dict) -> dict:
    """Everything worth keeping about one evaluation, JSON-ready."""
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


def default_output(info: dict, limit) -> Path:
    suffix = f"_limit{limit}" if limit is not None else ""
    if info["run_dir"]:
        return Path(info["run_dir"]) / "eval" / f"zero_shot_step_{info['step']}{suffix}.json"
    return Path(f"zero_shot_{Path(info['path']).name}{suffix}.json")


def write_json(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    os.replace(tmp, path)


# ---- W&B ------------------------------------------------------------------------------------------
def log_wandb(report: dict, mode: str, project: str | None) -> str:
    """Log the scores: into the training run (its id from <run_dir>/wandb_id), else a new run.

    Returns the run's local folder. Scores are logged against ``eval/step`` (the training step) so
    they plot next to the training curves without disturbing W&B's own step counter. Run it after
    training has finished: W&B takes one writer per run.
    """
    import wandb

    ck = report["checkpoint"]
    train_cfg = report.get("training_config") or {}
    wandb_cfg = (train_cfg.get("logging") or {}).get("wandb") or {}
    if mode == "auto":
        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    run_dir = Path(ck["run_dir"]) if ck.get("run_dir") else None
    id_file = run_dir / "wandb_id" if run_dir is not None else None
    run_id = id_file.read_text().strip() if id_file is not None and id_file.is_file() else None
    common = dict(project=project or wandb_cfg.get("project") or "fms-dyt", entity=wandb_cfg.get("entity"), mode=mode)
    if run_id:
        run = wandb.init(id=run_id, resume="allow", dir=str(run_dir), **common)
    else:
        run = wandb.init(
            name=f"eval-{Path(ck['path']).name}", job_type="eval", dir=str(run_dir or Path.cwd()),
            config={"checkpoint": ck, "model": report["model"], "evaluation": report["evaluation"]}, **common,
        )
    run.define_metric("eval/step")
    run.define_metric("eval/*", step_metric="eval/step")
    scores = {f"eval/{r['task']}/{r['metric']}": r["value"] for r in report["rows"]}
    avg = report["averages"]
    scores["eval/avg_primary"] = avg["primary_mean"]["value"]
    scores["eval/avg_openllama"] = avg["openllama_mean"]["value"]
    scores["eval/step"] = ck.get("step") or 0
    primary = avg["primary_mean"]["metrics"]
    table = wandb.Table(
        columns=["task", "metric", "value", "stderr", "primary"],
        data=[[r["task"], r["metric"], r["value"], r["stderr"], primary[r["task"]] == r["metric"]] for r in report["rows"]],
    )
    run.log({**scores, "eval/zero_shot": table})
    # Also as summary values: W&B drops history rows that a resumed run logs below its last step
    # (an offline run synced into the training run), but never summary updates.
    run.summary.update(scores)
    where = str(Path(run.dir).parent)  # the run's folder (run.dir is its files/ subfolder)
    run.finish()
    return where


# ---- main -----------------------------------------------------------------------------------------
class _QuietBenign(logging.Filter):
    """Drop lm-eval warnings that say nothing to fms-dyt users: we pass an in-memory model on
    purpose, and the built-in boolq/rte/wic rely on the default aggregation (mean, higher is better)."""

    BENIGN = ("is not of type `str`", "already-initialized model", "is defined, but aggregation is not",
              "is defined, but higher_is_better is not")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(b in record.getMessage() for b in self.BENIGN)


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for name in ("lm_eval", "datasets", "transformers", "accelerate"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("lm_eval.tasks._index").setLevel(logging.ERROR)  # "record overrides record"
    for handler in logging.getLogger().handlers:
        handler.addFilter(_QuietBenign())


def run(args: argparse.Namespace, manager=None) -> dict | None:
    """Evaluate; returns the report (None on ranks other than 0 of a data-parallel run)."""
    started = time.time()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    accelerator = None
    if world > 1:
        import torch
        from accelerate import Accelerator

        if args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available()):
            os.environ.setdefault("ACCELERATE_USE_CPU", "1")  # else accelerate ignores torchrun on CPUs
        accelerator = Accelerator()
        if accelerator.num_processes != world:
            raise EvalError(f"WORLD_SIZE={world} but accelerate sees {accelerator.num_processes} process(es)")
    main_process = accelerator is None or accelerator.is_main_process
    say = (lambda msg: log.info(msg)) if main_process else (lambda msg: None)

    if not args.ckpt.exists():
        raise EvalError(f"CKPT {args.ckpt} does not exist (give a run dir, checkpoints/step_<N> or an exported dir)")
    # Data first: a missing dataset should fail in seconds, before a large model is read.
    manager = manager or task_manager(args.tasks, args.include_path)
    check_task_names(manager, args.tasks)
    tasks = load_tasks(manager, args.tasks, args.include_path, progress=say)
    for task in tasks.values():
        task.set_config(key="num_fewshot", value=0)  # zero-shot, whatever a YAML says
    names = list(tasks)

    import torch
    from lm_eval import simple_evaluate

    say(f"loading {args.ckpt}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one-process DCP load
        model, tokenizer, info = load_model(args.ckpt)
    device = accelerator.device if accelerator is not None else pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    model.to(device=device, dtype=dtype)
    model.model.init_buffers(device)  # RoPE tables stay fp32, as in training
    tokenizer = prepare_tokenizer(tokenizer, model.config.bos_token_id, model.config.eos_token_id)
    batch_size = args.batch_size or ("auto" if device.type == "cuda" else 8)
    what = f"step {info['step']}" if info["step"] is not None else info["kind"]
    say(f"evaluating {what} on {device} in {str(dtype).removeprefix('torch.')}, batch size {batch_size}, "
        f"{len(names)} task(s), processes: {world}")
    lm = make_lm(model, tokenizer, batch_size, args.max_batch_size, accelerator)
    with torch.no_grad():
        out = simple_evaluate(model=lm, tasks=list(tasks.values()), task_manager=manager, limit=args.limit,
                              log_samples=False)
    if out is None:
        return None
    settings = {
        "tasks": names, "num_fewshot": 0, "limit": args.limit, "batch_size": str(batch_size),
        "batch_sizes": out.get("config", {}).get("batch_sizes"), "dtype": str(dtype).removeprefix("torch."),
        "device": str(device), "processes": world, "add_bos_token": True,
        "include_paths": [str(p) for p in args.include_path],
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "duration_s": round(time.time() - started, 1),
    }
    return build_report(out, names, info, model, settings)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _setup_logging()
    offline_if_hub_unreachable()
    try:
        report = run(args)
        if report is None:
            return 0
        print(format_table(report))
        path = args.output or default_output(report["checkpoint"], args.limit)
        write_json(report, path)
        log.info("wrote %s", path)
        if args.wandb:
            log.info("W&B run: %s", log_wandb(report, args.wandb, args.wandb_project))
    except EvalError as e:
        print(f"zero_shot.py: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
