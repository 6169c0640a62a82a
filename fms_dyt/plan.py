"""``python -m fms_dyt.plan [hydra overrides] [--json]``: what a config will build, without building it.

The model is instantiated on the meta device (no weights allocated), so the 70B plan runs on a
laptop. Prints the parameter count by part and the α₀ chosen per norm site.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from fms_dyt.config import ConfigError, load_config, model_args, norm_args
from fms_dyt.model import Transformer, count_parameters


def plan(cfg) -> dict:
    args, norm = model_args(cfg), norm_args(cfg)
    with torch.device("meta"):
        model = Transformer(args, norm)
    parts = count_parameters(model)
    alpha = None
    if norm.kind == "dyt":
        alpha = {"attn": norm.alpha_attn, "ffn": norm.alpha_ffn, "final": norm.alpha_final}
    return {
        "model": cfg.model.name,
        "norm": norm.kind,
        "n_params": parts["total"],
        "params_by_part": {k: v for k, v in parts.items() if k != "total"},
        "alpha": alpha,
        "embedding_scale": model.embedding_scale is not None,
    }


def format_plan(p: dict) -> str:
    lines = [f"model {p['model']}, norm {p['norm']}: {p['n_params']:,} parameters"]
    for part, n in p["params_by_part"].items():
        lines.append(f"  {part:<10} {n:>16,}")
    if p["alpha"]:
        a = p["alpha"]
        lines.append(f"alpha0: attention {a['attn']:.4g}, ffn {a['ffn']:.4g}, final {a['final']:.4g}")
    lines.append(f"embedding scalar (init sqrt(dim)): {'on' if p['embedding_scale'] else 'off'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fms_dyt.plan", description=__doc__)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=llama7b norm=dyt")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    ns = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(ns.overrides)
    except ConfigError as e:
        print(f"fms_dyt.plan: configuration error: {e}", file=sys.stderr)
        return 2
    p = plan(cfg)
    print(json.dumps(p) if ns.json else format_plan(p))
    return 0


if __name__ == "__main__":
    sys.exit(main())
