"""AdamW and the paper's learning-rate schedule (quadratic warmup, cosine decay to a floor).

The schedule is a pure function of the step, so a resumed run needs no scheduler state.
"""

from __future__ import annotations

import math

import torch

from fms_dyt import float8
from fms_dyt.norms import Norm


def parameter_roles(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter, str]]:
    """Every trainable parameter as (name, parameter, role), in ``named_parameters`` order. Roles:
    ``alpha_and_shift`` (a norm's one-element parameters, its class's ``scalars``: DyT's α, Derf's
    α and s), ``norm_weights`` (every other parameter of a norm layer: γ, β, RMSNorm's weight),
    ``embedding_scale`` and ``other`` (matrices, embeddings).

    A norm layer names each parameter's role (``Norm.parameter_role``); parameters are matched by
    identity, so the roles do not depend on the names wrappers add (FSDP2 DTensors, activation
    checkpointing, compile)."""
    role_of = {}
    for module in model.modules():
        if isinstance(module, Norm):
            for leaf, p in module.named_parameters(recurse=False):
                role_of[id(p)] = module.parameter_role(leaf)
    scale = getattr(model, "embedding_scale", None)
    if scale is not None:
        role_of[id(scale)] = "embedding_scale"
    return [(name, p, role_of.get(id(p), "other")) for name, p in model.named_parameters() if p.requires_grad]


def parameter_groups(model: torch.nn.Module, cfg_optim) -> list[dict]:
    """AdamW parameter groups from the ``optim`` switches: one group per distinct (weight decay, lr
    scale), in parameter order, so the default config (everything decays at the base lr) makes
    the one group it made before the switches existed. ``lr_scale`` is the group's multiple of the
    scheduled lr (the trainer sets ``lr = scheduled lr x lr_scale`` every step)."""
    wd = cfg_optim.weight_decay
    settings = {
        "alpha_and_shift": (wd if cfg_optim.decay_alpha_and_shift else 0.0, cfg_optim.alpha_and_shift_lr_scale),
        "norm_weights": (wd if cfg_optim.decay_norm_weights else 0.0, 1.0),
        "embedding_scale": (wd if cfg_optim.decay_embedding_scale else 0.0, 1.0),
        "other": (wd, 1.0),
    }
    groups: dict[tuple[float, float], dict] = {}
    for _, p, role in parameter_roles(model):
        decay, lr_scale = settings[role]
        group = groups.setdefault((decay, lr_scale), {"params": [], "weight_decay": decay, "lr_scale": lr_scale,
                                                      "lr": cfg_optim.lr * lr_scale})
        group["params"].append(p)
    return list(groups.values())


def build_optimizer(model: torch.nn.Module, cfg_optim) -> torch.optim.Optimizer:
    # By default every parameter decays, α and the embedding scalar included, as in the reference
    # recipe; the optim.decay_* and optim.alpha_and_shift_lr_scale switches change that.
    groups = parameter_groups(model, cfg_optim)
    # Fused AdamW (one kernel for all parameters) runs on CUDA and CPU; on CPU it is ~4x faster
    # than foreach (bench/run.py).
    fused = all(p.device.type in ("cuda", "cpu") for g in groups for p in g["params"])
    optimizer = torch.optim.AdamW(
        groups, lr=cfg_optim.lr, betas=tuple(cfg_optim.betas), eps=cfg_optim.eps,
        weight_decay=cfg_optim.weight_decay, fused=fused or None, foreach=None if fused else True,
    )
    float8.watch_optimizer(model, optimizer)  # FP8 all-gathers: their scales after each step
    return optimizer


def warmup_steps(cfg_optim, total_steps: int) -> int:
    if cfg_optim.warmup_steps is not None:
        return cfg_optim.warmup_steps
    return max(1, min(2000, total_steps // 20))


def lr_at(step: int, total_steps: int, cfg_optim) -> float:
    """Learning rate of (1-based) ``step``: 1-(1-s/w)² warmup, then cosine to min_lr_ratio·lr."""
    peak, floor = cfg_optim.lr, cfg_optim.lr * cfg_optim.min_lr_ratio
    w = warmup_steps(cfg_optim, total_steps)
    if step <= w:
        return peak * (1 - (1 - step / w) ** 2)
    progress = min(1.0, (step - w) / max(1, total_steps - w))
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
