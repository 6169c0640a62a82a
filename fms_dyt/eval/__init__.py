"""Zero-shot evaluation of fms-dyt models with lm-eval (``python eval/zero_shot.py CKPT``).

- ``tasks``: which lm-eval tasks, where their definitions and data come from, loading them;
- ``hub``: the Hugging Face hub probe that switches to offline mode, and the prefetch hint;
- ``lm``: loading a checkpoint and wrapping it in lm-eval's ``HFLM``;
- ``report``: metric rows, the two averages, the JSON report (its schema and ``read_report``);
- ``wandb_log``: logging a report to W&B;
- ``run`` and ``cli``: one evaluation end to end, and the command line.
"""


class EvalError(Exception):
    """A problem the user can fix; its message says what and how. Printed without a traceback
    (``fms_dyt.errors.refuse``), exit code 2."""

