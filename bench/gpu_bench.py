"""GPU benchmarks of fms-dyt, for bench/gpu_check.sh: ``python bench/gpu_bench.py --out FILE [--dry-run]``.

norm    DyT layer forward + backward (eager and compiled) against compiled RMSNorm and Liger's
        RMSNorm and DyT (when liger-kernel is installed), bf16, 4,096 x 4,096
step    a training step with compiled blocks of a ~1B configuration, DyT against RMSNorm
mfu     tokens/s and MFU of a 7B-wide model with 4 blocks (compiled)
memory  ``fms_dyt.plan --simulate``'s predicted peak of that model (eager) against
        ``torch.cuda.max_memory_allocated`` of two real steps
fp8     tokens/s of that model with compiled blocks in bf16 and with each FP8 recipe
        (``parallel.float8``; DyT also with ``parallel.float8_dyt_static_scale``), DyT and RMSNorm,
        and each one's ratio to bf16 with the same norm (needs torchao: ``pip install -e ".[fp8]"``)

``--dry-run`` checks what a CPU can: the arguments, the imports and every configuration.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ("norm", "step", "mfu", "memory", "fp8")
WIDE_7B = ["model=llama7b", "model.n_layers=4", "train.seq_len=4096", "train.micro_batch_size=2",
           "train.global_batch_tokens=8192", "train.max_steps=2", "train.device=cuda"]
ONE_B = ["model=llama7b", "model.dim=2048", "model.n_heads=16", "model.n_kv_heads=16", "model.ffn_dim=5632", "model.n_layers=16",
         "train.seq_len=2048", "train.micro_batch_size=4", "train.global_batch_tokens=8192", "train.max_steps=2",
         "train.device=cuda", "parallel.compile=true"]
CONFIGS = {
    "step_dyt": ONE_B + ["norm=dyt"], "step_rmsnorm": ONE_B + ["norm=rmsnorm"],
    "mfu": WIDE_7B + ["norm=dyt", "parallel.compile=true"], "memory": WIDE_7B + ["norm=dyt"],
}
FP8_RECIPES = {"bf16": [], "tensorwise": ["parallel.float8=tensorwise"], "rowwise": ["parallel.float8=rowwise"],
               "rowwise_with_gw_hp": ["parallel.float8=rowwise_with_gw_hp"]}
for _norm in ("dyt", "rmsnorm"):
    for _name, _extra in FP8_RECIPES.items():
        CONFIGS[f"fp8_{_norm}_{_name}"] = WIDE_7B + [f"norm={_norm}", "parallel.compile=true", *_extra]
CONFIGS["fp8_dyt_tensorwise_static"] = CONFIGS["fp8_dyt_tensorwise"] + ["parallel.float8_dyt_static_scale=true"]


def _cuda_ms(fn, warmup: int = 5, repeats: int = 30) -> float:
    """Median milliseconds of ``fn()`` by CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _liger_layers(dim: int) -> dict:
    try:
        from liger_kernel.transformers.rms_norm import LigerRMSNorm
    except ImportError:
        return {}
    layers = {"liger_rmsnorm": LigerRMSNorm(dim)}
    try:
        from liger_kernel.transformers.dyt import LigerDyT

        layers["liger_dyt"] = LigerDyT(dim)
    except ImportError:
        pass
    return layers


def bench_norm() -> dict:
    from fms_dyt.norms import DyT, RMSNorm

    rows, dim = 4096, 4096
    layers = {"dyt": DyT(dim, alpha0=0.5), "dyt_compiled": torch.compile(DyT(dim, alpha0=0.5)),
              "rmsnorm_compiled": torch.compile(RMSNorm(dim)), **_liger_layers(dim)}
    x = torch.randn(rows, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(x)
    out = {}
    for name, layer in layers.items():
        layer = layer.to("cuda", torch.bfloat16)
        out[f"{name}_ms"] = round(_cuda_ms(lambda: layer(x).backward(grad)), 4)
    out["dyt_over_rmsnorm_compiled"] = round(out["dyt_compiled_ms"] / out["rmsnorm_compiled_ms"], 3)
    return out


def _model(overrides: list[str]):
    from fms_dyt.config import load_config, schedule
    from fms_dyt.optim import build_optimizer
    from fms_dyt.parallel import build_mesh, init_distributed
    from fms_dyt.trainer import build_model

    cfg = load_config(overrides)
    d = init_distributed("cuda")
    model = build_model(cfg, d, build_mesh(cfg.parallel, d))
    _, accum = schedule(cfg, d.world_size)
    return cfg, d, model, build_optimizer(model, cfg.optim), accum


def _steps(overrides: list[str], n: int) -> tuple[list[float], object]:
    """Seconds of each of ``n`` training steps (after two untimed ones), and the config."""
    from fms_dyt.trainer import train_step

    cfg, d, model, optimizer, accum = _model(overrides)
    t = cfg.train
    tokens = torch.randint(0, cfg.model.vocab_size, (t.micro_batch_size, t.seq_len), device="cuda")
    batches = itertools.repeat((tokens, tokens))
    times = []
    for i in range(n + 2):
        torch.cuda.synchronize()
        start = time.perf_counter()
        train_step(model, optimizer, batches, accum, cfg.optim.grad_clip, d.device, check_finite=False)
        torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return times, cfg


def bench_step() -> dict:
    out = {}
    for norm in ("dyt", "rmsnorm"):
        times, cfg = _steps(CONFIGS[f"step_{norm}"], 5)
        out[f"{norm}_step_s"] = round(statistics.median(times), 4)
    out["dyt_over_rmsnorm"] = round(out["dyt_step_s"] / out["rmsnorm_step_s"], 3)
    return out


def bench_mfu() -> dict:
    from fms_dyt.config import model_args
    from fms_dyt.metrics import flops_per_token, peak_flops

    times, cfg = _steps(CONFIGS["mfu"], 5)
    tokens_per_s = cfg.train.global_batch_tokens / statistics.median(times)
    peak = peak_flops(torch.device("cuda"), cfg.parallel.peak_tflops)
    mfu = tokens_per_s * flops_per_token(model_args(cfg), cfg.train.seq_len) / peak if peak else None
    return {"tokens_per_s": round(tokens_per_s, 1), "mfu": round(mfu, 4) if mfu else None}


def bench_memory() -> dict:
    torch.cuda.reset_peak_memory_stats()
    _steps(CONFIGS["memory"], 0)
    measured = torch.cuda.max_memory_allocated() / 2**30
    # The simulation runs in a process of its own: it needs a fake process group of its own.
    sim = subprocess.run([sys.executable, "-m", "fms_dyt.plan", *CONFIGS["memory"], "--nodes", "1",
                          "--gpus-per-node", "1", "--simulate", "--json"],
                         capture_output=True, text=True, cwd=ROOT, check=True, timeout=600)
    predicted = json.loads(sim.stdout)["simulated_tensor_peak_gib"]  # tensors, as max_memory_allocated
    return {"max_memory_allocated_gib": round(measured, 3), "simulated_peak_gib": predicted,
            "simulated_over_measured": round(predicted / measured, 3)}


def bench_fp8() -> dict:
    """tokens/s of each FP8 configuration and its ratio to bf16 with the same norm; a configuration
    that fails is recorded with its error and the others still run."""
    out = {}
    for name in (n for n in CONFIGS if n.startswith("fp8_")):
        torch._dynamo.reset()  # each configuration compiles its blocks afresh
        torch.cuda.empty_cache()
        try:
            times, cfg = _steps(CONFIGS[name], 5)
            out[f"{name[4:]}_tokens_per_s"] = round(cfg.train.global_batch_tokens / statistics.median(times), 1)
        except Exception as e:  # noqa: BLE001  (reported in the JSON, the next configuration runs)
            out[f"{name[4:]}_error"] = f"{type(e).__name__}: {e}"[:500]
    for key in [k for k in out if k.endswith("_tokens_per_s")]:
        base = out.get(f"{key.split('_')[0]}_bf16_tokens_per_s")
        if base and "bf16" not in key:
            out[key.replace("_tokens_per_s", "_over_bf16")] = round(out[key] / base, 3)
    return out


def dry_run(selected: list[str]) -> dict:
    from fms_dyt.config import load_config

    for name, overrides in CONFIGS.items():
        load_config(overrides)  # raises ConfigError naming the key
    return {"dry_run": True, "ran_on_gpu": False, "benchmarks": selected, "configs_checked": sorted(CONFIGS),
            "liger_installed": bool(_liger_layers(8))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    parser.add_argument("--dry-run", action="store_true", help="check arguments, imports and configs; no GPU needed")
    ns = parser.parse_args(argv)
    selected = [b for b in ns.only.split(",") if b]
    unknown = sorted(set(selected) - set(BENCHMARKS))
    if unknown:
        parser.error(f"--only: unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    if ns.dry_run:
        result = dry_run(selected)
    elif not torch.cuda.is_available():
        print("gpu_bench: no CUDA GPU here; use --dry-run to check the script on a CPU", file=sys.stderr)
        return 2
    else:
        functions = {"norm": bench_norm, "step": bench_step, "mfu": bench_mfu, "memory": bench_memory, "fp8": bench_fp8}
        result = {"ran_on_gpu": True, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                  **{name: functions[name]() for name in selected}}
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
