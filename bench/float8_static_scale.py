"""How much of FP8's range a static DyT scale wastes: ``python bench/float8_static_scale.py RUN_DIR [--out FILE]``.

For every DyT norm of the blocks (the input of attention and of the FFN), on the run's held-out
windows in bf16: the FP8 (e4m3) values its output becomes with the scale FP8 training measures
(448 / max|y|, ``parallel.float8=tensorwise``) and with the static one of
``parallel.float8_dyt_static_scale`` (448 / max|γ|, the bound of γ·tanh(αx)), as fractions of
the elements: in the top binade [256, 448], below the smallest normal number 2⁻⁶ (subnormals,
2 or fewer bits of mantissa) and rounded to zero (below 2⁻¹⁰). Also log2 of the ratio of the two
scales (the binades the static one leaves unused at the top). Checkpoints of every run in the
arguments are measured the same way.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

E4M3 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(E4M3).max  # 448
MIN_NORMAL = 2.0**-6


def fp8_fractions(y: torch.Tensor, scale: torch.Tensor) -> dict[str, float]:
    """Where the elements of ``y`` land in e4m3 after multiplying by ``scale`` (saturated, as torchao)."""
    q = (y.float() * scale).clamp(-FP8_MAX, FP8_MAX).to(E4M3).float().abs()
    n = q.numel()
    return {"top_binade": (q >= 256).sum().item() / n, "subnormal": ((q > 0) & (q < MIN_NORMAL)).sum().item() / n,
            "zero": (q == 0).sum().item() / n}


@torch.no_grad()
def measure(run_dir: Path, windows: int) -> dict:
    from fms_dyt.inference import load_for_inference
    from fms_dyt.norms import DyT
    from fms_dyt.validation import heldout_windows

    model, cfg, meta = load_for_inference(run_dir)
    net = model.model.to(torch.bfloat16)
    net.init_buffers()
    tokens = heldout_windows(cfg.data, cfg.tokenizer, cfg.train.seq_len, windows * (cfg.train.seq_len + 1))[:, :-1]
    sites = {f"{site}/{i}": getattr(block, norm) for i, block in enumerate(net.layers)
             for site, norm in (("attn", "attention_norm"), ("ffn", "ffn_norm"))}
    if not all(isinstance(n, DyT) for n in sites.values()):
        raise SystemExit(f"{run_dir}: the blocks' norms are not DyT; nothing to measure")
    outputs = {}
    hooks = [norm.register_forward_hook(lambda m, a, y, site=site: outputs.setdefault(site, []).append(y))
             for site, norm in sites.items()]
    for batch in tokens.split(8):
        net(batch)
    for h in hooks:
        h.remove()
    rows = {}
    for site, norm in sites.items():
        y = torch.cat(outputs[site])
        bound = norm.weight.float().abs() + (norm.bias.float().abs() if norm.bias is not None else 0)
        dynamic, static = FP8_MAX / y.float().abs().max(), FP8_MAX / bound.max()
        rows[site] = {"dynamic": fp8_fractions(y, dynamic), "static": fp8_fractions(y, static),
                      "log2_static_over_dynamic": round(math.log2(static / dynamic), 3)}
    mean = {kind: {k: sum(r[kind][k] for r in rows.values()) / len(rows) for k in ("top_binade", "subnormal", "zero")}
            for kind in ("dynamic", "static")}
    return {"run_dir": str(run_dir), "step": meta.get("step"), "tokens": tokens.numel(), "sites": rows, "mean": mean,
            "log2_static_over_dynamic": {"min": min(r["log2_static_over_dynamic"] for r in rows.values()),
                                          "max": max(r["log2_static_over_dynamic"] for r in rows.values())}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run directories (their newest checkpoint) or checkpoints")
    parser.add_argument("--windows", type=int, default=32, help="held-out windows to run (default 32)")
    parser.add_argument("--out", type=Path, help="JSON file to write")
    ns = parser.parse_args(argv)
    result = [measure(run_dir, ns.windows) for run_dir in ns.run_dirs]
    text = json.dumps(result, indent=1)
    if ns.out:
        ns.out.write_text(text + "\n")
    for r in result:
        m = r["mean"]
        print(f"{r['run_dir']} step {r['step']}: top binade {m['dynamic']['top_binade']:.2%} dynamic, "
              f"{m['static']['top_binade']:.2%} static; subnormal {m['dynamic']['subnormal']:.2%} / "
              f"{m['static']['subnormal']:.2%}; zero {m['dynamic']['zero']:.2%} / {m['static']['zero']:.2%}; "
              f"log2(static / dynamic scale) in [{r['log2_static_over_dynamic']['min']}, "
              f"{r['log2_static_over_dynamic']['max']}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
