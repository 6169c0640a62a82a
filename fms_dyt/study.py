"""``python -m fms_dyt.study norms|alpha0-width|final-scale [--seeds 2] [--preset cpu|gpu] [--jobs J] [--out DIR] [overrides...]``

Controlled comparisons, one command each (docs/science.md):

- ``norms``: with the same seeds (so the same initialisation and data order per seed) trains
  RMSNorm; DyT with the table's α₀ and the embedding scalar; DyT without the scalar; DyT with
  α₀ from a probe (``fms_dyt.tune alpha0``, run once first); Derf; DyT blocks with an RMSNorm
  final norm. Writes ``DIR/report.md``: the curves of every variant in one figure, a table of the
  final metric (mean and spread over seeds), tokens and wall time, and fms_dyt.analyze's figures.
- ``alpha0-width``: the paper's Table 5 question at small scale: the same α₀ probe at several
  widths (fixed depth), the best α₀ per width, and whether it falls with width.
- ``final-scale``: the output-scale question: all-DyT and RMSNorm at several widths over a grid of
  the final norm's initial scale (``norm.final_gamma0``: 1, the rule's ``auto`` value, half and
  twice it), the best γ₀ per width for each, a fixed logit multiplier in place of γ₀, and at the
  widest width each kind at its best learning rate of a small grid.

Runs whose run directory already holds its final checkpoint are not run again, so the same
command resumes an interrupted study. Overrides after the preset's apply to every run.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

from fms_dyt.metrics import read_metrics
from fms_dyt.norms import NORMS
from fms_dyt.probe import EXIT_FAILED, Metric, Probe, Result, read_metric, run_command, run_probes
from fms_dyt.tune import Tune, TuneError, add_metric_args, metric_of, parse_grid, tune_alpha0

FIRST_SEED = 2023  # the paper's seed; seed i of a study is FIRST_SEED + i


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: tuple[str, ...]


PROBED = "dyt_probed"  # its α₀ comes from the probe
# Every registered kind with its own config's defaults, then the paper's DyT questions against
# its RMSNorm baseline: deliberate comparisons of those two kinds, not a list of kinds.
NORM_VARIANTS = (
    *(Variant(kind, (f"norm={kind}",)) for kind in NORMS),
    Variant("dyt_no_scalar", ("norm=dyt", "norm.embedding_scale=false")),
    Variant(PROBED, ("norm=dyt",)),
    Variant("dyt_final_rmsnorm", ("norm=dyt", "norm.final=rmsnorm")),
    Variant("rmsnorm_auto", ("norm=rmsnorm", "norm.final_gamma0=auto")),
    Variant("dyt_auto", ("norm=dyt", "norm.final_gamma0=auto")),
)
# The α₀ question is asked of DyT blocks with a scale-free final norm: an all-DyT model at these
# widths saturates its final norm within ~30 steps whatever α₀ (docs/quickstart.md), which would
# hide the blocks' optimum. norm.final=null on the command line asks it of all-DyT models.
WIDTH_VARIANT = next(v for v in NORM_VARIANTS if v.name == "dyt_final_rmsnorm")


@dataclass(frozen=True)
class Preset:
    overrides: tuple[str, ...]  # model, data, schedule and logging of every run, before the user's
    steps: int  # of each norms run
    probe_steps: int  # of each α₀ probe of norms
    grid: tuple[float, ...]  # of that probe
    widths: tuple[int, ...]  # of alpha0-width; FFN width 3x
    width_steps: int  # of each probe of alpha0-width
    width_grid: tuple[float, ...]  # of alpha0-width: wider, as its optimum moves
    jobs: int  # runs at a time
    scale_steps: int = 100  # of each final-scale run (at the preset's widths)
    scale_lrs: tuple[float, ...] = (1e-3, 3e-3)  # final-scale's lr grid at the widest width (the preset's lr among them)


PRESETS = {
    # docs/science.md has the arithmetic and the measured wall times of both studies on this 2-core CPU.
    "cpu": Preset(
        overrides=("model=tiny", "model.dim=128", "model.ffn_dim=384", "tokenizer=sample", "model.vocab_size=8000",
                   "data=sample",
                   "train.seq_len=128", "train.micro_batch_size=1", "train.global_batch_tokens=2048",
                   "data.num_workers=16", "optim.lr=3e-3", "optim.warmup_steps=15", "parallel.param_dtype=float32",
                   "logging.interval=1", "logging.console_interval=25", "logging.telemetry_interval=10",
                   "validation.interval=25", "validation.tokens=8192"),
        steps=200, probe_steps=50, grid=(1.0, 2.0, 4.0),
        widths=(64, 128, 256), width_steps=100, width_grid=(1.0, 2.0, 4.0, 8.0), jobs=2),
    # One GPU per run, bf16 (the configs' default parallel.param_dtype); not run on the CPU test bed.
    "gpu": Preset(
        overrides=("model=small", "data=sample", "train.seq_len=1024", "train.micro_batch_size=16",
                   "train.global_batch_tokens=262144", "optim.lr=1e-3", "logging.interval=10",
                   "logging.console_interval=50", "logging.telemetry_interval=50",
                   "validation.interval=100", "validation.tokens=1048576"),
        steps=2000, probe_steps=300, grid=(0.25, 0.5, 1.0, 2.0, 4.0),
        widths=(256, 512, 1024), width_steps=500, width_grid=(0.25, 0.5, 1.0, 2.0, 4.0), jobs=1,
        scale_steps=2000, scale_lrs=(3e-4, 1e-3, 3e-3)),
}


@dataclass
class Study:
    out: Path
    preset: Preset
    overrides: list[str]  # the user's
    seeds: int
    metric: Metric
    jobs: int

    def base(self) -> list[str]:
        return [*self.preset.overrides, *self.overrides]

    def schedule(self, steps: int) -> list[str]:
        return [f"train.max_steps={steps}", f"checkpoint.interval={steps}"]

    def run(self, variant: Variant, seed: int, extra: Sequence[str] = ()) -> Probe:
        name = f"{variant.name}_seed{seed}"
        return Probe(name, [*self.base(), *variant.overrides, *extra, *self.schedule(self.preset.steps), f"seed={seed}"],
                     self.out / "runs" / name)

    def seed_list(self) -> list[int]:
        return [FIRST_SEED + i for i in range(self.seeds)]

    def tune(self, variant: Variant, out: Path, extra: Sequence[str] = ()) -> Tune:
        """The norms probe; with ``extra`` (a width) the alpha0-width probe."""
        grid, steps = ((self.preset.width_grid, self.preset.width_steps) if extra else
                       (self.preset.grid, self.preset.probe_steps))
        return Tune([*self.base(), *variant.overrides, *extra, f"seed={FIRST_SEED}"], list(grid), steps, out, self.metric)


# ---- norms ----------------------------------------------------------------------------------


def run_norms(study: Study, variants: Sequence[Variant], echo=print) -> dict:
    """Probe (once) if the probed variant is asked for, train every variant x seed, write the report."""
    probed, probe_error = [], None
    if any(v.name == PROBED for v in variants):
        try:
            summary = tune_alpha0(study.tune(next(v for v in variants if v.name == PROBED), study.out / "probe"),
                                  jobs=study.jobs, echo=echo)
            probed = summary["overrides_best"]
        except TuneError as e:
            probe_error = f"the α₀ probe failed: {e}"
            echo(probe_error)
    runs = {v.name: [study.run(v, s, probed if v.name == PROBED else ()) for s in study.seed_list()]
            for v in variants if not (v.name == PROBED and probe_error)}
    results = run_probes([p for ps in runs.values() for p in ps], study.metric, study.jobs, echo)
    by_name = {r.probe.name: r for r in results}
    rows = [variant_row(v.name, [by_name[p.name] for p in runs[v.name]]) if v.name in runs
            else {"variant": v.name, "error": probe_error} for v in variants]
    analysis = analyze_runs([by_name[ps[0].name] for ps in runs.values()], study.out / "analysis", echo)
    return write_report(study, rows, norms_report(study, rows, results, analysis, probed))


def write_report(study: Study, rows: list[dict], report: str) -> dict:
    """``report.md`` and ``summary.json`` (the rows) of a study; what ``main`` reads back."""
    study.out.mkdir(parents=True, exist_ok=True)
    (study.out / "report.md").write_text(report)
    (study.out / "summary.json").write_text(json.dumps({"metric": study.metric.describe(), "rows": rows}, indent=2) + "\n")
    return {"rows": rows, "report": study.out / "report.md"}


def variant_row(name: str, results: Sequence[Result]) -> dict:
    """Final metric over the seeds that gave one: mean, sample standard deviation, range; tokens and wall time."""
    values = [r.value for r in results if r.ok]
    walls = [r.wall_s for r in results if r.wall_s is not None]
    return {
        "variant": name, "seeds": len(results), "ok": len(values),
        "mean": statistics.fmean(values) if values else None,
        "sd": statistics.stdev(values) if len(values) > 1 else None,
        "range": max(values) - min(values) if len(values) > 1 else None,
        "tokens": max((t for r in results if (t := _last(r.probe.run_dir, "tokens_seen")) is not None), default=None),
        "wall_s": statistics.fmean(walls) if walls else None,
        "failed": [r.error for r in results if not r.ok],
    }


def _last(run_dir: Path, key: str) -> Optional[float]:
    return read_metric(run_dir, Metric(key, 1))[0]


def _fmt(v: Optional[float], digits: int = 3) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def norms_table(rows: Sequence[dict], metric: Metric) -> str:
    lines = [f"| variant | final {metric.key} (mean) | sd | range (max − min) | seeds ok | tokens trained | wall time per run |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "mean" not in r:
            lines.append(f"| {r['variant']} | FAILED | — | — | 0 | — | — |")
            continue
        tokens = "—" if r["tokens"] is None else f"{r['tokens']:,.0f}"
        wall = "—" if r["wall_s"] is None else f"{r['wall_s'] / 60:.1f} min"
        lines.append(f"| {r['variant']} | {_fmt(r['mean'])} | {_fmt(r['sd'])} | {_fmt(r['range'])} | "
                     f"{r['ok']}/{r['seeds']} | {tokens} | {wall} |")
    return "\n".join(lines)


def curves_figure(results: Sequence[Result], key: str):
    """``key`` against tokens for every run: one colour per variant, one line style per seed."""
    from matplotlib.figure import Figure

    import numpy as np

    from fms_dyt.analysis import figures as F

    variants = list(dict.fromkeys(r.probe.name.rsplit("_seed", 1)[0] for r in results))
    seeds = list(dict.fromkeys(r.probe.name.rsplit("_seed", 1)[1] for r in results))
    with F.style():
        fig = Figure(figsize=(10, 6), layout="constrained")
        ax = fig.subplots()
        drawn, tails = False, []  # the y-axis leaves out the first 10% of tokens, as fms_dyt.analyze's
        for r in results:
            variant, seed = r.probe.name.rsplit("_seed", 1)
            path = r.probe.run_dir / "metrics.jsonl"
            tokens, values = read_metrics(path).series(key) if path.is_file() else ([], [])
            if not tokens:
                continue
            y = F.smooth(np.asarray(values, float), F.default_window(len(values)))
            late = y[np.asarray(tokens) >= F.CLIP_FRACTION * max(tokens)]
            tails += [late.min(), late.max()]
            ax.plot(tokens, y, color=F.run_color(variants.index(variant)), ls=("-", "--", ":", "-.")[seeds.index(seed) % 4],
                    lw=1.8, label=f"{variant} (seed {seed})", gid="series")
            drawn = True
        ax.set_xlabel("tokens seen")
        ax.set_ylabel(key + (" (smoothed)" if not key.startswith("val/") else ""))
        ax.set_title(f"{key} of every variant and seed")
        if drawn:
            pad = 0.05 * ((max(tails) - min(tails)) or 1.0)
            ax.set_ylim(min(tails) - pad, max(tails) + pad)
            ax.legend(loc="upper right", ncols=2)
    return fig, drawn


def analyze_runs(results: Sequence[Result], out: Path, echo=print) -> dict:
    """fms_dyt.analyze on the first seed of every finished variant: its figures and notes."""
    from fms_dyt.analyze import analyze

    paths = [r.probe.run_dir for r in results if r.ok]
    if not paths:
        return {"figures": [], "notes": ["no finished run to analyze"]}
    try:
        a = analyze(paths, out)
    except Exception as e:  # the study's table stands without the figures; say why they are missing
        echo(f"fms_dyt.analyze failed: {type(e).__name__}: {e}")
        return {"figures": [], "notes": [f"fms_dyt.analyze failed: {type(e).__name__}: {e}"]}
    return {"figures": list(a.figures), "notes": a.notes}


def norms_report(study: Study, rows, results, analysis, probed) -> str:
    study.out.mkdir(parents=True, exist_ok=True)
    fig, drawn = curves_figure(results, study.metric.key)
    fig.savefig(study.out / "curves.png", dpi=110)
    telemetry = [f for f in analysis["figures"] if "telemetry" in f]
    failed = [f"- {r.probe.name}: {r.error}" for r in results if not r.ok]
    failed += [f"- {row['variant']}: {row['error']}" for row in rows if "error" in row]
    parts = [
        "# fms-dyt study: norms\n",
        f"Seeds {', '.join(map(str, study.seed_list()))}; each run "
        f"`python train.py {' '.join(study.base())} <variant> train.max_steps={study.preset.steps} seed=S`.",
        f"Ranked by {study.metric.describe()}.",
        f"Probed α₀ (`probe/alpha0.json`): `{' '.join(probed)}`.\n\n![α₀ probe](probe/alpha0.png)" if probed else "",
        "\n## Final table\n", norms_table(rows, study.metric),
        "\n## Curves\n", "![curves of every variant](curves.png)" if drawn
        else f"No run logged `{study.metric.key}`: no curves.",
        "\n## Figures of fms_dyt.analyze (first seed of every variant)\n",
        "\n".join(f"![{f}](analysis/{f})" for f in analysis["figures"]) or "none",
        "" if telemetry else "\nNo telemetry figures: this checkout's fms_dyt.analyze drew none "
                             "(no `telemetry/` keys in the runs, or no telemetry drawing).",
        "\n".join(f"- {n}" for n in analysis["notes"]),
    ]
    if failed:
        parts += ["\n## Failed runs\n", "\n".join(failed)]
    return "\n".join(p for p in parts if p) + "\n"


# ---- alpha0-width ---------------------------------------------------------------------------


def width_overrides(width: int) -> list[str]:
    return [f"model.dim={width}", f"model.ffn_dim={3 * width}"]


def run_alpha0_width(study: Study, widths: Sequence[int], echo=print) -> dict:
    """The α₀ probe at each width; the best per width, the table's value there, and the trend."""
    rows = []
    for w in widths:
        tune = study.tune(WIDTH_VARIANT, study.out / f"width{w}", width_overrides(w))
        try:
            s = tune_alpha0(tune, jobs=study.jobs, echo=echo)
            rows.append({"width": w, **s["best"], "joint_best": s["joint_best"], "table": table_alpha(w),
                         "figure": f"width{w}/alpha0.png"})
        except TuneError as e:
            echo(f"width {w}: {e}")
            rows.append({"width": w, "error": str(e)})
    return write_report(study, rows, width_report(study, rows))


def table_alpha(width: int) -> list[float]:
    """What the paper's table (configs/norm/dyt.yaml) gives at ``width``: [attention, other]."""
    from fms_dyt.config import load_config
    from fms_dyt.norms import alpha_from_table

    return list(alpha_from_table(load_config(["norm=dyt"]).norm.alpha_table, width))


def trend(rows: Sequence[dict], site: str) -> str:
    """Whether the best α₀ of ``site`` falls with width, as in the paper's Table 5."""
    best = [r[site] for r in sorted(rows, key=lambda r: r["width"]) if "error" not in r]
    if len(best) < 2:
        return "cannot tell (fewer than two widths gave a result)"
    if all(a == best[0] for a in best):
        return "does not move"
    if all(b <= a for a, b in zip(best, best[1:])):
        return "falls with width (as Table 5)"
    if all(b >= a for a, b in zip(best, best[1:])):
        return "rises with width (unlike Table 5)"
    return "moves both ways"


def width_report(study: Study, rows: Sequence[dict]) -> str:
    lines = ["| width | best α₀ attention | best α₀ FFN/final | joint best | table's α₀ (attn, other) |",
             "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['width']} | FAILED | — | — | — |")
        else:
            lines.append(f"| {r['width']} | {r['attn']:g} | {r['ffn']:g} | {r['joint_best']:g} | "
                         f"{r['table'][0]:g}, {r['table'][1]:g} |")
    good = [r for r in rows if "error" not in r]
    return "\n".join([
        "# fms-dyt study: best α₀ against width\n",
        f"Probe at every width: `python -m fms_dyt.tune alpha0 {' '.join(study.base())} "
        f"{' '.join(WIDTH_VARIANT.overrides)} model.dim=W model.ffn_dim=3W --grid "
        f"{','.join(f'{a:g}' for a in study.preset.width_grid)} --steps {study.preset.width_steps}`; ranked by "
        f"{study.metric.describe()}.\n",
        "\n".join(lines), "",
        f"- attention: the best α₀ {trend(good, 'attn')}",
        f"- FFN and final: the best α₀ {trend(good, 'ffn')}", "",
        *(f"![α₀ probe at width {r['width']}]({r['figure']})" for r in good),
        *(f"- width {r['width']} failed: {r['error']}" for r in rows if "error" in r),
    ]) + "\n"


# ---- final-scale ----------------------------------------------------------------------------

SCALE_KINDS = ("dyt", "rmsnorm")  # every norm DyT (the paper's model), and its RMSNorm twin
LOSS_MARGIN = 0.05  # all-DyT "matches" RMSNorm when its mean ends at most this far above
HALF_SATURATED = 0.5


def resolved(study: Study, overrides: Sequence[str]):
    from fms_dyt.config import load_config

    return load_config([*study.base(), *overrides])


def gamma_grid(study: Study, width: int) -> list[tuple[str, float]]:
    """(override, γ₀) of the grid at ``width``: 1, the rule's value (``auto``), half and twice it;
    a value that rounds to one already in the grid is left out."""
    from fms_dyt.config import final_gamma0

    auto = final_gamma0(resolved(study, [*width_overrides(width), "norm.final_gamma0=auto"]))
    grid: dict[float, str] = {round(auto, 3): "auto"}
    for value in (1.0, auto / 2, 2 * auto):
        grid.setdefault(round(value, 3), f"{value:.4g}")
    return sorted(((label, value) for value, label in grid.items()), key=lambda g: g[1])


def scale_variant(width: int, kind: str, gamma: str, extra: Sequence[str] = (), tag: str = "") -> Variant:
    return Variant(f"w{width}_{kind}_g{gamma}{tag}",
                   (*width_overrides(width), f"norm={kind}", f"norm.final_gamma0={gamma}", *extra))


def final_saturation(run_dir: Path) -> Optional[float]:
    """The largest fraction of saturated inputs over the norm sites at the run's last telemetry pass."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    passes = [[v for k, v in r.items() if k.startswith("telemetry/saturated/")] for r in read_metrics(path).records]
    return next((max(p) for p in reversed(passes) if p), None)


def run_final_scale(study: Study, widths: Sequence[int], echo=print) -> dict:
    """The γ₀ grid of both kinds at every width, the multiplier at ``auto``'s value (all-DyT), then
    the lr grid at the widest width with each kind's best γ₀; the report."""
    grids = {w: gamma_grid(study, w) for w in widths}
    auto = {w: next(v for label, v in grids[w] if label == "auto") for w in widths}
    gamma0 = {}  # variant name -> the output scale it starts with (γ₀, or γ₀ 1 times the multiplier)
    variants = []
    for w in sorted(widths, reverse=True):  # the slowest runs first
        for kind in SCALE_KINDS:
            for label, value in grids[w]:
                variants.append(scale_variant(w, kind, label))
                gamma0[variants[-1].name] = value
        variants.append(scale_variant(w, "dyt", "1", (f"model.output_multiplier={auto[w]:.4g}",), "_multiplier"))
        gamma0[variants[-1].name] = auto[w]
    rows = _scale_rows(study, variants, gamma0, echo)
    widest = max(widths)
    base_lr = resolved(study, []).optim.lr
    lr_variants = []
    for kind in SCALE_KINDS:
        best = _best(rows, widest, kind)
        if best is not None:
            for lr in study.preset.scale_lrs:
                if not math.isclose(lr, base_lr):
                    lr_variants.append(scale_variant(widest, kind, best["gamma_label"], (f"optim.lr={lr:g}",), f"_lr{lr:g}"))
                    gamma0[lr_variants[-1].name] = best["gamma0"]
    rows += _scale_rows(study, lr_variants, gamma0, echo)
    for r in rows:
        r["lr"] = next((float(o.split("=")[1]) for o in r["overrides"] if o.startswith("optim.lr=")), base_lr)
    return write_report(study, rows, scale_report(study, rows, widths, grids, base_lr))


def _scale_rows(study: Study, variants: Sequence[Variant], gamma0: dict[str, float], echo) -> list[dict]:
    runs = {v: [study.run(v, seed) for seed in study.seed_list()] for v in variants}
    results = {r.probe.name: r for r in run_probes([p for ps in runs.values() for p in ps], study.metric, study.jobs, echo)}
    rows = []
    for v, probes in runs.items():
        width, kind, gamma = v.name.split("_")[:3]
        done = [results[p.name] for p in probes]
        saturation = [final_saturation(p.run_dir) for p in probes]
        rows.append({**variant_row(v.name, done), "width": int(width[1:]), "kind": kind, "gamma_label": gamma[1:],
                     "multiplier": "_multiplier" in v.name, "overrides": list(v.overrides),
                     "gamma0": gamma0[v.name], "max_saturated": max((x for x in saturation if x is not None),
                                                                         default=None)})
    return rows


def _grid_rows(rows: Sequence[dict], width: int, kind: str) -> list[dict]:
    """The γ₀ grid of one kind at one width, at the preset's lr, in γ₀ order."""
    return sorted((r for r in rows if r["width"] == width and r["kind"] == kind and not r["multiplier"]
                   and not any(o.startswith("optim.lr=") for o in r["overrides"])), key=lambda r: r["gamma0"])


def _best(rows: Sequence[dict], width: int, kind: str) -> Optional[dict]:
    done = [r for r in _grid_rows(rows, width, kind) if r["mean"] is not None]
    return min(done, key=lambda r: r["mean"]) if done else None


def _mean_sd(r: Optional[dict]) -> str:
    if r is None or r["mean"] is None:
        return "FAILED"
    return f"{r['mean']:.3f} ± {_fmt(r['sd'])}" + (f" (range {r['range']:.3f})" if r["range"] is not None else "")


def _auto_row(rows: Sequence[dict], width: int, kind: str) -> Optional[dict]:
    return next((r for r in _grid_rows(rows, width, kind) if r["gamma_label"] == "auto"), None)


def scale_report(study: Study, rows: Sequence[dict], widths: Sequence[int], grids: dict, base_lr: float) -> str:
    study.out.mkdir(parents=True, exist_ok=True)
    key = study.metric.key
    grid_lines = [f"| width | γ₀ | all-DyT final {key} (mean ± sd) | all-DyT max saturated at the end | "
                  f"RMSNorm final {key} (mean ± sd) |", "|---|---|---|---|---|"]
    summary = ["| width | auto γ₀ | best γ₀ all-DyT | auto within a grid step? | best γ₀ RMSNorm | "
               "auto within a grid step? | all-DyT − RMSNorm at auto | at each one's best γ₀ | "
               "all-DyT at auto: max saturated |", "|---|---|---|---|---|---|---|---|---|"]
    verdicts = []
    for w in sorted(widths):
        dyt, rms = _grid_rows(rows, w, "dyt"), _grid_rows(rows, w, "rmsnorm")
        by_gamma = {r["gamma_label"]: r for r in rms}
        for r in dyt:
            label = "auto (" + f"{r['gamma0']:.3g})" if r["gamma_label"] == "auto" else r["gamma_label"]
            grid_lines.append(f"| {w} | {label} | {_mean_sd(r)} | {_pct(r['max_saturated'])} | "
                              f"{_mean_sd(by_gamma.get(r['gamma_label']))} |")
        labels = [label for label, _ in grids[w]]
        cells, auto_d, auto_r = [], _auto_row(rows, w, "dyt"), _auto_row(rows, w, "rmsnorm")
        for kind in SCALE_KINDS:
            best = _best(rows, w, kind)
            near = "—" if best is None else ("yes" if abs(labels.index(best["gamma_label"]) - labels.index("auto")) <= 1
                                             else "no")
            cells += ["—" if best is None else f"{best['gamma0']:.3g} ({best['mean']:.3f} ± {_fmt(best['sd'])})", near]
        gap = _gap(auto_d, auto_r)
        best_gap = _gap(_best(rows, w, "dyt"), _best(rows, w, "rmsnorm"))
        summary.append(f"| {w} | {grids[w][labels.index('auto')][1]:.3g} | {' | '.join(cells)} | {_signed(gap)} | "
                       f"{_signed(best_gap)} | {_pct(auto_d and auto_d['max_saturated'])} |")
        if gap is not None:
            saturated = auto_d["max_saturated"]
            ok = gap <= LOSS_MARGIN and saturated is not None and saturated <= HALF_SATURATED
            verdicts.append(f"- width {w}: all-DyT with `norm.final_gamma0=auto` ends {gap:+.3f} nats from RMSNorm "
                            f"with the same setting, at most {_pct(auto_d['max_saturated'])} of a site saturated: "
                            + ("**matches** (within +{:.2f}, at most half saturated)".format(LOSS_MARGIN) if ok
                               else "**does not match**"))
    multiplier = ["| width | γ₀ = auto, learned (mean ± sd) | γ₀ = 1 and a fixed multiplier of the same value |",
                  "|---|---|---|"]
    for w in sorted(widths):
        fixed = next((r for r in rows if r["width"] == w and r["multiplier"]), None)
        multiplier.append(f"| {w} | {_mean_sd(_auto_row(rows, w, 'dyt'))} | {_mean_sd(fixed)} |")
    widest = max(widths)
    lr_lines = [f"| kind | γ₀ (its best) | lr | final {key} (mean ± sd) |", "|---|---|---|---|"]
    best_at_lr = {}
    for kind in SCALE_KINDS:
        best = _best(rows, widest, kind)
        if best is None:
            continue
        tried = [r for r in rows if r["width"] == widest and r["kind"] == kind and not r["multiplier"]
                 and r["gamma_label"] == best["gamma_label"]]
        for r in sorted(tried, key=lambda r: r["lr"]):
            lr_lines.append(f"| {kind} | {r['gamma0']:.3g} | {r['lr']:g} | {_mean_sd(r)} |")
        done = [r for r in tried if r["mean"] is not None]
        best_at_lr[kind] = min(done, key=lambda r: r["mean"]) if done else None
    lr_gap = _gap(best_at_lr.get("dyt"), best_at_lr.get("rmsnorm"))
    figures = []
    for w in sorted(widths):
        chosen = [r for r in rows if r["width"] == w and not r["multiplier"] and r["lr"] == base_lr
                  and r["gamma_label"] in ("1", "auto")]
        results = [Result(study.run(Variant(r["variant"], tuple(r["overrides"])), seed), None)
                   for r in chosen for seed in study.seed_list()]
        fig, drawn = curves_figure(results, study.metric.key)
        if drawn:
            fig.savefig(study.out / f"curves_w{w}.png", dpi=110)
            figures.append(f"![width {w}: γ₀ 1 and auto, both kinds](curves_w{w}.png)")
    failed = [f"- {r['variant']}: {e}" for r in rows for e in r["failed"]]
    parts = [
        "# fms-dyt study: the output scale (norm.final_gamma0)\n",
        f"Seeds {', '.join(map(str, study.seed_list()))}; each run `python train.py {' '.join(study.base())} "
        f"model.dim=W model.ffn_dim=3W norm=KIND norm.final_gamma0=G train.max_steps={study.preset.steps} seed=S`, "
        f"lr {base_lr:g} unless the row says otherwise. Ranked by {study.metric.describe()}. `auto` is "
        "max(1, 0.02·√4096 / (init_std·√W)): the initial logit scale of the paper's width-4096 model.\n",
        "## The grid\n", "\n".join(grid_lines),
        "\n## Per width\n", "\n".join(summary), "", "\n".join(verdicts),
        "\n## A fixed logit multiplier instead of a larger γ₀ (all-DyT)\n", "\n".join(multiplier),
        f"\n## Learning rate at width {widest}, each kind at its best γ₀\n", "\n".join(lr_lines),
        "" if lr_gap is None else f"\nAt each one's best lr: all-DyT − RMSNorm = {lr_gap:+.3f} nats.",
        "\n## Curves\n", "\n".join(figures) or "no run logged the metric: no curves",
    ]
    if failed:
        parts += ["\n## Failed runs\n", "\n".join(failed)]
    return "\n".join(p for p in parts if p is not None) + "\n"


def _gap(dyt: Optional[dict], rms: Optional[dict]) -> Optional[float]:
    if dyt is None or rms is None or dyt["mean"] is None or rms["mean"] is None:
        return None
    return dyt["mean"] - rms["mean"]


def _signed(v: Optional[float]) -> str:
    return "—" if v is None else f"{v:+.3f}"


def _pct(fraction: Optional[float]) -> str:
    return "—" if fraction is None else f"{100 * fraction:.0f}%"


# ---- command line ---------------------------------------------------------------------------


def parse_args(argv: Optional[list[str]] = None):
    p = argparse.ArgumentParser(prog="python -m fms_dyt.study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", choices=["norms", "alpha0-width", "final-scale"])
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run, after the preset's")
    p.add_argument("--seeds", type=int, default=2, help="seeds per variant (norms; default 2)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="run sizes (default cpu)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default runs/study_<study>)")
    p.add_argument("--variants", default=None,
                   help=f"norms: a comma-separated subset of {','.join(v.name for v in NORM_VARIANTS)} (default all)")
    p.add_argument("--widths", default=None,
                   help="alpha0-width, final-scale: comma-separated widths (default: the preset's)")
    p.add_argument("--steps", type=int, default=None, help="steps per study run (default: the preset's)")
    p.add_argument("--probe-steps", type=int, default=None, help="steps per α₀ probe of this study (default: the preset's)")
    p.add_argument("--grid", default=None, help="α₀ values of this study's probes (default: the preset's)")
    add_metric_args(p)
    p.set_defaults(jobs=None)
    ns = p.parse_intermixed_args(argv)
    preset = PRESETS[ns.preset]
    for flag, value in (("--steps", ns.steps), ("--probe-steps", ns.probe_steps)):
        if value is not None and value < 1:
            p.error(f"{flag}={value} must be at least 1")
    try:
        grid = None if ns.grid is None else tuple(parse_grid(ns.grid))
    except ValueError as e:
        p.error(str(e))
    probe = ("width_grid", "width_steps") if ns.study == "alpha0-width" else ("grid", "probe_steps")
    default_steps = preset.scale_steps if ns.study == "final-scale" else preset.steps
    preset = replace(preset, steps=ns.steps or default_steps, **{probe[0]: grid or getattr(preset, probe[0]),
                                                                probe[1]: ns.probe_steps or getattr(preset, probe[1])})
    if ns.seeds < 1:
        p.error(f"--seeds={ns.seeds} must be at least 1 (2 or more give a spread)")
    ns.jobs = preset.jobs if ns.jobs is None else ns.jobs
    metric = metric_of(p, ns)
    names = {v.name: v for v in NORM_VARIANTS}
    chosen = [] if ns.variants is None else [s.strip() for s in ns.variants.split(",") if s.strip()]
    unknown = [c for c in chosen if c not in names]
    if unknown or (ns.variants is not None and not chosen):
        p.error(f"--variants={ns.variants!r}: choose from {','.join(names)}")
    ns.variant_list = [names[c] for c in chosen] if chosen else list(NORM_VARIANTS)
    try:
        ns.width_list = preset.widths if ns.widths is None else [int(w) for w in ns.widths.split(",")]
    except ValueError:
        p.error(f"--widths={ns.widths!r}: give comma-separated integers, e.g. 64,128,256")
    if any(w < 8 or w % 8 for w in ns.width_list) or len(ns.width_list) < 1:
        p.error(f"--widths={ns.widths!r}: widths must be positive multiples of 8 (4 heads of an even size)")
    out = (ns.out or Path(f"runs/study_{ns.study.replace('-', '_')}")).resolve()
    return ns, Study(out, preset, ns.overrides, ns.seeds, metric, ns.jobs)


def main(argv: Optional[list[str]] = None) -> int:
    ns, study = parse_args(argv)
    studies = {"norms": lambda: run_norms(study, ns.variant_list),
               "alpha0-width": lambda: run_alpha0_width(study, ns.width_list),
               "final-scale": lambda: run_final_scale(study, ns.width_list)}
    done, code = run_command("fms_dyt.study", studies[ns.study], TuneError)
    if code:
        return code
    print(f"report: {done['report']}")
    failed = [r for r in done["rows"] if "error" in r or r.get("ok") == 0]
    if len(failed) == len(done["rows"]):
        print("fms_dyt.study: every variant failed; see the report", file=sys.stderr)
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
