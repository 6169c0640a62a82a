"""One evaluation end to end: tasks and their data first, then the model, then lm-eval."""

from __future__ import annotations

import argparse
import datetime as _dt
import logging
import os
import sys
import time
import warnings

from fms_dyt.eval import EvalError
from fms_dyt.eval.lm import load_model, make_lm, pick_device, pick_dtype, prepare_tokenizer
from fms_dyt.eval.report import Report, build_report
from fms_dyt.eval.tasks import check_task_names, load_tasks, task_manager

log = logging.getLogger("fms_dyt.eval")


class _QuietBenign(logging.Filter):
    """Drop lm-eval warnings that say nothing to fms-dyt users: we pass an in-memory model on
    purpose; the built-in boolq/rte/wic rely on the default aggregation (mean, higher is better);
    a tag defined in several of the folders indexed (super_glue's) "overrides" itself."""

    BENIGN = ("is not of type `str`", "already-initialized model", "is defined, but aggregation is not",
              "is defined, but higher_is_better is not", "from None overrides existing task from None")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(b in record.getMessage() for b in self.BENIGN)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for name in ("lm_eval", "datasets", "transformers", "accelerate"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_QuietBenign())


def _accelerator(device: str):
    """An ``accelerate`` accelerator under torchrun / accelerate launch, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return None
    import torch
    from accelerate import Accelerator

    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        os.environ.setdefault("ACCELERATE_USE_CPU", "1")  # else accelerate ignores torchrun on CPUs
    accelerator = Accelerator()
    if accelerator.num_processes != world:
        raise EvalError(f"WORLD_SIZE={world} but accelerate sees {accelerator.num_processes} process(es)")
    return accelerator


def run(args: argparse.Namespace, manager=None) -> Report | None:
    """Evaluate; returns the report (None on ranks other than 0 of a data-parallel run)."""
    started = time.time()
    accelerator = _accelerator(args.device)
    world = accelerator.num_processes if accelerator is not None else 1
    main_process = accelerator is None or accelerator.is_main_process
    say = (lambda msg: log.info(msg)) if main_process else (lambda msg: None)

    if not args.ckpt.exists():
        raise EvalError(f"CKPT {args.ckpt} does not exist (give a run dir, checkpoints/step_<N> or an exported dir)")
    # Data first: a missing dataset should fail in seconds, before a large model is read.
    manager = manager or task_manager(args.tasks, args.include_path)
    check_task_names(manager, args.tasks)
    tasks = load_tasks(manager, args.tasks, args.include_path, progress=say, ckpt=args.ckpt)
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
    if accelerator is not None:  # every rank is past its collectives: close the group before exit,
        accelerator.wait_for_everyone()  # or gloo's threads can abort the interpreter ("terminate called")
        accelerator.end_training()
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
