"""Normalization layers of fms-dyt and the paper's α₀ width schedule.

Every norm site of the model is built through :func:`build_norm`, so a new kind of norm is one
class and one entry in :data:`NORMS`. A norm layer knows its site ("attn", "ffn" or "final", the
spelling used everywhere: metrics keys, analysis, the α₀ arguments) and its own initial values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from .ops import dyt


SITES = ("attn", "ffn", "final")


@dataclass
class NormArgs:
    """A model's norm layers, with α₀ already resolved per site (``fms_dyt.config.norm_args``
    resolves it from the config, once). The fields are stored in exported ``config.json`` files."""

    kind: str = "rmsnorm"  # the blocks' norm (attn and ffn sites)
    final: Optional[str] = None  # the final norm's kind; None: the same as the blocks'
    eps: float = 1e-5
    alpha_attn: Optional[float] = None  # point-wise norms only: α₀ of the norm before attention
    alpha_ffn: Optional[float] = None  # point-wise norms only: α₀ of the norm before the FFN
    alpha_final: Optional[float] = None  # point-wise norms only: α₀ of the final norm
    beta: bool = False  # DyT only: learnable shift (off for LLaMA, as in the paper); Derf always has one
    shift0: float = 0.0  # Derf only: initial value of s, the learnable scalar inside erf
    embedding_scale: bool = False  # learnable scalar on the embeddings, initialised to √dim
    impl: str = "fused"  # DyT only: "fused" (ops.dyt), "eager" (plain formula) or "liger"
    final_gamma0: float = 1.0  # initial value of the final norm's per-channel scale γ (every kind)

    def kind_at(self, site: str) -> str:
        """The kind of norm at a site ("attn", "ffn" or "final")."""
        return (self.final or self.kind) if site == "final" else self.kind

    def gamma0(self, site: str) -> float:
        """The initial value of the per-channel scale γ at a site: ``final_gamma0`` for the final
        norm, 1 in the blocks."""
        return self.final_gamma0 if site == "final" else 1.0

    def kinds(self) -> set[str]:
        """Every kind of norm in the model."""
        return {self.kind_at(site) for site in SITES}

    def description(self) -> str:
        """The kind, with the final norm's when it differs: "dyt" or "dyt, final rmsnorm"."""
        final = self.kind_at("final")
        return self.kind if final == self.kind else f"{self.kind}, final {final}"

    def alpha0(self) -> dict[str, float]:
        """α₀ by site, for the point-wise sites only (DyT, Derf)."""
        return {site: getattr(self, f"alpha_{site}") for site in self.pointwise_sites()}

    def pointwise_sites(self) -> list[str]:
        """The sites whose norm is point-wise (a kind in POINTWISE), in SITES order."""
        return [site for site in SITES if self.kind_at(site) in POINTWISE]


class RMSNorm(nn.Module):
    """LLaMA's RMSNorm; statistics are computed in fp32 whatever the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-5, site: Optional[str] = None, gamma0: float = 1.0):
        super().__init__()
        self.eps, self.site, self.gamma0 = eps, site, float(gamma0)
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """The normalized input, before the learnable scale."""
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * self.normalize(x)

    def initial_state(self, device=None) -> dict[str, torch.Tensor]:
        """The initial value of every parameter, by name (fp32)."""
        return {"weight": torch.full(self.weight.shape, self.gamma0, device=device)}

    @torch.no_grad()
    def reset_parameters(self) -> None:
        _load_initial_state(self)


class DyT(nn.Module):
    """Dynamic Tanh: y = weight · tanh(α·x) (+ bias), with α one learnable scalar per layer."""

    formula = "tanh(αx)"  # normalize(x), as figures label it
    # |α·x| where tanh' = 1 − tanh² has fallen to 7% of its peak: beyond it the layer passes
    # almost no gradient (fms_dyt.telemetry counts such inputs as saturated)
    saturated_above = 2.0

    def __init__(self, dim: int, alpha0: float, beta: bool = False, impl: str = "fused", site: Optional[str] = None,
                 gamma0: float = 1.0):
        super().__init__()
        if impl not in DYT_IMPLS:
            raise ValueError(f"norm.impl={impl!r} is not one of {sorted(DYT_IMPLS)}")
        self.alpha0, self.impl, self.site, self.gamma0 = float(alpha0), impl, site, float(gamma0)
        self.alpha = nn.Parameter(torch.empty(1))
        self.weight = nn.Parameter(torch.empty(dim))
        self.bias = nn.Parameter(torch.empty(dim)) if beta else None
        self.reset_parameters()

    def preactivation(self, x: torch.Tensor) -> torch.Tensor:
        """α·x: the argument of tanh."""
        return self.alpha.to(x.dtype) * x

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """tanh(α·x): the squashed input, before the learnable scale."""
        return torch.tanh(self.preactivation(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return DYT_IMPLS[self.impl](x, self.alpha, self.weight, self.bias)

    def initial_state(self, device=None) -> dict[str, torch.Tensor]:
        """The initial value of every parameter, by name (fp32): α₀, γ₀ (1 but at the final site), zeros."""
        state = {"alpha": torch.full((1,), self.alpha0, device=device),
                 "weight": torch.full(self.weight.shape, self.gamma0, device=device)}
        if self.bias is not None:
            state["bias"] = torch.zeros(self.bias.shape, device=device)
        return state

    @torch.no_grad()
    def reset_parameters(self) -> None:
        _load_initial_state(self)


# erf'(z) = 2/√π · exp(-z²), so its derivative falls to tanh's 7% (the fraction at |z| = 2, above)
# where exp(-z²) = 1 - tanh(2)², i.e. at |z| = √(-ln(1 - tanh(2)²)) ≈ 1.628.
_ERF_SATURATED_ABOVE = math.sqrt(-math.log(1 - math.tanh(DyT.saturated_above) ** 2))


class Derf(nn.Module):
    """Dynamic erf: y = weight · erf(α·x + s) + bias ("Stronger Normalization-Free Transformers",
    arXiv 2512.10938), with α and s one learnable scalar each per layer, weight (γ) ones and bias
    (β) zeros per channel. Computed with plain PyTorch ops (autograd keeps x, α·x + s and the erf)."""

    formula = "erf(αx + s)"
    saturated_above = _ERF_SATURATED_ABOVE

    def __init__(self, dim: int, alpha0: float, shift0: float = 0.0, site: Optional[str] = None, gamma0: float = 1.0):
        super().__init__()
        self.alpha0, self.shift0, self.site, self.gamma0 = float(alpha0), float(shift0), site, float(gamma0)
        self.alpha = nn.Parameter(torch.empty(1))
        self.shift = nn.Parameter(torch.empty(1))
        self.weight = nn.Parameter(torch.empty(dim))
        self.bias = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def preactivation(self, x: torch.Tensor) -> torch.Tensor:
        """α·x + s: the argument of erf."""
        return self.alpha.to(x.dtype) * x + self.shift.to(x.dtype)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """erf(α·x + s): the squashed input, before the learnable scale and shift."""
        return torch.erf(self.preactivation(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.weight * self.normalize(x) + self.bias).to(x.dtype)

    def initial_state(self, device=None) -> dict[str, torch.Tensor]:
        """The initial value of every parameter, by name (fp32): α₀, s₀, γ₀ (1 but at the final site), zeros."""
        return {"alpha": torch.full((1,), self.alpha0, device=device),
                "shift": torch.full((1,), self.shift0, device=device),
                "weight": torch.full(self.weight.shape, self.gamma0, device=device),
                "bias": torch.zeros(self.bias.shape, device=device)}

    @torch.no_grad()
    def reset_parameters(self) -> None:
        _load_initial_state(self)


def _load_initial_state(norm: nn.Module) -> None:
    if norm.weight.device.type != "meta":  # a meta model is initialised where it is materialised
        for name, value in norm.initial_state(norm.weight.device).items():
            getattr(norm, name).copy_(value)


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
    "rmsnorm": lambda dim, site, a: RMSNorm(dim, a.eps, site=site, gamma0=a.gamma0(site)),
    "dyt": lambda dim, site, a: DyT(dim, getattr(a, f"alpha_{site}"), a.beta, a.impl, site=site, gamma0=a.gamma0(site)),
    "derf": lambda dim, site, a: Derf(dim, getattr(a, f"alpha_{site}"), a.shift0, site=site, gamma0=a.gamma0(site)),
}
# The point-wise kinds: a learnable α per layer whose α₀ is resolved per site (norm.alpha_<site> or
# the width table), and the telemetry interface preactivation(x) / saturated_above.
POINTWISE = {"dyt", "derf"}


def build_norm(dim: int, site: str, args: NormArgs) -> nn.Module:
    """The norm layer for one site ("attn", "ffn" or "final") of a model of width ``dim``."""
    if site not in SITES:
        raise ValueError(f"norm site {site!r} is not one of {SITES}")
    kind = args.kind_at(site)
    if kind not in NORMS:
        key = "norm.final" if site == "final" and args.final else "norm"
        raise ValueError(f"{key}={kind!r} is unknown; choose one of {sorted(NORMS)}")
    return NORMS[kind](dim, site, args)


def norm_sites(model: nn.Module) -> dict[str, nn.Module]:
    """Every norm layer of a model by site name, in forward order: ``attn/<layer>``, ``ffn/<layer>``
    (layer: the index in ``model.layers``) and ``final``."""
    sites = {}
    for name, module in model.named_modules():
        site = getattr(module, "site", None)
        if site == "final":
            sites[site] = module
        elif site in SITES:
            sites[f"{site}/{name.split('.')[-2]}"] = module  # name: layers.<i>.<attribute>
    return sites


# The logit RMS at initialisation of the paper's width-4096 models (W_out std 0.02, final γ 1): the
# scale that `norm.final_gamma0=auto` keeps at every width (docs/science.md, "The output scale").
REFERENCE_LOGIT_RMS = 0.02 * math.sqrt(4096)


def auto_final_gamma0(width: int, init_std: float) -> float:
    """``norm.final_gamma0=auto``: the final γ₀ that starts the logits at the scale of the paper's
    width-4096 model, γ₀ · init_std · √width = 0.02 · √4096, and never below the paper's 1 — so
    1 at width 4096 and above (7B–70B, as the paper trains them), √(4096 / width) below it at the
    default init_std 0.02 (8 at width 64, 4 at 256)."""
    return max(1.0, REFERENCE_LOGIT_RMS / (init_std * math.sqrt(width)))


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
