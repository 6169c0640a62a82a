"""Check that the quickstart visibly learns in DyT: three targets measured from two finished runs.

    python bench/quickstart_check.py RUN_DYT RUN_RMS

RUN_DYT is a DyT run of ``experiment=quickstart``, RUN_RMS the same command with ``norm=rmsnorm``
(same everything else). Both need every step's loss in ``metrics.jsonl`` (the quickstart logs
every step); RUN_DYT needs its final checkpoint. Prints each target with its measured value and
exits 1 when one fails:

1. smooth: the 10-step moving mean of the DyT loss never rises more than 0.3 nats above its lowest
   earlier value, counted from the end of the first 20% of steps;
2. gap: the DyT run's final loss (10-step mean) is within 0.1 nats of the RMSNorm run's;
3. saturation: at the end, no DyT layer has more than half of its inputs x with |αx| > 3
   (tanh(3) = 0.995), measured on the first batch of the run's own data loader.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

WINDOW = 10  # steps in the moving mean
SKIP_FRACTION = 0.2  # the first 20% of steps may rise (warmup)
MAX_RISE = 0.3  # nats
MAX_GAP = 0.1  # nats
SATURATION = 3.0  # |αx| above this is saturated
MAX_SATURATED = 0.5  # fraction of a layer's inputs


@dataclass
class Target:
    name: str
    value: float
    limit: float
    detail: str

    @property
    def ok(self) -> bool:
        return self.value <= self.limit

    def line(self) -> str:
        return f"{'PASS' if self.ok else 'FAIL'}  {self.name}: {self.value:.3f} (limit {self.limit:g}) {self.detail}"


def step_losses(run_dir: Path) -> dict[int, float]:
    """Loss by step from a run's ``metrics.jsonl`` (the last record of a step logged twice)."""
    from fms_dyt.metrics import read_metrics

    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"error: {path} does not exist; give the run directory of a finished quickstart")
    by_step = {r["step"]: r["loss"] for r in read_metrics(path).records if isinstance(r.get("loss"), (int, float))}
    if not by_step:
        raise SystemExit(f"error: {path} has no loss records")
    return by_step


def consecutive(by_step: dict[int, float], first: int, last: int, run_dir: Path) -> list[float]:
    """The losses of steps ``first..last``; a missing step is an error (it would bias the means)."""
    missing = [s for s in range(first, last + 1) if s not in by_step]
    if missing:
        raise SystemExit(f"error: {run_dir}/metrics.jsonl lacks the loss of {len(missing)} step(s) (first: "
                         f"{missing[0]}); the check needs steps {first}-{last}: train with logging.interval=1, "
                         "as the quickstart does")
    return [by_step[s] for s in range(first, last + 1)]


def moving_mean(losses: Sequence[float], window: int = WINDOW) -> list[float]:
    """Mean of the last ``window`` losses at each step from ``window`` on (index 0 is step ``window``)."""
    return [sum(losses[i - window:i]) / window for i in range(window, len(losses) + 1)]


def largest_rise(losses: Sequence[float], window: int = WINDOW, skip_fraction: float = SKIP_FRACTION) -> tuple[float, int]:
    """(largest rise of the moving mean above its lowest earlier value, the step where it peaks),
    counting only steps after the first ``skip_fraction`` of the run."""
    first = max(window, math.floor(skip_fraction * len(losses)) + 1)
    if first > len(losses):
        raise ValueError(f"{len(losses)} steps are too few for a {window}-step moving mean after "
                         f"{skip_fraction:.0%} of them")
    means = moving_mean(losses, window)[first - window:]
    rise, at, lowest = 0.0, first, means[0]
    for offset, m in enumerate(means):
        lowest = min(lowest, m)
        if m - lowest > rise:
            rise, at = m - lowest, first + offset
    return rise, at


def final_loss(losses: Sequence[float], window: int = WINDOW) -> float:
    return moving_mean(losses, window)[-1]


def saturation(run_dir: Path, batch_size: int = 4) -> dict[str, float]:
    """Fraction of inputs with |αx| > 3 at every DyT layer of the run's newest checkpoint."""
    import warnings

    import torch

    from fms_dyt.analysis.activations import analysis_batch, capture_norm_io
    from fms_dyt.analysis.runs import load_run
    from fms_dyt.inference import load_for_inference
    from fms_dyt.norms import DyT, norm_sites

    run = load_run(run_dir)
    if "dyt" not in run.norm.kinds() or run.checkpoint is None:
        raise SystemExit(f"error: {run_dir} must be a DyT run with a checkpoint (norm={run.norm.kind}, "
                         f"checkpoint={run.checkpoint})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model, _, _ = load_for_inference(run.checkpoint)
    transformer = model.model
    tokens, _, _ = analysis_batch(run, "run", batch_size, None, transformer.args.vocab_size)
    sites = [site for site, m in norm_sites(transformer).items() if isinstance(m, DyT)]  # not Derf's (αx + s)
    with torch.no_grad():
        captures = capture_norm_io(transformer, tokens, sites, max_tokens=tokens.numel())
    return {c.site: (c.alpha * c.x).abs().gt(SATURATION).float().mean().item() for c in captures}


def evaluate(dyt_losses: Sequence[float], rms_losses: Sequence[float],
             saturated: Optional[dict[str, float]]) -> list[Target]:
    rise, at = largest_rise(dyt_losses)
    dyt_final, rms_final = final_loss(dyt_losses), final_loss(rms_losses)
    targets = [
        Target("smooth: largest rise of the 10-step mean after the first 20% of steps", rise, MAX_RISE,
               f"(peak at step {at} of {len(dyt_losses)})"),
        Target("gap: DyT final loss minus RMSNorm's", dyt_final - rms_final, MAX_GAP,
               f"(DyT {dyt_final:.3f}, RMSNorm {rms_final:.3f}, 10-step means)"),
    ]
    if saturated is not None:
        worst = max(saturated, key=saturated.get)
        targets.append(Target(f"saturation: largest fraction of a DyT layer's inputs with |αx| > {SATURATION:g}",
                              saturated[worst], MAX_SATURATED, f"(at {worst})"))
    return targets


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dyt", type=Path, help="run directory of the DyT quickstart")
    ap.add_argument("run_rms", type=Path, help="run directory of the same command with norm=rmsnorm")
    args = ap.parse_args(argv)
    dyt_steps, rms_steps = step_losses(args.run_dyt), step_losses(args.run_rms)
    last = max(dyt_steps)
    if max(rms_steps) != last:
        print(f"error: the runs end at steps {last} and {max(rms_steps)}; compare runs of the same command",
              file=sys.stderr)
        return 2
    # Every DyT step counts (the rise); of the RMSNorm run only the final mean does.
    dyt = consecutive(dyt_steps, 1, last, args.run_dyt)
    rms = consecutive(rms_steps, last - WINDOW + 1, last, args.run_rms)
    saturated = saturation(args.run_dyt)
    print("saturated fraction (|αx| > 3) per DyT layer: "
          + ", ".join(f"{site} {frac:.3f}" for site, frac in saturated.items()))
    targets = evaluate(dyt, rms, saturated)
    for t in targets:
        print(t.line())
    return 0 if all(t.ok for t in targets) else 1


if __name__ == "__main__":
    sys.exit(main())
