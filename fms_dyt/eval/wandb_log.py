"""An evaluation report into W&B: into the training run when known, else a run of its own."""

from __future__ import annotations

import os
from pathlib import Path

from fms_dyt.eval.report import Report


def log_wandb(report: Report, mode: str, project: str | None) -> str:
    """Log the scores: into the training run (its id from <run_dir>/wandb_id), else a new run.

    Returns the run's local folder. Scores are logged against ``eval/step`` (the training step) so
    they plot next to the training curves without disturbing W&B's own step counter. Run it after
    training has finished: W&B takes one writer per run.
    """
    import wandb

    ck = report["checkpoint"]
    train_cfg = report.get("training_config") or {}
    wandb_cfg = (train_cfg.get("logging") or {}).get("wandb") or {}
    if mode == "auto":
        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    run_dir = Path(ck["run_dir"]) if ck.get("run_dir") else None
    id_file = run_dir / "wandb_id" if run_dir is not None else None
    run_id = id_file.read_text().strip() if id_file is not None and id_file.is_file() else None
    common = dict(project=project or wandb_cfg.get("project") or "fms-dyt", entity=wandb_cfg.get("entity"), mode=mode)
    if run_id:
        run = wandb.init(id=run_id, resume="allow", dir=str(run_dir), **common)
    else:
        run = wandb.init(
            name=f"eval-{Path(ck['path']).name}", job_type="eval", dir=str(run_dir or Path.cwd()),
            config={"checkpoint": ck, "model": report["model"], "evaluation": report["evaluation"]}, **common,
        )
    run.define_metric("eval/step")
    run.define_metric("eval/*", step_metric="eval/step")
    scores = {f"eval/{r['task']}/{r['metric']}": r["value"] for r in report["rows"]}
    avg = report["averages"]
    scores["eval/avg_primary"] = avg["primary_mean"]["value"]
    scores["eval/avg_openllama"] = avg["openllama_mean"]["value"]
    scores["eval/step"] = ck.get("step") or 0
    primary = avg["primary_mean"]["metrics"]
    table = wandb.Table(
        columns=["task", "metric", "value", "stderr", "primary"],
        data=[[r["task"], r["metric"], r["value"], r["stderr"], primary[r["task"]] == r["metric"]] for r in report["rows"]],
    )
    run.log({**scores, "eval/zero_shot": table})
    # Also as summary values: W&B drops history rows that a resumed run logs below its last step
    # (an offline run synced into the training run), but never summary updates.
    run.summary.update(scores)
    where = str(Path(run.dir).parent)  # the run's folder (run.dir is its files/ subfolder)
    run.finish()
    return where
