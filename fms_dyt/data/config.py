"""Settings of the data pipeline (config group ``data``) and of the tokenizer (group ``tokenizer``).

Plain dataclasses with defaults: Hydra fills them from ``configs/data/*.yaml`` and
``configs/tokenizer/*.yaml``; scripts and tests can build them directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Dict, Optional

SOURCES = ("sample", "local", "pile")


@dataclass
class DataConfig:
    # sample: an offline corpus built from text on this machine; local: files under `path`;
    # pile: a dataset streamed from the Hugging Face hub with `datasets`.
    name: str = "sample"
    # local: a directory, a file or a glob of .jsonl / .jsonl.zst / .parquet files.
    # sample: where the corpus is built (default: $FMS_DYT_CACHE/sample-v3 or ~/.cache/fms_dyt/sample-v3).
    path: Optional[str] = None
    hub_name: str = "monology/pile-uncopyrighted"  # pile: dataset name (or a builder such as "json")
    hub_split: str = "train"
    hub_data_files: Optional[str] = None  # pile: optional data_files pattern passed to load_dataset
    hub_retries: int = 2  # pile: reopen a shard this many times after a network error
    num_workers: int = 2  # DataLoader worker processes per rank (0: read in the training process)
    # Readers per rank: streams of their own share of the logical shards, a micro-batch from each
    # in turn. The data order depends on them, not on the processes that play them: each worker
    # plays readers / num_workers of them, interleaved. null: one per worker (num_workers, >= 1).
    readers: Optional[int] = None
    prefetch: int = 2  # batches each worker prepares ahead
    shuffle_buffer: int = 1000  # documents shuffled together (0 or 1: file order)
    # Fixed split of the data into logical shards; a run can resume on any number of ranks x
    # workers up to this many. Changing it invalidates saved data states.
    num_logical_shards: int = 4096
    # Mixture by meta.pile_set_name: expected copies of each document of that subset per epoch
    # (0 drops the subset, 0.5 keeps a different half each epoch, 2 repeats it). Unlisted: 1.
    # On the command line: +data.weights.Github=0.5 or '++data.weights={Github: 0.5, Pile-CC: 2}'.
    weights: Dict[str, float] = field(default_factory=dict)
    # Fraction of the rows held out for validation (val/loss), chosen by a hash of file name and
    # row, the same for every seed; training never reads them. Changing it starts a new data order.
    holdout: float = 0.01
    # Validation documents from other files instead of a held-out slice (the Pile's val.jsonl.zst):
    # local files for data=local/sample, a file of the hub dataset for data=pile. Set
    # data.holdout=0 with it to train on every row.
    validation_path: Optional[str] = None


@dataclass
class TokenizerConfig:
    # null: the 32,000-piece LLaMA-2-spec SentencePiece model shipped in mistral-common (offline).
    # Otherwise a .model file, a directory (with tokenizer.model, or any transformers tokenizer),
    # or a hub name such as meta-llama/Llama-2-7b-hf.
    path: Optional[str] = None
    add_bos: bool = True  # BOS before every document
    add_eos: bool = True  # EOS after every document


def as_config(value: Any, cls: type):
    """``value`` (a dataclass, an OmegaConf node or a dict) as an instance of ``cls``, validated."""
    if isinstance(value, cls):
        obj = value
    else:
        if not isinstance(value, dict):
            from omegaconf import OmegaConf

            value = OmegaConf.to_container(value, resolve=True)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            group = "data" if cls is DataConfig else "tokenizer"
            raise ValueError(f"unknown key(s) {', '.join(group + '.' + k for k in unknown)}; known: {sorted(known)}")
        obj = cls(**value)
    if isinstance(obj, DataConfig):
        validate_data(obj)
    return obj


def readers_per_rank(cfg: DataConfig) -> int:
    """``data.readers``, or one reader per worker process (one in the training process)."""
    return cfg.readers or max(1, cfg.num_workers)


def validate_data(cfg: DataConfig) -> None:
    """Raise ValueError naming the ``data.*`` key whose value cannot work."""
    if cfg.name not in SOURCES:
        raise ValueError(f"data.name={cfg.name!r} is not one of {list(SOURCES)}")
    if cfg.name == "local" and not cfg.path:
        raise ValueError("data=local needs data.path=<directory, file or glob of .jsonl/.jsonl.zst/.parquet files>")
    for key in ("num_workers", "shuffle_buffer", "hub_retries"):
        if getattr(cfg, key) < 0:
            raise ValueError(f"data.{key}={getattr(cfg, key)} must be >= 0")
    for key in ("prefetch", "num_logical_shards"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"data.{key}={getattr(cfg, key)} must be >= 1")
    if cfg.readers is not None and (cfg.readers < 1 or cfg.num_workers and cfg.readers % cfg.num_workers):
        raise ValueError(f"data.readers={cfg.readers} must be >= 1 and a multiple of data.num_workers="
                         f"{cfg.num_workers} (every worker process plays the same number of readers; null: one "
                         "per worker)")
    if not 0 <= cfg.holdout < 1:
        raise ValueError(f"data.holdout={cfg.holdout} must be within [0, 1) (the fraction of rows held out "
                         "for validation)")
    for subset, weight in (cfg.weights or {}).items():
        if not isinstance(weight, (int, float)) or weight < 0:
            raise ValueError(f"data.weights[{subset!r}]={weight!r} must be a number >= 0")
