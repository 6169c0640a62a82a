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
import logging
from pathlib import Path

from fms_dyt.errors import refuse
from fms_dyt.eval import EvalError
from fms_dyt.eval.hub import offline_if_hub_unreachable
from fms_dyt.eval.report import default_output, format_table, write_json
from fms_dyt.eval.run import run, setup_logging
from fms_dyt.eval.tasks import DEFAULT_TASKS

log = logging.getLogger("fms_dyt.eval")


# ``--tasks`` and ``--include-path``, shared by zero_shot.py and prefetch.py.
def add_tasks_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", nargs="+", default=DEFAULT_TASKS, metavar="TASK",
                   help="lm-eval task names, space or comma separated (default: the paper's 15)")


def add_include_path_argument(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--include-path", action="append", type=Path, default=[], metavar="DIR", help=help)


def split_tasks(tasks: list[str]) -> list[str]:
    """``--tasks a,b c`` -> [a, b, c]."""
    return [t for item in tasks for t in item.split(",") if t]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python eval/zero_shot.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("ckpt", type=Path, help="run dir, checkpoints/step_<N> dir, or fms_dyt.export output")
    add_tasks_argument(p)
    p.add_argument("--limit", type=float, default=None,
                   help="first N documents per task (a fraction < 1: that share of each task); for quick checks")
    p.add_argument("--batch-size", default=None,
                   help="an integer or `auto` (largest that fits, found by lm-eval); default auto on GPU, 8 on CPU")
    p.add_argument("--max-batch-size", type=int, default=64, help="upper bound for --batch-size auto")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="weights and compute dtype; auto: bfloat16 on GPUs that support it, else float32")
    p.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda, cuda:N")
    add_include_path_argument(
        p, "folder of extra lm-eval task YAMLs (repeatable); a task named like a built-in one replaces it")
    p.add_argument("--output", type=Path, default=None,
                   help="JSON file (default: <run_dir>/eval/zero_shot_step_<N>.json for training checkpoints, "
                        "./zero_shot_<name>.json for exported directories)")
    p.add_argument("--wandb", nargs="?", const="auto", choices=("auto", "online", "offline"), default=None,
                   help="log to W&B: into the training run when CKPT is a training checkpoint, else a new run "
                        "(auto: online when WANDB_API_KEY is set, else offline)")
    p.add_argument("--wandb-project", default=None, help="W&B project (default: the training config's, else fms-dyt)")
    args = p.parse_args(argv)
    args.tasks = split_tasks(args.tasks)
    if args.limit is not None:
        if args.limit <= 0:
            p.error(f"--limit={args.limit:g} must be positive")
        args.limit = int(args.limit) if args.limit >= 1 else args.limit
    if args.batch_size is not None and args.batch_size != "auto" and not str(args.batch_size).isdigit():
        p.error(f"--batch-size={args.batch_size!r} must be a positive integer or `auto`")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
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
            from fms_dyt.eval.wandb_log import log_wandb

            log.info("W&B run: %s", log_wandb(report, args.wandb, args.wandb_project))
    except EvalError as e:
        return refuse("zero_shot.py", e)
    return 0
