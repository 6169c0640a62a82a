"""The issue's resume check on real data: torchrun, 2 ranks, SIGKILL after step 10, same losses after."""

import subprocess
import sys
import time
from pathlib import Path

import psutil
from helpers import losses

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["experiment=quickstart", "train.max_steps=14", "checkpoint.interval=4", "logging.wandb.mode=disabled",
        "train.seq_len=64", "train.micro_batch_size=4"]


def torchrun(run_dir, *extra, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "train.py", *ARGS, f"run_dir={run_dir}", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def test_sigkill_after_step_10_then_same_losses_and_continue_on_one_process(tmp_path):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    out, _ = torchrun(ref).communicate(timeout=600)
    assert sorted(losses(ref)) == list(range(1, 15)), out

    proc = torchrun(killed)
    deadline = time.time() + 600
    while not (killed / "metrics.jsonl").exists() or 10 not in losses(killed):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.05)
    # torchrun and both ranks (torchrun puts workers in sessions of their own): no chance to save.
    tree = psutil.Process(proc.pid)
    for p in [tree, *tree.children(recursive=True)]:
        p.kill()
    proc.wait()
    assert max(losses(killed)) < 14

    out, _ = torchrun(killed).communicate(timeout=600)
    assert "resumed from" in out and "step 8" in out, out
    again, expected = losses(killed), losses(ref)
    for step in range(11, 15):
        assert again[step] == expected[step], (step, again[step], expected[step])

    # The same run dir continues on one process, to a later step.
    out, _ = torchrun(killed, "train.max_steps=16", nproc=1).communicate(timeout=600)
    assert "resumed from" in out and "step 14" in out, out
    assert sorted(losses(killed)) == list(range(1, 17))


def test_sigterm_checkpoints_the_current_step_and_exits_75(tmp_path):
    run_dir = tmp_path / "stopped"
    cmd = [sys.executable, "train.py", *ARGS, "train.max_steps=400", f"run_dir={run_dir}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while not (run_dir / "metrics.jsonl").exists() or 3 not in losses(run_dir):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.05)
    proc.terminate()
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, out
    last = max(losses(run_dir))
    assert 3 <= last < 400
    assert (run_dir / "checkpoints" / f"step_{last}" / "meta.json").is_file(), out
