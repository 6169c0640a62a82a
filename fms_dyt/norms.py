"""Normalization layers of fms-dyt and the paper's α₀ width schedule.

Every norm site of the model is built through :func:`build_norm`, so a new kind of norm is one
:class:`Norm` subclass and one entry in :data:`NORMS`. A norm layer knows its site ("attn", "ffn"
or "final", the spelling used everywhere: metrics keys, analysis, the α₀ arguments) and its own
initial values; its class declares every fact the rest of fms-dyt needs about the kind (see
:class:`Norm`), which the optimizer, metrics, telemetry, planner, export, FP8 and analysis read
from there.
"""

from __future__ import annotations

import abc
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
        """α₀ by site, for the point-wise sites only."""
        return {site: getattr(self, f"alpha_{site}") for site in self.pointwise_sites()}

    def pointwise_sites(self) -> list[str]:
        """The sites whose norm is point-wise (its class declares ``pointwise``), in SITES order."""
        return [site for site in SITES if self.kind_at(site) in NORMS and NORMS[self.kind_at(site)].pointwise]


class Norm(nn.Module, abc.ABC):
    """A kind of norm layer: the facts a kind declares as class attributes, and the methods every
    layer has. Nothing outside this module tells the kinds apart by name.

    Every layer takes ``site=``, names its per-channel scale ``weight`` and has ``normalize(x)``
    (its output before the learnable scale: the analysis draws it), ``initial_state(device)``
    (every parameter's initial value by name: ``Transformer.init_weights`` and meta-device
    materialisation use it) and ``reset_parameters()``.
    """

    kind: str  # its key in NORMS: `norm=<kind>`, `norm.final=<kind>`, configs/norm/<kind>.yaml
    display_name: str  # figure legends and report tables ("DyT")
    formula: str  # normalize(x), as figures label it
    # No statistics over the channels: a learnable scalar `alpha` per layer whose α₀ is resolved
    # per site (`norm.alpha_<site>` or the width table, config.norm_args), `alpha/<site>` metrics,
    # and the telemetry interface preactivation(x) (the argument of its squashing function) and
    # saturated_above (the |preactivation| where the derivative has fallen to ~7% of its peak).
    pointwise: bool = False
    saturated_above: Optional[float] = None
    # Its one-element learnable parameters, by name: the optimizer's `alpha_and_shift` role, the
    # metrics `<name>/<site>`, `telemetry/<name>/<site>`, and count_parameters' "scalars".
    scalars: tuple[str, ...] = ()
    # |output| <= |γ| (+ |β|) per channel whatever the input: the FP8 cast of what reads it can take
    # its scale from max|γ| (parallel.float8_dyt_static_scale, fms_dyt.float8).
    bounded_by_gamma: bool = False
    llama_expressible: bool = False  # LlamaForCausalLM's own norm computes it (`--format llama`)

    @classmethod
    @abc.abstractmethod
    def build(cls, dim: int, site: str, args: NormArgs) -> "Norm":
        """The layer of width ``dim`` at ``site`` from the model's norm settings."""

    @staticmethod
    @abc.abstractmethod
    def saved_bytes(dim: int, compute_bytes: int, cpu: bool = False) -> int:
        """Bytes per token one layer keeps for backward (``cpu``: run eagerly on a CPU), for the
        planner (fms_dyt.plan; tests/test_plan.py measures them)."""

    @abc.abstractmethod
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's output before its learnable scale (and shift)."""

    @abc.abstractmethod
    def initial_state(self, device=None) -> dict[str, torch.Tensor]:
        """The initial value of every parameter, by name (fp32)."""

    def parameter_role(self, name: str) -> str:
        """The optimizer role (fms_dyt.optim) of the layer's parameter ``name``."""
        return "alpha_and_shift" if name in self.scalars else "norm_weights"

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.weight.device.type != "meta":  # a meta model is initialised where it is materialised
            for name, value in self.initial_state(self.weight.device).items():
                getattr(self, name).copy_(value)


class RMSNorm(Norm):
    """LLaMA's RMSNorm; statistics are computed in fp32 whatever the input dtype."""

    kind, display_name, formula = "rmsnorm", "RMSNorm", "x / rms(x)"
    llama_expressible = True

    def __init__(self, dim: int, eps: float = 1e-5, site: Optional[str] = None, gamma0: float = 1.0):
        super().__init__()
        self.eps, self.site, self.gamma0 = eps, site, float(gamma0)
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    @classmethod
    def build(cls, dim: int, site: str, args: NormArgs) -> "RMSNorm":
        return cls(dim, args.eps, site=site, gamma0=args.gamma0(site))

    @staticmethod
    def saved_bytes(dim: int, compute_bytes: int, cpu: bool = False) -> int:
        # the fp32 copy of x (x itself in fp32), the normalised x before the weight, 1/rms
        return 4 * dim + compute_bytes * dim + 4

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """The normalized input, before the learnable scale."""
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * self.normalize(x)

    def initial_state(self, device=None) -> dict[str, torch.Tensor]:
        """The initial value of every parameter, by name (fp32)."""
        return {"weight": torch.full(self.weight.shape, self.gamma0, device=device)}


class DyT(Norm):
    """Dynamic Tanh: y = weight · tanh(α·x) (+ bias), with α one learnable scalar per layer."""

    kind, display_name, formula = "dyt", "DyT", "tanh(αx)"
    pointwise, scalars, bounded_by_gamma = True, ("alpha",), True
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

    @classmethod
    def build(cls, dim: int, site: str, args: NormArgs) -> "DyT":
        return cls(dim, getattr(args, f"alpha_{site}"), args.beta, args.impl, site=site, gamma0=args.gamma0(site))

    @staticmethod
    def saved_bytes(dim: int, compute_bytes: int, cpu: bool = False) -> int:
        # the fused op keeps its input only; eager on a CPU tanh(α·x) too (fms_dyt.ops)
        return (2 if cpu else 1) * compute_bytes * dim

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


# The fraction of its peak that a squashing function's derivative has fallen to where fms-dyt
# calls it saturated: tanh's at |z| = 2 (DyT.saturated_above), about 7%.
SATURATED_FRACTION = 1 - math.tanh(DyT.saturated_above) ** 2


class Derf(Norm):
    """Dynamic erf: y = weight · erf(α·x + s) + bias ("Stronger Normalization-Free Transformers",
    arXiv 2512.10938), with α and s one learnable scalar each per layer, weight (γ) ones and bias
    (β) zeros per channel. Computed with plain PyTorch ops (autograd keeps x, α·x + s and the erf)."""

    kind, display_name, formula = "derf", "Derf", "erf(αx + s)"
    pointwise, scalars, bounded_by_gamma = True, ("alpha", "shift"), True
    # erf'(z) = 2/√π · exp(-z²) falls to SATURATED_FRACTION of its peak at |z| = √(-ln fraction) ≈ 1.628
    saturated_above = math.sqrt(-math.log(SATURATED_FRACTION))

    def __init__(self, dim: int, alpha0: float, shift0: float = 0.0, site: Optional[str] = None, gamma0: float = 1.0):
        super().__init__()
        self.alpha0, self.shift0, self.site, self.gamma0 = float(alpha0), float(shift0), site, float(gamma0)
        self.alpha = nn.Parameter(torch.empty(1))
        self.shift = nn.Parameter(torch.empty(1))
        self.weight = nn.Parameter(torch.empty(dim))
        self.bias = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    @classmethod
    def build(cls, dim: int, site: str, args: NormArgs) -> "Derf":
        return cls(dim, getattr(args, f"alpha_{site}"), args.shift0, site=site, gamma0=args.gamma0(site))

    @staticmethod
    def saved_bytes(dim: int, compute_bytes: int, cpu: bool = False) -> int:
        return 3 * compute_bytes * dim  # plain ops: autograd keeps x, α·x + s and erf(α·x + s)

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


class DyISRU(Norm):
    """Dynamic Inverse Square Root Unit, the element-wise counterpart of RMSNorm ("On the
    Mathematical Relationship Between Layer Normalization and Dynamic Activation Functions",
    F. Stollenwerk, arXiv 2503.21708, EACL 2026).

    The paper's form, for a token of C channels: y_i = √C · x_i / √(β + x_i²), where one learnable
    scalar β per layer takes the place of RMSNorm's Σ_{j≠i} x_j² (RMSNorm: √C · x_i / √(Σ_j x_j²)).
    fms-dyt learns α = β^(-1/2) instead of β and leaves √C to the per-channel scale γ (``weight``,
    γ₀ 1 but at the final site, no bias):

        y = weight · x / √(α⁻² + x²) = weight · αx / √(1 + (αx)²),

    so that α is the slope at 0, as DyT's is, and point-wise like DyT's: its α₀ comes from DyT's
    keys and width table (the paper trains no model and gives no initial β), it is logged as
    ``alpha/<site>`` and the output is bounded by |γ|. Plain PyTorch ops in x's dtype, computed as
    x · rsqrt(α⁻² + x²): autograd keeps x, the rsqrt and their product. The paper's β is not
    ``norm.beta`` (DyT's bias switch, which DyISRU ignores)."""

    kind, display_name, formula = "dyisru", "DyISRU", "αx / √(1 + (αx)²)"
    pointwise, scalars, bounded_by_gamma = True, ("alpha",), True
    # (1 + z²)^(-3/2), the derivative of z / √(1 + z²), falls to SATURATED_FRACTION of its peak
    # at |z| = √(fraction^(-2/3) - 1) ≈ 2.20
    saturated_above = math.sqrt(SATURATED_FRACTION ** (-2 / 3) - 1)

    def __init__(self, dim: int, alpha0: float, site: Optional[str] = None, gamma0: float = 1.0):
        super().__init__()
        self.alpha0, self.site, self.gamma0 = float(alpha0), site, float(gamma0)
        self.alpha = nn.Parameter(torch.empty(1))
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    @classmethod
    def build(cls, dim: int, site: str, args: NormArgs) -> "DyISRU":
        return cls(dim, getattr(args, f"alpha_{site}"), site=site, gamma0=args.gamma0(site))

    @staticmethod
    def saved_bytes(dim: int, compute_bytes: int, cpu: bool = False) -> int:
        return 3 * compute_bytes * dim  # x, rsqrt(α⁻² + x²) and their product

    def preactivation(self, x: torch.Tensor) -> torch.Tensor:
        """α·x: the argument of the inverse square root unit z / √(1 + z²)."""
        return self.alpha.to(x.dtype) * x

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """x / √(α⁻² + x²) = αx / √(1 + (αx)²): the squashed input, before the learnable scale."""
        return x * torch.rsqrt(self.alpha.to(x.dtype).pow(-2) + x * x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.weight * self.normalize(x)).to(x.dtype)

    def initial_state(self, device=None) -> dict[str, torch.Tensor]:
        """The initial value of every parameter, by name (fp32): α₀, γ₀ (1 but at the final site)."""
        return {"alpha": torch.full((1,), self.alpha0, device=device),
                "weight": torch.full(self.weight.shape, self.gamma0, device=device)}


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

# The norm registry: kind -> its class. A new norm is one Norm subclass and one entry here.
NORMS: dict[str, type[Norm]] = {cls.kind: cls for cls in (RMSNorm, DyT, Derf, DyISRU)}


def norm_class(kind: str) -> type[Norm]:
    """The class of a kind of norm (what it declares about itself, see :class:`Norm`)."""
    if kind not in NORMS:
        raise ValueError(f"norm kind {kind!r} is unknown; choose one of {sorted(NORMS)}")
    return NORMS[kind]


def build_norm(dim: int, site: str, args: NormArgs) -> Norm:
    """The norm layer for one site ("attn", "ffn" or "final") of a model of width ``dim``."""
    if site not in SITES:
        raise ValueError(f"norm site {site!r} is not one of {SITES}")
    kind = args.kind_at(site)
    if kind not in NORMS:
        key = "norm.final" if site == "final" and args.final else "norm"
        raise ValueError(f"{key}={kind!r} is unknown; choose one of {sorted(NORMS)}")
    return NORMS[kind].build(dim, site, args)


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
