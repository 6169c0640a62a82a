"""The issue's resume check on real data: torchrun, 2 ranks, SIGKILL after step 10, same losses after."""

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["experiment=quickstart", "train.max_steps=14", "checkpoint.interval=4", "logging.wandb.mode=disabled",
        "train.seq_len=64", "train.micro_batch_size=4"]


def test_sigkill_after_step_10_then_same_losses_and_continue_on_one_process(tmp_path, killed_runs):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    out, _ = killed_runs.torchrun(ref, *ARGS).communicate(timeout=600)
    assert sorted(killed_runs.losses(ref)) == list(range(1, 15)), out

    killed_runs.kill_and_resume(killed, ARGS, kill_after=10, resume_step=8)
    again, expected = killed_runs.losses(killed), killed_runs.losses(ref)
    for step in range(11, 15):
        assert again[step] == expected[step], (step, again[step], expected[step])

    # The same run dir continues on one process, to a later step.
    out, _ = killed_runs.torchrun(killed, *ARGS, "train.max_steps=16", nproc=1).communicate(timeout=600)
    assert "resumed from" in out and "step 14" in out, out
    assert sorted(killed_runs.losses(killed)) == list(range(1, 17))


def test_sigterm_checkpoints_the_current_step_and_exits_75(tmp_path, killed_runs):
    run_dir = tmp_path / "stopped"
    cmd = [sys.executable, "train.py", *ARGS, "train.max_steps=400", f"run_dir={run_dir}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while not (run_dir / "metrics.jsonl").exists() or 3 not in killed_runs.losses(run_dir):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.05)
    proc.terminate()
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, out
    last = max(killed_runs.losses(run_dir))
    assert 3 <= last < 400
    assert (run_dir / "checkpoints" / f"step_{last}" / "meta.json").is_file(), out
