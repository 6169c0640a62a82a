"""The configuration schema of fms-dyt.

Every config group (``configs/<group>/*.yaml``) fills one dataclass below; Hydra checks the YAML
and the command line against them, so a misspelt key fails at start-up. ``validate`` then
catches combinations no type can express, before anything is allocated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

from fms_dyt.data.config import DataConfig, TokenizerConfig, validate_data
from fms_dyt.model import ModelArgs
from fms_dyt.norms import NORMS, NormArgs, alpha_from_table

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key and the fix."""


@dataclass
class ModelConfig(ModelArgs):
    name: str = MISSING


@dataclass
class NormConfig:
    name: str = MISSING  # a key of fms_dyt.norms.NORMS
    # α₀ per site; null takes the value from alpha_table for the model's width.
    alpha_attn: Optional[float] = None
    alpha_ffn: Optional[float] = None
    alpha_final: Optional[float] = None
    alpha_table: List[Any] = field(default_factory=list)  # rows [width, attention, other]
    beta: bool = False
    embedding_scale: bool = False
    impl: str = "fused"


@dataclass
class TrainConfig:
    max_steps: Optional[int] = None
    tokens: Optional[float] = None  # total training tokens; max_steps is derived when given
    global_batch_tokens: int = 4_194_304
    micro_batch_size: int = 2
    seq_len: int = 4096
    max_bad_steps: int = 5  # abort after this many non-finite losses/gradients in a row
    device: str = "auto"  # auto: cuda when available, else cpu


@dataclass
class OptimConfig:
    lr: float = 3e-4
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    warmup_steps: Optional[int] = None  # null: min(2000, steps / 20)
    min_lr_ratio: float = 0.1


@dataclass
class ParallelConfig:
    sharding: str = "full"  # full | hybrid | none
    replicas: Optional[int] = None  # hybrid: replica groups (null: one per node)
    param_dtype: str = "bfloat16"  # compute dtype of FSDP mixed precision; float32 turns it off
    reduce_dtype: str = "float32"
    activation_checkpointing: str = "off"  # off | full | selective
    ac_fraction: float = 0.5  # selective: fraction of blocks checkpointed
    compile: bool = False  # torch.compile each transformer block
    # Gradient accumulation: false reduce-scatters every micro-batch (gradients stay shard-sized);
    # true keeps unsharded fp32 gradients until the last micro-batch (less traffic, more memory).
    defer_grad_sync: bool = False
    peak_tflops: Optional[float] = None  # per device, for MFU; null: known GPUs, else unknown
    timeout_s: int = 600  # collectives: a dead rank makes the others exit after this long


@dataclass
class CheckpointConfig:
    interval: int = 1000
    keep: int = 3
    async_save: bool = False


@dataclass
class WandbConfig:
    mode: str = "auto"  # auto (online with an API key, else offline) | online | offline | disabled
    project: str = "fms-dyt"
    entity: Optional[str] = None
    name: Optional[str] = None


@dataclass
class LoggingConfig:
    interval: int = 10  # steps between metrics records (metrics.jsonl, W&B)
    console_interval: int = 10  # steps between progress lines on rank 0
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class Config:
    run_dir: str = MISSING
    name: str = MISSING
    seed: int = 2023
    model: ModelConfig = MISSING
    norm: NormConfig = MISSING
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def register() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="fms_dyt_schema", node=Config)


register()


def model_args(cfg: DictConfig) -> ModelArgs:
    m = OmegaConf.to_container(cfg.model, resolve=True)
    m.pop("name")
    return ModelArgs(**m)


def norm_args(cfg: DictConfig) -> NormArgs:
    """The norm settings with α₀ resolved per site (command-line values win over the table)."""
    n = cfg.norm
    alphas = {"alpha_attn": None, "alpha_ffn": None, "alpha_final": None}
    if n.name == "dyt":
        attn, other = alpha_from_table(n.alpha_table, cfg.model.dim)
        alphas = {
            "alpha_attn": n.alpha_attn if n.alpha_attn is not None else attn,
            "alpha_ffn": n.alpha_ffn if n.alpha_ffn is not None else other,
            "alpha_final": n.alpha_final if n.alpha_final is not None else other,
        }
    return NormArgs(
        kind=n.name, eps=cfg.model.norm_eps, beta=n.beta, embedding_scale=n.embedding_scale,
        impl=n.impl, **alphas,
    )


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError naming the key for combinations that cannot work."""
    m = cfg.model
    if m.dim % m.n_heads:
        raise ConfigError(f"model.dim={m.dim} is not divisible by model.n_heads={m.n_heads}")
    if (m.dim // m.n_heads) % 2:
        raise ConfigError(f"model.dim / model.n_heads = {m.dim // m.n_heads} must be even for RoPE")
    if m.n_kv_heads is not None and (m.n_kv_heads <= 0 or m.n_heads % m.n_kv_heads):
        raise ConfigError(
            f"model.n_heads={m.n_heads} is not divisible by model.n_kv_heads={m.n_kv_heads}"
        )
    for key in ("dim", "n_layers", "n_heads", "ffn_dim", "vocab_size", "max_seq_len"):
        if m[key] <= 0:
            raise ConfigError(f"model.{key}={m[key]} must be positive")
    if cfg.norm.name not in NORMS:
        raise ConfigError(f"norm.name={cfg.norm.name!r} is unknown; choose one of {sorted(NORMS)}")
    if cfg.norm.name == "dyt":
        if not cfg.norm.alpha_table and None in (cfg.norm.alpha_attn, cfg.norm.alpha_ffn, cfg.norm.alpha_final):
            raise ConfigError("norm.alpha_table is empty: give it rows [width, attn, other] or set every norm.alpha_*")
        for site, value in vars(norm_args(cfg)).items():
            if site.startswith("alpha_") and not value > 0:
                raise ConfigError(f"norm.{site}={value} must be > 0 (DyT's α₀ scales tanh's input)")
    t = cfg.train
    if t.seq_len > m.max_seq_len:
        raise ConfigError(f"train.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    p = cfg.parallel
    choices = {
        "parallel.sharding": (p.sharding, ("full", "hybrid", "none")),
        "parallel.activation_checkpointing": (p.activation_checkpointing, ("off", "full", "selective")),
        "logging.wandb.mode": (cfg.logging.wandb.mode, ("auto", "online", "offline", "disabled")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {list(allowed)}")
    try:
        validate_data(OmegaConf.to_object(cfg.data))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not 0 <= p.ac_fraction <= 1:
        raise ConfigError(f"parallel.ac_fraction={p.ac_fraction} must be within [0, 1]")


def load_config(overrides: list[str] = (), config_name: str = "train") -> DictConfig:
    """Compose ``configs/<config_name>.yaml`` with Hydra overrides, as ``train.py`` would, and validate it."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            cfg = compose(config_name=config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(str(e).split("Config search path")[0].strip()) from None
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]) if "hydra" in cfg else cfg
    validate(cfg)
    return cfg
