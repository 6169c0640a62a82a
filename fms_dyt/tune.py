"""``python -m fms_dyt.tune alpha0 <hydra overrides> [--grid 1,2,4] [--steps N] [--jobs J] [--out DIR]
[--launcher local|slurm] [--metric KEY] [--last K]``: the best DyT α₀ per site from short probes.

Each probe is ``python train.py <overrides> norm.alpha_attn=A norm.alpha_ffn=O norm.alpha_final=O
train.max_steps=N`` ("other" = FFN and final, as the paper's table and reference code tie them).
Locally, two rounds keep the probes few (``3G - 2`` for a grid of ``G``): the joint grid A = O,
then each site over the grid with the other held at the joint best. With ``--launcher slurm`` all
``G x G`` pairs go out as ONE Hydra multirun through the submitit launcher (a sweep cannot wait
for its own first round). Either way the pick is the same: the joint best, then per site the
lowest metric along its line through the joint best.

Writes to ``--out``: a run directory and log per probe, ``alpha0.json`` (every probe, the best
α₀ per site and the ``norm.alpha_table`` row it implies) and ``alpha0.png`` (metric against α₀).
Exit 0 when at least one probe gave a value; 1 when all failed; 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from fms_dyt.probe import TRAIN_PY, Metric, Probe, Result, default_last, result_of, run_command, run_probes

# the table's value below width 2048 (1) and the width-64 quickstart's best (4); 7 probes
DEFAULT_GRID = (1.0, 2.0, 4.0)
DEFAULT_STEPS = 50


class TuneError(RuntimeError):
    """The tune cannot give an answer (every probe failed, no DyT site); the message says why."""


@dataclass(frozen=True)
class Point:
    attn: float
    other: float  # FFN and final

    @property
    def name(self) -> str:
        # str(float): how Hydra writes the swept (float) values into the slurm sweep's subdir
        return f"attn{float(self.attn)}_other{float(self.other)}"

    def overrides(self) -> list[str]:
        return [f"norm.alpha_attn={self.attn:g}", f"norm.alpha_ffn={self.other:g}", f"norm.alpha_final={self.other:g}"]


def joint_points(grid: Sequence[float]) -> list[Point]:
    return [Point(a, a) for a in grid]


def site_points(grid: Sequence[float], best: float) -> list[Point]:
    """Each site over the grid with the other at the joint best (the joint best itself is not repeated)."""
    return [Point(a, best) for a in grid if a != best] + [Point(best, o) for o in grid if o != best]


def full_grid(grid: Sequence[float]) -> list[Point]:
    return [Point(a, o) for a in grid for o in grid]


def _lowest(values: dict[Point, float], keep: Callable[[Point], bool]) -> Optional[Point]:
    line = [p for p in values if keep(p)]
    return min(line, key=lambda p: values[p]) if line else None


def pick(values: dict[Point, float]) -> tuple[Point, float, float]:
    """(joint best, best attention α₀, best other α₀) from the probes that gave a value. Ties go to
    the probe listed first."""
    joint = _lowest(values, lambda p: p.attn == p.other)
    if joint is None:
        raise TuneError("no probe of the joint grid (attn = other) gave a value; see the failed probes above")
    attn = _lowest(values, lambda p: p.other == joint.other)
    other = _lowest(values, lambda p: p.attn == joint.attn)
    return joint, attn.attn, other.other


@dataclass
class Tune:
    """One α₀ tune: the base overrides, the grid, the probes' length and where they go."""

    overrides: list[str]
    grid: list[float]
    steps: int
    out: Path
    metric: Metric

    def probe(self, point: Point) -> Probe:
        return Probe(point.name, [*self.overrides, *point.overrides(), *self.probe_overrides()],
                     self.out / "probes" / point.name)

    def probe_overrides(self) -> list[str]:
        # the only checkpoint is the last one (resume and finished() need it)
        return [f"train.max_steps={self.steps}", f"checkpoint.interval={self.steps}"]

    def slurm_command(self) -> list[str]:
        """ONE Hydra multirun over all G x G pairs, one Slurm job each, into the same probe directories."""
        values = ",".join(f"{a:g}" for a in self.grid)
        return [sys.executable, str(TRAIN_PY), "-m", "hydra/launcher=submitit_slurm", "+hydra/slurm=alpha0",
                *self.overrides, f"norm.alpha_attn={values}", f"norm.alpha_ffn={values}",
                "norm.alpha_final=${norm.alpha_ffn}", *self.probe_overrides(), "logging.wandb.mode=disabled",
                f"hydra.sweep.dir={self.out / 'probes'}",
                "hydra.sweep.subdir=attn${norm.alpha_attn}_other${norm.alpha_ffn}"]


def check_config(overrides: Sequence[str]):
    """The configuration the overrides give, checked as train.py checks it; it must have a DyT site."""
    from fms_dyt.config import load_config, norm_args

    cfg = load_config(list(overrides))
    if not norm_args(cfg).alpha0():
        raise TuneError(f"no norm site is DyT with the overrides {' '.join(overrides) or '(none)'}; "
                        "α₀ is DyT's: give norm=dyt")
    return cfg


def run_local(tune: Tune, jobs: int, echo=print) -> dict[Point, Result]:
    """The joint round, then the per-site round around its best (skipped when the joint round all failed)."""
    joint = _run(tune, joint_points(tune.grid), jobs, echo)
    good = {p: r.value for p, r in joint.items() if r.ok}
    if not good:
        return joint
    best = min(good, key=good.get).attn
    return {**joint, **_run(tune, site_points(tune.grid, best), jobs, echo)}


def _run(tune: Tune, points: list[Point], jobs: int, echo) -> dict[Point, Result]:
    return dict(zip(points, run_probes([tune.probe(p) for p in points], tune.metric, jobs, echo)))


def run_slurm(tune: Tune, submit: bool, echo=print) -> Optional[dict[Point, Result]]:
    """Print the sweep command; with ``submit`` run it (it returns when every job has ended) and read the probes."""
    command = tune.slurm_command()
    echo("slurm sweep: " + shlex.join(command))
    if not submit:
        return None
    tune.out.mkdir(parents=True, exist_ok=True)
    code = subprocess.call(command)
    if code:
        echo(f"the sweep command exited with {code} (logs: {tune.out / 'probes' / '.submitit'}); reading what finished")
    return {p: result_of(tune.probe(p), tune.metric) for p in full_grid(tune.grid)}


def summarize(tune: Tune, results: dict[Point, Result], width: int, sites: list[str]) -> dict:
    """alpha0.json: every probe, the best α₀ per DyT site and the alpha_table row; TuneError when all failed."""
    values = {p: r.value for p, r in results.items() if r.ok}
    if not values:
        raise TuneError(f"all {len(results)} probes failed; read their logs:\n" +
                        "\n".join(f"  {p.name}: {r.error}" for p, r in results.items()))
    joint, attn, other = pick(values)
    best = {"attn": attn, "ffn": other, "final": other}
    return {
        "metric": tune.metric.key, "reduction": tune.metric.describe(), "steps": tune.steps, "grid": tune.grid,
        "overrides": tune.overrides, "width": width,
        "joint_best": joint.attn, "best": {site: best[site] for site in sites},
        "alpha_table_row": [width, attn, other],
        "overrides_best": Point(attn, other).overrides(),
        "probes": [{"name": p.name, "attn": p.attn, "other": p.other, "value": r.value, "error": r.error,
                    "run_dir": str(r.probe.run_dir), "log": str(r.probe.log), "wall_s": r.wall_s}
                   for p, r in results.items()],
    }


def figure(summary: dict):
    """Metric against α₀: the joint line (attn = other) and each site's line through the joint best."""
    from matplotlib.figure import Figure

    from fms_dyt.analysis.figures import run_color, style

    probes = summary["probes"]
    j = summary["joint_best"]
    lines = (("joint (attn = other)", lambda p: p["attn"] == p["other"], "attn"),
             (f"attention (other = {j:g})", lambda p: p["other"] == j, "attn"),
             (f"FFN and final (attn = {j:g})", lambda p: p["attn"] == j, "other"))
    with style():
        fig = Figure(figsize=(8, 5), layout="constrained")
        ax = fig.subplots()
        finite = [p["value"] for p in probes if p["value"] is not None]
        for i, (label, keep, axis) in enumerate(lines):
            line = sorted((p for p in probes if keep(p)), key=lambda p: p[axis])
            ok = [p for p in line if p["value"] is not None]
            ax.plot([p[axis] for p in ok], [p["value"] for p in ok], marker="o", color=run_color(i), lw=2,
                    label=label, gid="series")
            failed = [p[axis] for p in line if p["value"] is None]
            if failed:
                ax.plot(failed, [max(finite)] * len(failed), "x", color=run_color(i), ms=10, mew=2, gid="series",
                        label=f"{label}: failed")
        ax.set_xscale("log", base=2)
        ax.set_xticks(summary["grid"], [f"{a:g}" for a in summary["grid"]])
        ax.set_xlabel("α₀")
        ax.set_ylabel(summary["reduction"])
        ax.set_title(f"α₀ probe, width {summary['width']}, {summary['steps']} steps: best "
                     + ", ".join(f"{s} {a:g}" for s, a in summary["best"].items()))
        ax.legend(loc="best")
    return fig


def parse_grid(text: str) -> list[float]:
    """``0.5,1,2,4`` -> sorted distinct positive values; ValueError naming what is wrong."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--grid={text!r}: give comma-separated numbers, e.g. 0.5,1,2,4") from None
    if len(values) < 2 or any(not (math.isfinite(v) and v > 0) for v in values):
        raise ValueError(f"--grid={text!r}: give at least two positive α₀ values, e.g. 0.5,1,2,4")
    return sorted(set(values))


def add_metric_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metric", default="val/loss", help="metrics.jsonl key ranked by, lowest wins (default val/loss)")
    p.add_argument("--last", type=int, default=None,
                   help="mean of the last K logged values of --metric (default: 1 for val/* keys, else 10)")
    p.add_argument("--jobs", type=int, default=1, help="probes at a time, locally (default 1)")


def metric_of(p: argparse.ArgumentParser, ns) -> Metric:
    """The checks both commands share (``--last``, ``--jobs``, the overrides); the ranking metric."""
    bad = [o for o in ns.overrides if "=" not in o and not o.startswith("~")]
    if bad:
        p.error(f"{bad[0]!r} is neither an option of {p.prog} nor a Hydra override key=value")
    if ns.last is not None and ns.last < 1:
        p.error(f"--last={ns.last} must be at least 1")
    if ns.jobs < 1:
        p.error(f"--jobs={ns.jobs} must be at least 1")
    return Metric(ns.metric, ns.last or default_last(ns.metric))


def parse_args(argv: Optional[list[str]] = None):
    p = argparse.ArgumentParser(prog="python -m fms_dyt.tune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["alpha0"], help="what to tune")
    p.add_argument("overrides", nargs="*", help="Hydra overrides of train.py, e.g. experiment=quickstart")
    p.add_argument("--grid", default=",".join(f"{a:g}" for a in DEFAULT_GRID), help="α₀ values (default 1,2,4)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"steps per probe (default {DEFAULT_STEPS})")
    p.add_argument("--out", type=Path, default=Path("runs/tune_alpha0"), help="output folder (default runs/tune_alpha0)")
    p.add_argument("--launcher", choices=["local", "slurm"], default="local")
    p.add_argument("--dry-run", action="store_true", help="slurm: print the sweep command, submit nothing")
    add_metric_args(p)
    ns = p.parse_intermixed_args(argv)
    try:
        grid = parse_grid(ns.grid)
    except ValueError as e:
        p.error(str(e))
    if ns.steps < 1:
        p.error(f"--steps={ns.steps} must be at least 1")
    return ns, Tune(ns.overrides, grid, ns.steps, ns.out.resolve(), metric_of(p, ns))


def tune_alpha0(tune: Tune, launcher: str = "local", jobs: int = 1, submit: bool = True, echo=print) -> Optional[dict]:
    """Run the probes, write alpha0.json and alpha0.png into ``tune.out``; returns the summary
    (None for a slurm dry run)."""
    cfg = check_config(tune.overrides)
    from fms_dyt.config import norm_args

    sites = list(norm_args(cfg).alpha0())
    results = run_local(tune, jobs, echo) if launcher == "local" else run_slurm(tune, submit, echo)
    if results is None:
        return None
    for p, r in results.items():
        if not r.ok:
            echo(f"FAILED {p.name}: {r.error}")
    summary = summarize(tune, results, cfg.model.dim, sites)
    tune.out.mkdir(parents=True, exist_ok=True)
    (tune.out / "alpha0.json").write_text(json.dumps(summary, indent=2) + "\n")
    from fms_dyt.analysis.figures import style

    with style():
        figure(summary).savefig(tune.out / "alpha0.png", dpi=110)
    return summary


def main(argv: Optional[list[str]] = None) -> int:
    ns, tune = parse_args(argv)
    summary, code = run_command("fms_dyt.tune", lambda: tune_alpha0(tune, ns.launcher, ns.jobs, submit=not ns.dry_run),
                                TuneError)
    if code:
        return code
    if summary is None:
        return 0
    for row in summary["probes"]:
        value = f"{row['value']:.4f}" if row["value"] is not None else "FAILED (" + row["error"] + ")"
        print(f"  α₀ attn {row['attn']:g}, other {row['other']:g}: {value}")
    print(f"best α₀ after {summary['steps']} steps ({summary['reduction']}): "
          + ", ".join(f"{s} {a:g}" for s, a in summary["best"].items()))
    print(f"norm.alpha_table row: {summary['alpha_table_row']}   (or: {' '.join(summary['overrides_best'])})")
    print(f"summary: {tune.out / 'alpha0.json'}\nfigure:  {tune.out / 'alpha0.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
