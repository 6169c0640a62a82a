"""What ``python -m fms_dyt.analyze`` reads from a run: config, metrics log, checkpoint, eval results.

A RUN argument is a training run directory (``config.yaml``, ``metrics.jsonl``, ``checkpoints/``),
one of its ``checkpoints/step_<N>`` directories, or a directory written by ``fms_dyt.export``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from fms_dyt.checkpoint import complete_checkpoints
from fms_dyt.eval.report import REPORT_ERRORS, primary_scores, read_report
from fms_dyt.metrics import Metrics, read_metrics
from fms_dyt.norms import NORMS, NormArgs

log = logging.getLogger("fms_dyt.analyze")

class AnalysisError(ValueError):
    """A RUN or option the analysis cannot use; the message says which and what to do."""


def norm_name(norm: NormArgs) -> str:
    """"DyT", or "DyT, final RMSNorm" when the final norm is of another kind."""
    # a kind this version does not know (a run of another version) by its key
    name, final = (NORMS[k].display_name if k in NORMS else k for k in (norm.kind, norm.kind_at("final")))
    return name if final == name else f"{name}, final {final}"


def norm_label(norm: NormArgs) -> str:
    """The norm and its α₀ per site, for legends and titles."""
    alpha0 = norm.alpha0()
    if not alpha0:
        return norm_name(norm)
    if len(alpha0) == 3 and alpha0["ffn"] == alpha0["final"]:
        return f"{norm_name(norm)} α₀ attn {alpha0['attn']:g}, other {alpha0['ffn']:g}"
    return f"{norm_name(norm)} α₀ " + ", ".join(f"{site} {a:g}" for site, a in alpha0.items())


@dataclass
class EvalResult:
    """What the analysis shows of one results file of ``eval/zero_shot.py`` (``fms_dyt.eval.report.Report``)."""

    path: Path
    step: Optional[int]
    limit: Optional[float]
    tasks: list[str]
    primary: dict[str, tuple[str, float]]  # task -> (metric, value)
    primary_mean: float
    primary_n: int
    openllama_mean: float
    openllama_n: int


@dataclass
class Run:
    """Everything the analysis knows about one RUN argument."""

    given: Path
    name: str  # short, unique among the runs analysed together
    norm: NormArgs
    run_dir: Optional[Path]  # None for exported directories
    checkpoint: Optional[Path]  # the checkpoint analysed; None when the run has none
    cfg: Optional[DictConfig]
    metrics: Metrics
    evals: list[EvalResult]
    eval_skipped: list[str]  # "file: reason" of results files that could not be read
    n_layers: int

    @property
    def step(self) -> Optional[int]:
        """Training step of the analysed checkpoint (None without one, or for exported models)."""
        return _step_of(self.checkpoint)

    @property
    def label(self) -> str:
        return f"{norm_label(self.norm)} · {self.name}"

    @property
    def is_pointwise(self) -> bool:
        """Whether any site is a point-wise norm (with an α)."""
        return bool(self.norm.pointwise_sites())


def load_run(path: str | Path) -> Run:
    """Read a run directory, a ``checkpoints/step_<N>`` directory or an exported directory."""
    path = Path(path)
    if not path.is_dir():
        raise AnalysisError(f"RUN {path} is not a directory (give a run dir, checkpoints/step_<N> or an exported dir)")
    if (path / "config.json").is_file():
        return _exported(path)
    if (path / "meta.json").is_file():
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
        cfg = _load_yaml(path / "config.yaml")
        name = f"{run_dir.name}@{path.name}" if run_dir is not None else path.name
        checkpoint = path
    elif (path / "config.yaml").is_file() or (path / "metrics.jsonl").is_file():
        run_dir, name = path, path.resolve().name
        found = complete_checkpoints(path)
        checkpoint = found[-1] if found else None
        # The trainer writes config.yaml first; a checkpoint holds a copy.
        cfg = _load_yaml(path / "config.yaml" if (path / "config.yaml").is_file() or checkpoint is None
                         else checkpoint / "config.yaml")
    else:
        raise AnalysisError(
            f"RUN {path} is not a training run (no config.yaml or metrics.jsonl), not a checkpoint "
            "(no meta.json) and not an exported model (no config.json)"
        )
    metrics = read_metrics(run_dir / "metrics.jsonl") if run_dir is not None else Metrics()
    step = _step_of(checkpoint)
    if path == checkpoint and step is not None:  # a chosen checkpoint: curves end where its weights were saved
        metrics.records = [r for r in metrics.records if r["step"] <= step]
    evals, skipped = read_evals(run_dir / "eval") if run_dir is not None else ([], [])
    return Run(given=path, name=name, norm=_norm_from_cfg(cfg), run_dir=run_dir, checkpoint=checkpoint, cfg=cfg,
               metrics=metrics, evals=evals, eval_skipped=skipped, n_layers=int(cfg.model.n_layers))


def load_runs(paths: list[str | Path]) -> list[Run]:
    """Load every RUN; names are made unique so that legends and file names tell runs apart."""
    runs = [load_run(p) for p in paths]
    seen: dict[str, int] = {}
    for run in runs:
        seen[run.name] = seen.get(run.name, 0) + 1
        if seen[run.name] > 1:
            run.name = f"{run.name}#{seen[run.name]}"
    return runs


def _exported(path: Path) -> Run:
    config = json.loads((path / "config.json").read_text())
    if "norm" not in config:  # a plain LLaMA export: RMSNorm
        norm, n_layers = NormArgs(kind="rmsnorm"), int(config["num_hidden_layers"])
    else:
        norm = NormArgs(**config["norm"])
        n_layers = int(config["model"]["n_layers"])
    return Run(given=path, name=path.resolve().name, norm=norm, run_dir=None, checkpoint=path, cfg=None,
               metrics=Metrics(), evals=[], eval_skipped=[], n_layers=n_layers)


def _load_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise AnalysisError(f"{path} is missing: the run's resolved config is needed to know its norm and model")
    return OmegaConf.load(path)


def _norm_from_cfg(cfg: DictConfig) -> NormArgs:
    from fms_dyt.config import norm_args

    return norm_args(cfg)


def read_evals(folder: Path) -> tuple[list[EvalResult], list[str]]:
    """Results files of ``eval/zero_shot.py`` in ``<run_dir>/eval/`` (its default ``--output``)."""
    results, skipped = [], []
    for f in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            report = read_report(f)
        except REPORT_ERRORS as e:
            skipped.append(f"{f.name}: {type(e).__name__}: {e}")
            log.warning("skipping %s: not a results file of eval/zero_shot.py (%s: %s)", f, type(e).__name__, e)
            continue
        avg = report["averages"]
        results.append(EvalResult(
            path=f,
            step=report["checkpoint"]["step"],
            limit=report["evaluation"]["limit"],
            tasks=list(report["tasks"]),
            primary=primary_scores(report),
            primary_mean=float(avg["primary_mean"]["value"]),
            primary_n=avg["primary_mean"]["n"],
            openllama_mean=float(avg["openllama_mean"]["value"]),
            openllama_n=avg["openllama_mean"]["n"],
        ))
    return results, skipped


def pick_eval(run: Run) -> Optional[EvalResult]:
    """The results to show for a run: those of its analysed checkpoint's step when they exist, else
    the latest step; at one step a full evaluation beats a ``--limit`` one."""
    if not run.evals:
        return None
    pool = [e for e in run.evals if e.step == run.step] or run.evals
    return max(pool, key=lambda e: (e.step or 0, e.limit is None, e.path.stat().st_mtime))


def _step_of(checkpoint: Optional[Path]) -> Optional[int]:
    if checkpoint is not None and (checkpoint / "meta.json").is_file():
        return json.loads((checkpoint / "meta.json").read_text()).get("step")
    return None


def final_loss(metrics: Metrics, last: int = 10) -> Optional[float]:
    """Mean training loss of the last ``last`` logged records with a finite loss."""
    _, losses = metrics.series("loss")
    tail = losses[-last:]
    return sum(tail) / len(tail) if tail else None


def final_val_loss(metrics: Metrics) -> Optional[tuple[int, float]]:
    """(step, val/loss) of the last record that measured it; None when the run never did."""
    for r in reversed(metrics.records):
        v = r.get("val/loss")
        if isinstance(v, (int, float)) and math.isfinite(v):
            return r["step"], v
    return None
