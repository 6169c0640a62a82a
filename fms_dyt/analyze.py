"""``python -m fms_dyt.analyze RUN [RUN ...] --out DIR``: the paper's figures from your own runs.

RUN is a training run directory, one of its ``checkpoints/step_<N>`` directories, or a directory
written by ``python -m fms_dyt.export``. Writes PNG files and ``DIR/report.md`` embedding them:

- ``loss.png``: training loss against tokens for every run (smoothed line, logged points faint),
  labelled by norm and α₀, and the difference of each run to the first one (paper Figure 7);
- ``val_loss.png``: ``val/loss`` (held-out documents, the same for every run) against tokens, and
  each run's difference to the first one, when the runs measured it (``validation.interval``);
- ``alpha_<run>.png`` (DyT runs): α of every attention, FFN and final norm over training, and the
  learnable embedding scalar, from ``metrics.jsonl``;
- ``alpha_depth.png`` (DyT runs): α against depth at the analysed checkpoint;
- ``telemetry_<run>.png``: the ``telemetry/`` keys of ``metrics.jsonl`` over steps, one line per
  norm layer: input RMS, fraction of inputs saturated, α and mean |γ| (docs/analysis.md);
- ``norm_io_token_<run>.png`` and ``norm_io_channel_<run>.png``: each selected norm layer's input
  against its output before γ on a batch of the run's data, coloured by token and by channel
  (paper Figures 2 and 4), with each point-wise layer's function drawn over it (its class's
  ``formula``: tanh(αx) for DyT, erf(αx + s) for Derf);
- a Table-4-style results table in the report when ``eval/zero_shot.py`` results sit in
  ``<run_dir>/eval/*.json`` (its default ``--output``).

The checkpoint is loaded in one process on the CPU in float32 (``--device cuda`` to use a GPU);
``--no-checkpoint`` draws only what the metrics log holds.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from fms_dyt.analysis import figures as F
from fms_dyt.analysis.activations import (analysis_batch, capture_norm_io, checkpoint_alphas, parse_sites,
                                          token_namer)
from fms_dyt.analysis.report import FINAL_LOSS_RECORDS, figure_section, results_table, runs_table
from fms_dyt.analysis.runs import AnalysisError, Run, load_runs
from fms_dyt.errors import refuse
from fms_dyt.metrics import ALPHA_KEY

log = logging.getLogger("fms_dyt.analyze")


@dataclass
class Analysis:
    """What one analysis produced: figures by file name (saved in ``out``), the report, and what was left out."""

    out: Path
    figures: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def report(self) -> Path:
        return self.out / "report.md"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "run"


def _loss_curves(runs: list[Run], notes: list[str]) -> list[F.Curve]:
    curves = []
    for i, run in enumerate(runs):
        tokens, losses = run.metrics.series("loss")
        bad = sum(1 for r in run.metrics.records if "loss" in r and not (
            isinstance(r["loss"], (int, float)) and math.isfinite(r["loss"])))
        if bad:
            notes.append(f"{run.name}: {bad} non-finite logged loss(es) are not drawn (steps whose update was skipped)")
        if run.metrics.unreadable:
            notes.append(f"{run.name}: {run.metrics.unreadable} unreadable line(s) of metrics.jsonl skipped")
        if tokens:
            curves.append(F.Curve(run.label, F.run_color(i), np.asarray(tokens, float), np.asarray(losses, float)))
        else:
            notes.append(f"{run.name}: no logged training loss "
                         f"({'exported model' if run.run_dir is None else 'metrics.jsonl empty or missing'}): not in the loss plot")
    return curves


def _alpha_series(run: Run) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    keys = {k for r in run.metrics.records for k in r if ALPHA_KEY.match(k)} | {"alpha/final", "embedding_scale"}
    out = {}
    for key in sorted(keys):
        t, v = run.metrics.series(key)
        if t:
            out[key] = (np.asarray(t, float), np.asarray(v, float))
    return out


def _alpha_figure(run: Run, series: dict) -> "F.Figure":
    n = run.norm
    alpha0 = {"attn": n.alpha_attn, "ffn": n.alpha_ffn, "final": n.alpha_final}
    initial = math.sqrt(run.cfg.model.dim) if run.cfg is not None and run.cfg.norm.embedding_scale else None
    return F.alpha_training_figure(run.label, series, run.n_layers, alpha0, initial)


def analyze(paths: list, out, *, sites: Optional[str] = None, batch: str = "auto", batch_size: int = 4,
            seq_len: Optional[int] = None, max_tokens: int = 512, points: int = 4000, smooth: Optional[int] = None,
            device: str = "cpu", checkpoints: bool = True, seed: int = 0) -> Analysis:
    """Draw every figure the runs allow, save them as PNGs in ``out`` and write ``out/report.md``."""
    runs = load_runs(paths)
    site_lists = {r.name: parse_sites(sites, r.n_layers) for r in runs}  # a bad --sites fails before any work
    result = Analysis(Path(out))
    result.out.mkdir(parents=True, exist_ok=True)
    sections = [_loss_section(runs, result, smooth), _val_loss_section(runs, result)]

    alpha_files = []
    for run in runs:
        series = _alpha_series(run) if run.is_pointwise else {}
        if series:
            name = f"alpha_{_slug(run.name)}.png"
            result.figures[name] = _alpha_figure(run, series)
            alpha_files.append((f"α over training, {run.name}", name))
        elif run.is_pointwise:
            result.notes.append(f"{run.name}: point-wise norm run without α in metrics.jsonl: no α-over-training figure")

    telemetry_files = []
    for run in runs:
        series = run.metrics.telemetry()
        if series:
            name = f"telemetry_{_slug(run.name)}.png"
            result.figures[name] = F.telemetry_figure(run.label, series, run.n_layers)
            telemetry_files.append((f"telemetry of the norm sites, {run.name}", name))
        elif run.run_dir is not None:
            result.notes.append(f"{run.name}: no telemetry/ keys in metrics.jsonl (logging.telemetry_interval=null, "
                                "or a run from before telemetry): no telemetry figure")

    depth, io_files, batches = [], [], []
    if checkpoints:
        for i, run in enumerate(runs):
            if run.checkpoint is None:
                result.notes.append(f"{run.name}: no complete checkpoint: no input/output maps" +
                                    (" and no α against depth" if run.is_pointwise else ""))
                continue
            alphas, where = _checkpoint_figures(run, result, io_files, site_lists[run.name], batch=batch,
                                                batch_size=batch_size, seq_len=seq_len, max_tokens=max_tokens,
                                                points=points, device=device, seed=seed)
            batches.append(f"- {run.name} (checkpoint `{run.checkpoint}`): {where}")
            if alphas is not None:
                depth.append(F.DepthAlphas(run.label, F.run_color(i), alphas["attn"], alphas["ffn"], alphas["final"]))
    else:
        result.notes.append("--no-checkpoint: no input/output maps and no α against depth")

    if depth:
        result.figures["alpha_depth.png"] = F.alpha_depth_figure(depth)
        alpha_files.append(("α against depth", "alpha_depth.png"))
    sections.append(figure_section(
        "Learned α and the embedding scalar",
        "α is the single learnable scalar per point-wise norm layer, y = γ · tanh(α x) (DyT) or "
        "γ · erf(α x + s) + β (Derf). Over training: one line per "
        "layer, coloured by depth; dotted: α₀. Against depth: α at the analysed checkpoint.", alpha_files)
        if alpha_files else "")
    sections.append(figure_section(
        "Telemetry of the norm sites",
        "Every logging.telemetry_interval steps the trainer runs the model on one fixed micro-batch and records, per "
        "norm layer, the RMS of its input, and for point-wise norms (DyT) the fraction of inputs in the saturated "
        "range (|αx| > 2 for tanh), α and mean |γ|. One line per layer, coloured by depth: attention norms solid, "
        "FFN norms dashed, the final norm black. A saturated fraction near 1 or an input RMS that keeps growing "
        "is a run that has stopped learning through its norms (docs/analysis.md).", telemetry_files)
        if telemetry_files else "")
    sections.append(figure_section(
        "Norm layers: input against output",
        "Each panel: one norm layer's input x against its output before the γ scale (x / RMS(x) for RMSNorm, "
        "tanh(αx) for DyT, erf(αx + s) for Derf, with the function drawn), as in the paper's Figures 2 and 4. Grey: a random sample of all elements of "
        f"{max_tokens} random tokens of the batch. Coloured by token: every channel of four tokens spread over "
        "the range of their RMS (under RMSNorm each token is a straight line of slope 1/RMS). Coloured by channel: "
        "the three channels with the largest inputs and one median channel. The same tokens and channels are "
        "coloured in every panel.\n\nInputs:\n" + "\n".join(batches), io_files) if io_files else "")

    table = results_table(runs)
    sections.append("## Zero-shot results\n\n" + (
        table + "\n\nScores are lm-eval's, written by `eval/zero_shot.py`; final loss is the mean training loss "
        f"of the last {FINAL_LOSS_RECORDS} logged steps." if table else
        "No results files of `eval/zero_shot.py` in `<run_dir>/eval/*.json`; run "
        "`python eval/zero_shot.py RUN` to add the Table-4-style results table.") + "\n")

    with F.style():
        for name, fig in result.figures.items():
            fig.savefig(result.out / name, dpi=110)
    runs_list = "\n".join(f"- **{r.name}**: `{r.given}` ({r.label})" for r in runs)
    notes = "\n".join(f"- {n}" for n in result.notes)
    result.report.write_text(
        "# fms-dyt analysis\n\n" + runs_list + "\n\n" + runs_table(runs) + "\n\n" + "\n".join(filter(None, sections))
        + (f"\n## Left out\n\n{notes}\n" if notes else ""))
    return result


def _loss_section(runs: list[Run], result: Analysis, smooth: Optional[int]) -> str:
    curves = _loss_curves(runs, result.notes)
    if not curves:
        return ""
    result.figures["loss.png"] = F.loss_figure(curves, smooth)
    window = f"{smooth} logged points" if smooth else "about 1/20 of each run's logged points (at least 3)"
    return figure_section(
        "Training loss",
        f"Lines: centred moving average over {window}; points: every logged step. The y-axis leaves out the "
        f"first {F.CLIP_FRACTION:.0%} of each run's tokens, where the loss falls from ln(vocab). "
        + ("The lower panel shows each smoothed curve minus the first run's, on the tokens both runs have."
           if len(curves) > 1 else ""),
        [("training loss against tokens", "loss.png")])


def _val_loss_section(runs: list[Run], result: Analysis) -> str:
    curves = []
    for i, run in enumerate(runs):
        tokens, losses = run.metrics.series("val/loss")
        if tokens:
            curves.append(F.Curve(run.label, F.run_color(i), np.asarray(tokens, float), np.asarray(losses, float)))
    if not curves:
        return ""
    result.figures["val_loss.png"] = F.loss_figure(curves, 1, "validation loss",
                                                   "Validation loss (val/loss) on the held-out documents")
    return figure_section(
        "Validation loss",
        "`val/loss`: mean token cross-entropy on the same held-out windows for every run and world size "
        "(`validation.tokens`, see docs/analysis.md), measured every `validation.interval` steps and at the end."
        + (" The lower panel shows each run minus the first one." if len(curves) > 1 else ""),
        [("validation loss against tokens", "val_loss.png")])


def _checkpoint_figures(run: Run, result: Analysis, io_files: list, sites: list[str], *, batch, batch_size, seq_len,
                        max_tokens, points, device, seed) -> tuple[Optional[dict], str]:
    """The input/output maps of one run's checkpoint; returns its α (None without DyT) and where the batch came from."""
    import torch

    from fms_dyt.inference import load_for_inference

    log.info("%s: loading %s", run.name, run.checkpoint)
    with warnings.catch_warnings():  # DCP's note that it loads in one process: that is the intent
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        model, _, _ = load_for_inference(run.checkpoint)
    transformer = model.model.to(torch.device(device))
    tokens, where, from_run = analysis_batch(run, batch, batch_size, seq_len, transformer.args.vocab_size, seed)
    namer = token_namer(run) if from_run else None
    captures = capture_norm_io(transformer, tokens, sites, max_tokens, seed)
    for color_by in ("token", "channel"):
        name = f"norm_io_{color_by}_{_slug(run.name)}.png"
        result.figures[name] = F.norm_io_figure(run.label, captures, color_by, points, seed=seed, token_name=namer)
        io_files.append((f"norm input/output by {color_by}, {run.name}", name))
    return checkpoint_alphas(transformer), where


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fms_dyt.analyze", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN",
                   help="run dir, checkpoints/step_<N> dir or exported dir; the first is the reference of the loss difference")
    p.add_argument("--out", type=Path, required=True, help="folder for the PNGs and report.md (created)")
    p.add_argument("--sites", default=None,
                   help="norm layers of the input/output maps, e.g. attn:0,ffn:mid,attn:last,final "
                        "(default: attention and FFN norms of the first, middle and last layer, and the final norm)")
    p.add_argument("--batch", choices=("auto", "run", "random"), default="auto",
                   help="inputs of the maps: the run's data loader (run), random token ids (random), "
                        "or the run's data falling back to random tokens with a note (auto, the default)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences in that batch (default 4)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the run's, at most 512)")
    p.add_argument("--tokens", type=int, default=512, dest="max_tokens",
                   help="random tokens of the batch kept for the maps (default 512)")
    p.add_argument("--points", type=int, default=4000, help="grey background points per panel (default 4000)")
    p.add_argument("--smooth", type=int, default=None,
                   help="moving-average window of the loss curves, in logged points (default: about 1/20 of a run's points)")
    p.add_argument("--device", default="cpu", help="where the checkpoint runs: cpu (default), cuda, cuda:N")
    p.add_argument("--no-checkpoint", dest="checkpoints", action="store_false",
                   help="skip the checkpoint: no input/output maps, no α against depth")
    p.add_argument("--seed", type=int, default=0, help="seed of the token sample and the point subsampling")
    args = p.parse_args(argv)
    for key in ("batch_size", "max_tokens", "points"):
        if getattr(args, key) <= 0:
            p.error(f"--{key.replace('_', '-').replace('max-', '')}={getattr(args, key)} must be positive")
    if args.seq_len is not None and args.seq_len <= 0:
        p.error(f"--seq-len={args.seq_len} must be positive")
    if args.smooth is not None and args.smooth <= 0:
        p.error(f"--smooth={args.smooth} must be positive")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    options = {k: v for k, v in vars(args).items() if k not in ("runs", "out")}
    try:
        result = analyze(args.runs, args.out, **options)
    except (AnalysisError, FileNotFoundError, json.JSONDecodeError) as e:
        return refuse("fms_dyt.analyze", e)
    for name in result.figures:
        print(result.out / name)
    print(f"report: {result.report}")
    for note in result.notes:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
