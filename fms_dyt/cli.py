"""What fms-dyt's command lines share: Hydra overrides of configs/train.yaml beside a command's own
options, and exit code 2 with the message of a configuration error."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from omegaconf import DictConfig

from fms_dyt.config import ConfigError, load_config

EXIT_CONFIG = 2  # a bad configuration or argument; the message says which and what to do


def parse_with_overrides(parser: argparse.ArgumentParser, argv) -> tuple[argparse.Namespace, list[str]]:
    """The parser's options, and every other argument as a Hydra override (``key=value``)."""
    args, overrides = parser.parse_known_args(argv)
    unknown = [o for o in overrides if o.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args, overrides


def load_config_or_report(prog: str, overrides: list[str]) -> Optional[DictConfig]:
    """The composed, validated config; None after printing ``<prog>: configuration error: ...``
    to stderr (the caller exits with EXIT_CONFIG)."""
    try:
        return load_config(overrides)
    except ConfigError as e:
        print(f"{prog}: configuration error: {e}", file=sys.stderr)
        return None
