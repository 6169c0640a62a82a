"""The bottom of fms-dyt's imports: the exit codes of every command, the one-line report of a
refused command, counts in words for messages, the configuration error and the config value checks that modules below
``fms_dyt.config`` (``parallel``, ``plan``) share. Imports only the standard library (torch on
first use), so the batch-node supervisor ``fms_dyt.failures`` can use it too."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Exit codes of train.py and every ``python -m fms_dyt.*`` command. Slurm's retry policy
# (fms_dyt.failures) reads them: a configuration error or a diverged run is never retried.
EXIT_ERROR = 1  # anything else; the message or the traceback says what
EXIT_CONFIG = 2  # a bad configuration, argument or input path; the message names it and the fix
EXIT_DIVERGED = 3  # train.max_bad_steps non-finite steps in a row
EXIT_HUNG = 4  # a rank's watchdog saw no progress (watchdog.step_factor, watchdog.min_s)
EXIT_PREFLIGHT = 5  # a node failed the collective check before training
EXIT_NO_SPACE = 6  # a checkpoint could not be written for lack of space
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1; run the same command again to resume
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key and the fix."""


def refuse(prog: str, error: BaseException | str) -> int:
    """Print ``<prog>: configuration error: <message>`` (``<prog>: error: ...`` for any other
    problem the user can fix) to stderr, without a traceback; EXIT_CONFIG for the caller to exit with."""
    what = "configuration error" if isinstance(error, ConfigError) else "error"
    print(f"{prog}: {what}: {error}", file=sys.stderr)
    return EXIT_CONFIG


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """A count and its noun in correct English: ``1 rank``, ``16 ranks``, ``2 matches`` (``plural``)."""
    return f"{n:,} {noun if n == 1 else plural or noun + 's'}"


def config_dtype(key: str, name: str) -> "torch.dtype":
    """The torch dtype a config value names (``parallel.param_dtype=bfloat16``), or ConfigError."""
    import torch

    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"{key}={name!r} is not a torch dtype (use bfloat16, float16 or float32)")
    return dtype
