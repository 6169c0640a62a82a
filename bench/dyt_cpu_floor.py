"""How much time a CPU leaves DyT's tanh, if DyT is to be no slower than RMSNorm.

Compiled forward passes (no autograd) over ``tokens`` x 4,096, in bf16 and fp32, interleaved:
``LlamaRMSNorm`` compiled (the fastest RMSNorm of bench/norm_layers.py); DyT's loop, γ·f(α·x), with
f the op's own tanh (``fms_dyt.ops._tanh``: a rational function when compiled for a CPU); with f a
rational function of lower degree (z·(p₀ + p₁u + p₂u²)/(1 + q₁u + q₂u²), u = z², the cheapest
that still saturates); and with f a clamp to [-1, 1], which is no tanh at all: the floor of the
loop, what DyT would cost if tanh were free. ``budget`` = RMSNorm − floor is the time per pass that
tanh may take for DyT to tie RMSNorm; each f's cost is its time − floor.

    python bench/dyt_cpu_floor.py [--tokens 2048] [--repeats 21]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

from harness import interleaved, machine, median  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: E402

from fms_dyt.ops import _tanh  # noqa: E402

DIM = 4096


def _rational_2_2(z: torch.Tensor) -> torch.Tensor:
    # Coefficients of no particular fit: the operation count is what is measured.
    w = z.float().clamp(-5.0, 5.0)
    u = w * w
    return (w * (1.0 + u * (0.107 + u * 0.0016)) / (1.0 + u * (0.44 + u * 0.021))).to(z.dtype)


def _clamp(z: torch.Tensor) -> torch.Tensor:
    return z.float().clamp(-1.0, 1.0).to(z.dtype)


def measure(tokens: int, dtype: torch.dtype, repeats: int) -> dict:
    x = torch.randn(tokens, DIM, generator=torch.Generator().manual_seed(0)).to(dtype)
    alpha, weight = torch.tensor([0.5], dtype=dtype), torch.ones(DIM, dtype=dtype)
    rms = torch.compile(LlamaRMSNorm(DIM).to(dtype))
    cases = {"rmsnorm": lambda: rms(x)}
    for name, f in (("dyt_op_tanh", _tanh), ("dyt_rational_2_2", _rational_2_2), ("dyt_floor_clamp", _clamp)):
        fn = torch.compile(lambda x, f=f: weight * f(alpha * x))
        cases[name] = lambda fn=fn: fn(x)
    with torch.no_grad():
        times = interleaved(cases, repeats, warmup=3)
    ms = {name: median(t) * 1e3 for name, t in times.items()}
    floor = ms["dyt_floor_clamp"]
    return {"median_ms": {k: round(v, 3) for k, v in ms.items()},
            "budget_ms": round(ms["rmsnorm"] - floor, 3),
            "cost_ms": {k: round(ms[k] - floor, 3) for k in ("dyt_op_tanh", "dyt_rational_2_2")}}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=21)
    a = ap.parse_args(argv)
    out = {"tokens": a.tokens, "dim": DIM, "machine": machine()}
    for dtype in (torch.bfloat16, torch.float32):
        out[str(dtype).removeprefix("torch.")] = measure(a.tokens, dtype, a.repeats)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
