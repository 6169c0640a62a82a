"""DyT against RMSNorm, one layer, forward + backward: the paper's Table 7 comparison and more.

Our default DyT layer (``fms_dyt.norms.DyT``, ``fms_dyt.ops.dyt``) eager against transformers' own
``LlamaRMSNorm`` run eagerly, as the paper compared; and our layer in the faster of its two forms,
eager or under ``torch.compile`` (what ``parallel.compile=true`` runs), against the fastest
RMSNorm this machine offers: ``LlamaRMSNorm`` under ``torch.compile`` or
``torch.nn.functional.rms_norm``. Every candidate gets the same input and the same output
gradient; parameter gradients are computed too. The plain formula, eager and compiled, is timed
alongside (recorded, not a ratio).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from harness import interleaved, median, medians_ms, ratio
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from fms_dyt.norms import DyT
from fms_dyt.ops import dyt_reference


class _DyTVariant(DyT):
    """DyT's parameters with another implementation of the same formula."""

    def __init__(self, dim: int, fn):
        super().__init__(dim, alpha0=0.5)
        self.fn = fn

    def forward(self, x):
        return self.fn(x, self.alpha, self.weight, self.bias)


class _FunctionalRMSNorm(torch.nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps, self.weight = eps, torch.nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


def _fwd_bwd(layer: torch.nn.Module, x0: torch.Tensor, dy: torch.Tensor):
    def run():
        layer.zero_grad(set_to_none=True)
        x = x0.detach().requires_grad_(True)
        layer(x).backward(dy)
    return run


def compare(tokens: int, dim: int, dtype: torch.dtype, repeats: int, compile_backend: str) -> dict:
    """Median fwd+bwd times of DyT and the RMSNorm candidates, and the two ratios."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(tokens, dim, generator=g).to(dtype)
    dy = torch.randn(tokens, dim, generator=g).to(dtype)
    layers = {
        "dyt": DyT(dim, alpha0=0.5),
        "dyt_compiled": torch.compile(DyT(dim, alpha0=0.5), backend=compile_backend, fullgraph=True),
        "rms_eager": LlamaRMSNorm(dim, eps=1e-5),
        "rms_compiled": torch.compile(LlamaRMSNorm(dim, eps=1e-5), backend=compile_backend),
        "rms_functional": _FunctionalRMSNorm(dim, eps=1e-5),
        "dyt_plain_eager": _DyTVariant(dim, dyt_reference),
        "dyt_plain_compiled": torch.compile(_DyTVariant(dim, dyt_reference), backend=compile_backend),
    }
    cases = {name: _fwd_bwd(layer.to(dtype), x0, dy) for name, layer in layers.items()}
    times = interleaved(cases, repeats, warmup=2)
    best = min(("rms_compiled", "rms_functional"), key=lambda name: median(times[name]))
    ours = min(("dyt", "dyt_compiled"), key=lambda name: median(times[name]))
    return {
        "over_eager": ratio(times, "dyt", "rms_eager"),
        "over_best": ratio(times, ours, best),
        "best_dyt": ours,
        "best_rmsnorm": best,
        "median_ms": medians_ms(times),
    }


def measure(quick: bool = False) -> tuple[dict, dict]:
    """(ratios, details). bf16 is the headline (the paper's setting); fp32 is recorded as well."""
    tokens, dim, repeats = (256, 512, 3) if quick else (4096, 4096, 7)
    backend = "aot_eager" if quick else "inductor"
    results, details = {}, {"tokens": tokens, "dim": dim, "repeats": repeats, "compile_backend": backend}
    for dtype, suffix in ((torch.bfloat16, ""), (torch.float32, "_fp32")):
        r = compare(tokens, dim, dtype, repeats, backend)
        results[f"dyt_over_rms_eager_fwdbwd{suffix}"] = r["over_eager"]
        results[f"dyt_over_rms_best_fwdbwd{suffix}"] = r["over_best"]
        details[f"layers{suffix or '_bf16'}"] = {k: r[k] for k in ("best_dyt", "best_rmsnorm", "median_ms")}
    if not quick:  # the other end of the paper's token range
        r = compare(tokens // 2, dim, torch.bfloat16, repeats, backend)
        results["dyt_over_rms_eager_fwdbwd_2048"] = r["over_eager"]
        results["dyt_over_rms_best_fwdbwd_2048"] = r["over_best"]
        details["layers_bf16_2048"] = {k: r[k] for k in ("best_dyt", "best_rmsnorm", "median_ms")}
    return results, details
