"""fms-dyt's benchmark suite: ``python bench/run.py [--output FILE] [--quick]``.

Runs every benchmark in this process (or processes it starts), prints a table and writes one JSON
object (default ``bench/results/latest.json``): each headline key is a ratio of medians of
interleaved repeats after warm-up, so the numbers hold on a shared, noisy machine. ``--quick``
shrinks every size so CI can check that the suite runs; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE), str(REPO)]

import ckpt_io  # noqa: E402
import gloo_scaling  # noqa: E402
import norm_layers  # noqa: E402
import quickstart_run  # noqa: E402
import train_steps  # noqa: E402
from harness import machine, median  # noqa: E402

# key: (comparison, target) -- "<= x" for times, ">= x" for throughputs.
TARGETS = {
    "dyt_over_rms_eager_fwdbwd": "<= 0.6",
    "dyt_over_rms_best_fwdbwd": "<= 1.0",
    "dyt_over_rms_eager_fwdbwd_fp32": "<= 1.0",
    "dyt_over_rms_best_fwdbwd_fp32": "<= 1.0",
    "fms_over_hf_step_eager": "<= 1.0",
    "fms_over_hf_step_compiled": "<= 0.8",
    "dyt_over_rms_step": "<= 1.0",
    "dyt_over_rms_step_compiled": "<= 1.0",
    "data_over_tokenizer": ">= 0.8",
    "ckpt_save_over_dd": ">= 0.5",
}


def meets(value: float, target: str) -> bool:
    op, bound = target.split()
    return value <= float(bound) if op == "<=" else value >= float(bound)


def data_ratio(quick: bool) -> tuple[dict, dict]:
    """The data pipeline over its tokenizer, from the data benchmark (bench/data_throughput.py)."""
    import data_throughput

    runs = [data_throughput.measure(quick=True) for _ in range(1 if quick else 6)]
    measured = runs if quick else runs[1:]  # the first run warms the corpus, caches and page cache
    ratios = [r["ratio"] for r in measured]
    return {"data_over_tokenizer": median(ratios)}, {"data": {"ratios": ratios, **{
        k: v for k, v in measured[-1].items() if k not in ("ratio", "tokenizer_tokens_per_s", "pipeline_tokens_per_s")
    }}}


def run_all(quick: bool, workdir: Path) -> dict:
    suites = [
        ("norm layers", norm_layers.measure),
        ("training steps", train_steps.measure),
        ("data pipeline", data_ratio),
        ("checkpoint", lambda q: ckpt_io.measure(workdir, q)),
        ("1 vs 2 gloo ranks", gloo_scaling.measure),
        ("quickstart", quickstart_run.measure),
    ]
    results, details = {}, {"machine_before": machine()}
    for name, fn in suites:
        t0 = time.perf_counter()
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        r, d = fn(quick)
        results.update(r)
        details.update(d)
        print(f"[bench] {name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    details["machine_after"] = machine()
    return {
        **results,
        "targets": {k: {"target": t, "met": meets(results[k], t)} for k, t in TARGETS.items()},
        "quick": quick,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/run.py" + (" --quick" if quick else ""),
        "details": details,
    }


def format_table(report: dict) -> str:
    lines = [f"{'benchmark':<36} {'value':>12}  {'target':<8} met"]
    for key, value in report.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            t = report["targets"].get(key)
            target, met = (t["target"], "yes" if t["met"] else "NO") if t else ("", "")
            lines.append(f"{key:<36} {value:>12.3f}  {target:<8} {met}")
    m = report["details"]["machine_before"]
    lines.append(f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, load {m['load_average']}"
                 + (" (quick mode: sizes too small to mean anything)" if report["quick"] else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/run.py", description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=HERE / "results" / "latest.json", help="JSON file to write")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repeats: checks that it runs")
    parser.add_argument("--workdir", type=Path, default=REPO / "runs",
                        help="where to write scratch checkpoints (the disk checkpoints go to; default runs/)")
    ns = parser.parse_args(argv)
    ns.workdir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="bench_", dir=ns.workdir))
    try:
        report = run_all(ns.quick, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(format_table(report))
    ns.output.parent.mkdir(parents=True, exist_ok=True)
    ns.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written: {ns.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
