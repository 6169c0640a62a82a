"""Normalization layers of fms-dyt and the paper's α₀ width schedule.

Every norm site of the model is built through :func:`build_norm`, so a new kind of norm is one
class and one entry in :data:`NORMS`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from .ops import dyt


@dataclass
class NormArgs:
    """What the model needs to build its norm layers, with α₀ already resolved per site."""

    kind: str = "rmsnorm"
    eps: float = 1e-5
    alpha_attn: Optional[float] = None  # DyT only: α₀ of the norm before attention
    alpha_ffn: Optional[float] = None  # DyT only: α₀ of the norm before the FFN
    alpha_final: Optional[float] = None  # DyT only: α₀ of the final norm
    beta: bool = False  # DyT only: learnable shift (off for LLaMA, as in the paper)
    embedding_scale: bool = False  # learnable scalar on the embeddings, initialised to √dim
    impl: str = "fused"  # DyT only: "fused" (ops.dyt), "eager" (plain formula) or "liger"


class RMSNorm(nn.Module):
    """LLaMA's RMSNorm; statistics are computed in fp32 whatever the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """The normalized input, before the learnable scale."""
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * self.normalize(x)

    def initial_fill(self, name: str) -> float:
        """The constant that parameter ``name`` starts at."""
        return 1.0


class DyT(nn.Module):
    """Dynamic Tanh: y = weight · tanh(α·x) (+ bias), with α one learnable scalar per layer."""

    def __init__(self, dim: int, alpha0: float, beta: bool = False, impl: str = "fused"):
        super().__init__()
        if impl not in DYT_IMPLS:
            raise ValueError(f"norm.impl={impl!r} is not one of {sorted(DYT_IMPLS)}")
        self.alpha0 = alpha0
        self.impl = impl
        self.alpha = nn.Parameter(torch.full((1,), float(alpha0)))
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if beta else None

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """tanh(α·x): the squashed input, before the learnable scale."""
        return torch.tanh(self.alpha.to(x.dtype) * x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return DYT_IMPLS[self.impl](x, self.alpha, self.weight, self.bias)

    def initial_fill(self, name: str) -> float:
        """The constant that parameter ``name`` starts at."""
        return {"alpha": self.alpha0, "weight": 1.0, "bias": 0.0}[name]


def _dyt_eager(x, alpha, weight, bias):
    y = weight * torch.tanh(alpha * x)
    return y if bias is None else y + bias


def _dyt_liger(x, alpha, weight, bias):
    # Liger's Triton kernel (GPU only, optional). It returns dα in the input dtype.
    try:
        from liger_kernel.ops.dyt import LigerDyTFunction
    except ImportError as e:
        raise ImportError("norm.impl=liger needs `pip install liger-kernel` and a GPU; or use norm.impl=fused") from e
    return LigerDyTFunction.apply(x, alpha, weight, bias)


DYT_IMPLS = {"fused": dyt, "eager": _dyt_eager, "liger": _dyt_liger}

# The norm registry: kind -> builder(dim, site, args). A new norm is one entry here.
NORMS = {
    "rmsnorm": lambda dim, site, a: RMSNorm(dim, a.eps),
    "dyt": lambda dim, site, a: DyT(dim, getattr(a, f"alpha_{site}"), a.beta, a.impl),
}

SITES = ("attn", "ffn", "final")


def build_norm(dim: int, site: str, args: NormArgs) -> nn.Module:
    """The norm layer for one site ("attn", "ffn" or "final") of a model of width ``dim``."""
    if args.kind not in NORMS:
        raise ValueError(f"norm={args.kind!r} is unknown; choose one of {sorted(NORMS)}")
    return NORMS[args.kind](dim, site, args)


def alpha_from_table(table: Sequence[Sequence[float]], width: int) -> tuple[float, float]:
    """α₀ (attention, other) for a model width from rows ``[width, attn, other]``.

    Between rows: linear in log2(width); outside the table: the nearest row.
    """
    rows = sorted((float(w), float(a), float(o)) for w, a, o in table)
    if width <= rows[0][0]:
        return rows[0][1], rows[0][2]
    if width >= rows[-1][0]:
        return rows[-1][1], rows[-1][2]
    for (w0, a0, o0), (w1, a1, o1) in zip(rows, rows[1:]):
        if w0 <= width <= w1:
            t = (math.log2(width) - math.log2(w0)) / (math.log2(w1) - math.log2(w0))
            return a0 + t * (a1 - a0), o0 + t * (o1 - o0)
    raise AssertionError("unreachable: rows are sorted and width is inside them")
