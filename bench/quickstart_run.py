"""Tokens/s of the README's quickstart (``python train.py experiment=quickstart``), cut short.

Runs the real command in a fresh run directory with W&B off and reads the trainer's own
``tokens_per_s`` from ``metrics.jsonl``; the first logging interval (start-up, first batches) is
left out of the median.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import median

REPO = Path(__file__).resolve().parent.parent


def measure(quick: bool = False) -> tuple[dict, dict]:
    steps, interval = (4, 2) if quick else (42, 6)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "quickstart"
        cmd = [sys.executable, "train.py", "experiment=quickstart", f"train.max_steps={steps}",
               f"logging.interval={interval}", f"run_dir={run_dir}", "logging.wandb.mode=disabled",
               f"checkpoint.interval={steps}"]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            raise RuntimeError(f"quickstart failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in records[1:]]
    return {"quickstart_tokens_per_s": median(rates)}, {
        "quickstart": {"command": " ".join(cmd[1:3]), "steps": steps, "logging_interval": interval, "tokens_per_s": rates}
    }
