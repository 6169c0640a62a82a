"""The markdown of ``report.md``: a table of the runs, the zero-shot results table and the figure sections."""

from __future__ import annotations

from typing import Optional, Sequence

from fms_dyt.analysis.runs import EvalResult, Run, final_loss, final_val_loss, norm_name, pick_eval

FINAL_LOSS_RECORDS = 10


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *map(line, rows)])


def _fmt(value: Optional[float], digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _tokens(n: Optional[int]) -> str:
    if n is None:
        return "—"
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.3g}{suffix}"
    return str(n)


def runs_table(runs: Sequence[Run]) -> str:
    """One column per run: norm, α₀, model shape, analysed checkpoint, tokens and final loss."""
    rows = {
        "norm": [], "α₀ (attention / FFN / final)": [], "model (width × layers)": [], "checkpoint": [],
        "logged steps": [], "tokens seen (last logged)": [], f"final loss (mean of last {FINAL_LOSS_RECORDS} logged)": [],
        "final val/loss (step)": [],
    }
    for run in runs:
        n = run.norm
        rows["norm"].append(norm_name(n))
        rows["α₀ (attention / FFN / final)"].append(
            " / ".join("—" if a is None else f"{a:g}" for a in (n.alpha_attn, n.alpha_ffn, n.alpha_final)))
        width = run.cfg.model.dim if run.cfg is not None else "?"
        rows["model (width × layers)"].append(f"{width} × {run.n_layers}")
        rows["checkpoint"].append("none" if run.checkpoint is None else
                                  f"step {run.step}" if run.step is not None else "exported model")
        recs = run.metrics.records
        rows["logged steps"].append(f"{recs[0]['step']}–{recs[-1]['step']} ({len(recs)})" if recs else "—")
        rows["tokens seen (last logged)"].append(_tokens(recs[-1].get("tokens_seen")) if recs else "—")
        rows[f"final loss (mean of last {FINAL_LOSS_RECORDS} logged)"].append(
            _fmt(final_loss(run.metrics, FINAL_LOSS_RECORDS)))
        val = final_val_loss(run.metrics)
        rows["final val/loss (step)"].append("—" if val is None else f"{val[1]:.3f} ({val[0]})")
    return _table(["", *(r.name for r in runs)], [[k, *v] for k, v in rows.items()])


def results_table(runs: Sequence[Run]) -> Optional[str]:
    """Table-4 style: zero-shot score and final loss per run, then each task's primary metric; None without evals."""
    picked: list[Optional[EvalResult]] = [pick_eval(r) for r in runs]
    if not any(picked):
        return None
    header = ["", *(r.label for r in runs)]
    rows = [
        ["primary average / final loss (as Table 4)",
         *(f"{e.primary_mean:.3f} / {_fmt(final_loss(r.metrics, FINAL_LOSS_RECORDS), 2)}" if e else "—"
           for r, e in zip(runs, picked))],
        ["average, primary metric per task", *(f"{e.primary_mean:.4f} ({e.primary_n} tasks)" if e else "—" for e in picked)],
        ["average, OpenLLaMA (all metric rows)", *(f"{e.openllama_mean:.4f} ({e.openllama_n} rows)" if e else "—" for e in picked)],
        ["evaluated step", *(str(e.step) + (f" (--limit {e.limit:g})" if e.limit is not None else "") if e else "—"
                             for e in picked)],
    ]
    tasks = list(dict.fromkeys(t for e in picked if e for t in e.tasks))
    for task in tasks:
        metrics = {e.primary[task][0] for e in picked if e and task in e.primary}
        name = f"{task} ({'/'.join(sorted(metrics))})"
        rows.append([name, *(f"{e.primary[task][1]:.4f}" if e and task in e.primary else "—" for e in picked)])
    notes = [f"- {r.name}: results from `{e.path}`" for r, e in zip(runs, picked) if e]
    notes += [f"- {r.name}: skipped `{s}`" for r in runs for s in r.eval_skipped]
    return _table(header, rows) + "\n\n" + "\n".join(notes)


def figure_section(title: str, text: str, files: Sequence[tuple[str, str]]) -> str:
    """A report section: heading, explanation and the PNGs (alt text, relative file name)."""
    body = "\n\n".join(f"![{alt}]({name})" for alt, name in files)
    return f"## {title}\n\n{text}\n\n{body}\n" if files else f"## {title}\n\n{text}\n"
