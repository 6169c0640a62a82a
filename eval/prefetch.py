"""``python eval/prefetch.py``: download the zero-shot tasks' data into the Hugging Face cache.

Run it on a machine with network access. It builds every task exactly as ``eval/zero_shot.py``
does (same task definitions, fms-dyt's ``record`` included), which downloads and prepares each
dataset. Then copy the Hugging Face cache (``~/.cache/huggingface``, or ``$HF_HOME``) to the
machines without network, where ``eval/zero_shot.py`` reads it offline. No model is loaded.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's fms_dyt first

from fms_dyt.errors import refuse  # noqa: E402
from fms_dyt.eval import EvalError  # noqa: E402
from fms_dyt.eval.cli import add_include_path_argument, add_tasks_argument, split_tasks  # noqa: E402
from fms_dyt.eval.hub import offline_if_hub_unreachable  # noqa: E402
from fms_dyt.eval.run import setup_logging  # noqa: E402
from fms_dyt.eval.tasks import check_task_names, load_tasks, task_manager  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python eval/prefetch.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tasks_argument(p)
    add_include_path_argument(p, "folder of extra lm-eval task YAMLs (repeatable), as for zero_shot.py")
    args = p.parse_args(argv)
    tasks = split_tasks(args.tasks)
    setup_logging()
    log = logging.getLogger("fms_dyt.eval")
    # Without the hub, report what is cached already and what is not, instead of retrying for minutes.
    offline_if_hub_unreachable()
    try:
        manager = task_manager(tasks, args.include_path)
        check_task_names(manager, tasks)
        loaded = load_tasks(manager, tasks, args.include_path, progress=log.info)
    except EvalError as e:
        return refuse("prefetch.py", e)
    for name, task in loaded.items():
        docs = task.test_docs() if task.has_test_docs() else task.validation_docs()
        log.info("  %-16s %6d documents", name, len(docs))
    from datasets import config

    home = os.environ.get("HF_HOME", str(Path.home() / ".cache" / "huggingface"))
    log.info("cached in %s (datasets: %s); copy that folder to offline machines", home, config.HF_DATASETS_CACHE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
