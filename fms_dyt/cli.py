"""What fms-dyt's command lines that compose the training config share: Hydra overrides of
configs/train.yaml beside a command's own options, and the report of a configuration error
(``fms_dyt.errors``)."""

from __future__ import annotations

import argparse
from typing import Optional

from omegaconf import DictConfig

from fms_dyt.config import load_config
from fms_dyt.errors import ConfigError, refuse


def parse_with_overrides(parser: argparse.ArgumentParser, argv) -> tuple[argparse.Namespace, list[str]]:
    """The parser's options, and every other argument as a Hydra override (``key=value``)."""
    args, overrides = parser.parse_known_args(argv)
    unknown = [o for o in overrides if o.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args, overrides


def load_config_or_report(prog: str, overrides: list[str]) -> Optional[DictConfig]:
    """The composed, validated config; None after printing ``<prog>: configuration error: ...``
    to stderr (the caller exits with ``fms_dyt.errors.EXIT_CONFIG``)."""
    try:
        return load_config(overrides)
    except ConfigError as e:
        refuse(prog, e)
        return None
