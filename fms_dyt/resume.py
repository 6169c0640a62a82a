"""A run directory belongs to one run: resuming it with another configuration is refused.

The keys of ``SAME_RUN_KEYS`` (and everything below them) define a run: its model, its norm, its
tokenizer, its data and their order, its optimisation and its batch. When ``run_dir`` already
holds a run and any of them differs from the new configuration, training stops before anything
is written, listing each difference, unless ``train.resume=force`` asks for the change on
purpose. Everything else may change between a run and its resumption: ``train.max_steps`` /
``train.tokens`` (a longer run), ``parallel.*`` (another world size or sharding), ``checkpoint.*``,
``logging.*``, ``validation.*``, ``data.num_workers``, ``data.readers`` (the shards move to the new
readers, as for a new world size), ``data.prefetch``, ``data.hub_retries``,
``data.validation_path`` (which documents val/loss reads, not which are trained on), ``name``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from fms_dyt.checkpoint import complete_checkpoints
from fms_dyt.config import Config, ConfigError, ModelConfig, NormConfig
from fms_dyt.parallel import on_rank0

log = logging.getLogger("fms_dyt")

SAME_RUN_KEYS = ("model", "norm", "tokenizer", "data", "optim", "seed",
                 "train.seq_len", "train.micro_batch_size", "train.global_batch_tokens")
FREE_KEYS = ("data.num_workers", "data.readers", "data.prefetch", "data.hub_retries",  # how data is read, not which
             "data.validation_path")


def defines_run(key: str) -> bool:
    return key not in FREE_KEYS and any(key == k or key.startswith(k + ".") for k in SAME_RUN_KEYS)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` as ``{"a.b": 1}``; lists stay values."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def previous_config(run_dir: Path) -> tuple[Path, dict] | None:
    """The configuration of the run in ``run_dir``: its newest checkpoint's, else the run's own
    ``config.yaml`` (a run stopped before its first checkpoint); None for a new directory."""
    candidates = [c / "config.yaml" for c in reversed(complete_checkpoints(run_dir))] + [run_dir / "config.yaml"]
    for path in candidates:
        try:
            tree = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        except Exception:  # missing or unreadable: the next one tells as much
            continue
        if isinstance(tree, dict):
            return path, tree
    return None


def differences(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """(key, old, new) for each run-defining key whose value changed. A key the old run did not
    have yet (an fms-dyt upgrade added it) counts as its default."""
    defaults = flatten(OmegaConf.to_container(OmegaConf.structured(Config(model=ModelConfig(), norm=NormConfig()))))
    old, new = flatten(old), flatten(new)
    return [(key, old.get(key, defaults.get(key)), value) for key, value in new.items()
            if defines_run(key) and old.get(key, defaults.get(key)) != value]


def check_same_run(cfg, run_dir: Path) -> None:
    """Raise ConfigError when ``run_dir`` holds a run that ``cfg`` would change (see the module
    docstring); with ``train.resume=force`` log the changes instead. In a run rank 0 reads the
    previous configuration for every rank."""
    previous = on_rank0(lambda: previous_config(run_dir))
    if previous is None:
        return
    source, old = previous
    changed = differences(old, OmegaConf.to_container(cfg, resolve=True))
    if not changed:
        return
    lines = "\n".join(f"  {key}: {a!r} -> {b!r}" for key, a, b in changed)
    if cfg.train.resume == "force":
        log.warning("train.resume=force: continuing the run in %s with changed settings (it was run with %s):\n%s",
                    run_dir, source, lines)
        return
    raise ConfigError(
        f"run_dir={run_dir} holds a run with another configuration ({source}); these settings differ:\n{lines}\n"
        f"They define the model, the norm, the data and its order or the optimisation, so nothing was changed. "
        f"Either train in a new directory (e.g. run_dir={run_dir.parent / (run_dir.name + '_2')}), or continue "
        f"this run with the new values on purpose: train.resume=force"
    )
