"""The bottom of fms-dyt's imports: the configuration error and the config value checks that
modules below ``fms_dyt.config`` (``parallel``, ``plan``) share. Imports nothing of fms-dyt."""

from __future__ import annotations

import torch


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key and the fix."""


def config_dtype(key: str, name: str) -> torch.dtype:
    """The torch dtype a config value names (``parallel.param_dtype=bfloat16``), or ConfigError."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"{key}={name!r} is not a torch dtype (use bfloat16, float16 or float32)")
    return dtype
