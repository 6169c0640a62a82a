"""The configuration schema of fms-dyt.

Every config group (``configs/<group>/*.yaml``) fills one dataclass below; Hydra checks the YAML
and the command line against them, so a misspelt key fails at start-up. ``validate`` then
catches combinations no type can express, before anything is allocated.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, List, Optional, get_type_hints

from omegaconf import MISSING, DictConfig, OmegaConf

from fms_dyt.data.config import DataConfig, TokenizerConfig, validate_data
from fms_dyt.errors import ConfigError  # noqa: F401  (fms_dyt.config.ConfigError for the CLIs)
from fms_dyt.model import ModelArgs
from fms_dyt.norms import NORMS, NormArgs, alpha_from_table, auto_final_gamma0

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class ModelConfig(ModelArgs):
    name: str = MISSING


@dataclass
class NormConfig:
    name: str = MISSING  # a key of fms_dyt.norms.NORMS
    final: Optional[str] = None  # the final norm's kind (a key of NORMS); null: the same as `name`
    # α₀ per site; null takes the value from alpha_table for the model's width.
    alpha_attn: Optional[float] = None
    alpha_ffn: Optional[float] = None
    alpha_final: Optional[float] = None
    alpha_table: List[Any] = field(default_factory=list)  # rows [width, attention, other]
    beta: bool = False
    shift0: float = 0.0  # Derf's initial s
    embedding_scale: bool = False
    impl: str = "fused"
    # initial value of the final norm's per-channel scale γ, any kind: a number, or "auto" (keep the
    # initial logit scale of the paper's width-4096 model: fms_dyt.norms.auto_final_gamma0)
    final_gamma0: Any = 1.0


@dataclass
class TrainConfig:
    max_steps: Optional[int] = None
    tokens: Optional[float] = None  # total training tokens; max_steps is derived when given
    global_batch_tokens: int = 4_194_304
    micro_batch_size: int = 2
    seq_len: int = 4096
    max_bad_steps: int = 5  # abort after this many non-finite losses/gradients in a row
    device: str = "auto"  # auto: cuda when available, else cpu
    # auto: resume from the run directory's newest checkpoint when its configuration matches (the
    # keys of fms_dyt.resume.SAME_RUN_KEYS); force: resume even when those keys changed
    resume: str = "auto"


@dataclass
class OptimConfig:
    lr: float = 3e-4
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    warmup_steps: Optional[int] = None  # null: min(2000, steps / 20)
    min_lr_ratio: float = 0.1
    # Parameter groups (fms_dyt.optim.build_optimizer); the defaults decay everything at the base lr.
    decay_alpha_and_shift: bool = True  # weight decay on α of DyT/Derf and Derf's s
    decay_norm_weights: bool = True  # on every norm's per-channel weights: γ, β of DyT/Derf, RMSNorm's weight
    decay_embedding_scale: bool = True  # on the learnable embedding scalar
    alpha_and_shift_lr_scale: float = 1.0  # lr of α and s = this x the scheduled lr


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
    # Collective timeouts: a dead or hung rank makes the others exit after this long. Start-up
    # (rendezvous, rank 0's reads, the checkpoint load, the first compiled step) and DCP's own
    # collectives get init_timeout_s; steady-state steps timeout_s (docs/architecture.md).
    init_timeout_s: int = 1800
    timeout_s: int = 300


@dataclass
class CheckpointConfig:
    interval: int = 1000
    keep: int = 3
    async_save: bool = False


@dataclass
class WatchdogConfig:
    # fms_dyt/watchdog.py: a rank that finishes no loop iteration for max(step_factor x the median
    # step time, min_s) seconds (startup_s before the first step and while saving a checkpoint;
    # null: parallel.init_timeout_s) dumps its stacks to the run directory and exits 4
    # (docs/slurm.md, "When things fail"); min_s stays below parallel.timeout_s
    enabled: bool = True
    step_factor: float = 20.0
    min_s: float = 240.0
    startup_s: Optional[float] = None


@dataclass
class PreflightConfig:
    # fms_dyt/preflight.py: every rank sees its device and answers one collective within timeout_s
    enabled: bool = True
    timeout_s: float = 120.0


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
    # steps between telemetry passes of the norm sites (fms_dyt/telemetry.py); null: none
    telemetry_interval: Optional[int] = 100
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class ValidationConfig:
    # Steps between val/loss measurements (and at the last step); null: no validation. The
    # documents: data.validation_path or the data.holdout slice (fms_dyt/validation.py).
    interval: Optional[int] = None
    tokens: int = 4_194_304  # validation tokens, in whole windows of train.seq_len + 1


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
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
    preflight: PreflightConfig = field(default_factory=PreflightConfig)


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
    # get: the config.yaml of a checkpoint written before norm.final (or shift0) existed has no such key
    args = NormArgs(kind=n.name, final=n.get("final"), eps=cfg.model.norm_eps, beta=n.beta,
                    shift0=n.get("shift0", 0.0), embedding_scale=n.embedding_scale, impl=n.impl,
                    final_gamma0=final_gamma0(cfg))
    sites = args.pointwise_sites()  # α₀ only where a point-wise norm is
    attn, other = alpha_from_table(n.alpha_table, cfg.model.dim) if sites and n.alpha_table else (None, None)
    for site in sites:
        given = n[f"alpha_{site}"]
        setattr(args, f"alpha_{site}", given if given is not None else (attn if site == "attn" else other))
    return args


def final_gamma0(cfg) -> float:
    """``norm.final_gamma0`` as a number: ``auto`` resolved for the model's width and init_std."""
    given = cfg.norm.get("final_gamma0", 1.0)  # absent from configs written before it existed
    if given == "auto":
        return auto_final_gamma0(cfg.model.dim, cfg.model.init_std)
    try:
        value = float(given)
    except (TypeError, ValueError):
        value = math.nan
    if not value > 0:
        raise ConfigError(f"norm.final_gamma0={given!r} must be a number > 0 (the final norm's initial scale γ₀; "
                          "1 is the paper's) or auto")
    return value


def schedule(cfg, world_size: int) -> tuple[int, int]:
    """(total steps, gradient-accumulation steps), checked before anything is allocated."""
    t = cfg.train
    per_micro = t.seq_len * t.micro_batch_size * world_size
    if t.global_batch_tokens % per_micro:
        raise ConfigError(
            f"train.global_batch_tokens={t.global_batch_tokens} is not a multiple of train.seq_len "
            f"x train.micro_batch_size x world size = {t.seq_len} x {t.micro_batch_size} x {world_size} "
            f"= {per_micro}; change one of them"
        )
    if t.max_steps is None and t.tokens is None:
        raise ConfigError("set train.max_steps or train.tokens (total training tokens)")
    steps = t.max_steps if t.max_steps is not None else math.ceil(t.tokens / t.global_batch_tokens)
    return steps, t.global_batch_tokens // per_micro


def unknown_keys(node: DictConfig, schema: type = None, prefix: str = "") -> list[str]:
    """Keys of ``node`` that ``schema`` (default: ``Config``) does not declare, e.g. added with
    ``+train.max_stpes=5``, each with the closest declared key when there is one."""
    schema = schema or Config
    hints = get_type_hints(schema)
    names = [f.name for f in fields(schema)]
    out = []
    for key in node.keys():
        path = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            out.append(path + (f" (did you mean {prefix}{close[0]}?)" if close else ""))
        elif is_dataclass(hints[key]) and isinstance(node[key], DictConfig):
            out += unknown_keys(node[key], hints[key], f"{path}.")
    return out


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive(v) -> bool:
    return _number(v) and v > 0


def _non_negative(v) -> bool:
    return _number(v) and v >= 0


def _at_least_1(v) -> bool:
    return _number(v) and v >= 1


def _fraction(v) -> bool:
    return _number(v) and 0 <= v <= 1


def _beta(v) -> bool:
    return _number(v) and 0 <= v < 1


def _value_rules(cfg: DictConfig) -> list[tuple[str, Any, bool, str]]:
    """(key, value, acceptable, what it must be) for every number of the training loop; null is
    accepted where the schema allows it (a default is derived)."""
    t, o, p, c, lg, m = cfg.train, cfg.optim, cfg.parallel, cfg.checkpoint, cfg.logging, cfg.model
    checks = [  # (key, value, test, rule, null allowed)
        ("seed", cfg.seed, _non_negative, ">= 0", False),
        ("train.max_steps", t.max_steps, _at_least_1, ">= 1 (or null with train.tokens)", True),
        ("train.tokens", t.tokens, _positive, "> 0 (or null with train.max_steps)", True),
        ("optim.lr", o.lr, _positive, "a finite number > 0", False),
        ("optim.eps", o.eps, _positive, "> 0", False),
        ("optim.weight_decay", o.weight_decay, _non_negative, ">= 0", False),
        ("optim.grad_clip", o.grad_clip, _positive, "> 0 (the largest gradient norm)", False),
        ("optim.warmup_steps", o.warmup_steps, _non_negative, ">= 0 (or null: min(2000, steps / 20))", True),
        ("optim.min_lr_ratio", o.min_lr_ratio, _fraction, "within [0, 1]", False),
        ("optim.alpha_and_shift_lr_scale", o.alpha_and_shift_lr_scale, _positive,
         "a finite number > 0 (the multiplier of the scheduled lr for α and s)", False),
        ("parallel.init_timeout_s", p.init_timeout_s, _positive, "> 0 seconds", False),
        ("parallel.timeout_s", p.timeout_s, _positive, "> 0 seconds", False),
        ("parallel.replicas", p.replicas, _at_least_1, ">= 1 (or null: one per node)", True),
        ("parallel.peak_tflops", p.peak_tflops, _positive, "> 0 (or null)", True),
        ("parallel.ac_fraction", p.ac_fraction, _fraction, "within [0, 1]", False),
        ("checkpoint.keep", c.keep, _non_negative, ">= 0 (0 keeps every checkpoint)", False),
        ("logging.telemetry_interval", lg.telemetry_interval, _at_least_1, ">= 1 (or null: no telemetry)", True),
        ("model.norm_eps", m.norm_eps, _positive, "> 0", False),
        ("model.rope_theta", m.rope_theta, _positive, "> 0", False),
        ("model.init_std", m.init_std, _positive, "> 0", False),
        ("model.output_multiplier", m.get("output_multiplier", 1.0), _positive,
         "a finite number > 0 (the fixed multiplier of the final norm's output; 1: none)", False),
        ("watchdog.step_factor", cfg.watchdog.step_factor, _at_least_1, ">= 1 (times the median step time)", False),
        ("watchdog.min_s", cfg.watchdog.min_s, _positive, "> 0 seconds", False),
        ("watchdog.startup_s", cfg.watchdog.startup_s, _positive, "> 0 seconds (or null: parallel.init_timeout_s)", True),
        ("preflight.timeout_s", cfg.preflight.timeout_s, _positive, "> 0 seconds", False),
        ("validation.interval", cfg.validation.interval, _at_least_1, ">= 1 (or null: no validation)", True),
        ("validation.tokens", cfg.validation.tokens, lambda v: _number(v) and v >= t.seq_len + 1,
         f">= train.seq_len + 1 = {t.seq_len + 1} (one window)", False),
    ]
    for key, value in (("train.global_batch_tokens", t.global_batch_tokens), ("train.micro_batch_size", t.micro_batch_size),
                       ("train.seq_len", t.seq_len), ("train.max_bad_steps", t.max_bad_steps),
                       ("checkpoint.interval", c.interval), ("logging.interval", lg.interval),
                       ("logging.console_interval", lg.console_interval)):
        checks.append((key, value, _at_least_1, ">= 1", False))
    rules = [(key, value, (value is None and nullable) or test(value), rule)
             for key, value, test, rule, nullable in checks]
    betas = list(o.betas)
    rules.append(("optim.betas", betas, len(betas) == 2 and all(map(_beta, betas)),
                  "two numbers in [0, 1), e.g. [0.9, 0.95]"))
    return rules


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError naming the key for values and combinations that cannot work."""
    unknown = unknown_keys(cfg)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(unknown)}: fms-dyt has no such setting (see fms_dyt/config.py)")
    for key, value, ok, rule in _value_rules(cfg):
        if not ok:
            raise ConfigError(f"{key}={value!r} must be {rule}")
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
    if cfg.norm.final is not None and cfg.norm.final not in NORMS:
        raise ConfigError(f"norm.final={cfg.norm.final!r} is unknown; choose one of {sorted(NORMS)} "
                          "or null (the same kind as norm.name)")
    kinds = norm_args(cfg)
    for site, value in kinds.alpha0().items():
        if value is None:
            raise ConfigError(f"norm.alpha_table is empty: give it rows [width, attn, other] or set norm.alpha_{site} "
                              f"(the {site} norm is {kinds.kind_at(site)})")
        if not value > 0:
            raise ConfigError(f"norm.alpha_{site}={value} must be > 0 (α₀ scales the input of the {site} norm's "
                              f"{kinds.kind_at(site)} function)")
    t = cfg.train
    if t.seq_len > m.max_seq_len:
        raise ConfigError(f"train.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    p = cfg.parallel
    choices = {
        "parallel.sharding": (p.sharding, ("full", "hybrid", "none")),
        "parallel.activation_checkpointing": (p.activation_checkpointing, ("off", "full", "selective")),
        "logging.wandb.mode": (cfg.logging.wandb.mode, ("auto", "online", "offline", "disabled")),
        "parallel.param_dtype": (p.param_dtype, ("bfloat16", "float16", "float32")),
        "parallel.reduce_dtype": (p.reduce_dtype, ("bfloat16", "float16", "float32")),
        "train.device": (t.device, ("auto", "cuda", "cpu")),
        "train.resume": (t.resume, ("auto", "force")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {list(allowed)}")
    try:
        validate_data(OmegaConf.to_object(cfg.data))
    except ValueError as e:
        raise ConfigError(str(e)) from None


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
