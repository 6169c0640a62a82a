"""fms_dyt.failures without a cluster: which node a failed attempt blames and why, from the ranks'
own records and torchrun's report, and when the launcher must not retry. tests/test_slurm.py runs
the same decisions on a real Slurm."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fms_dyt import failures
from fms_dyt.failures import diagnose, torchrun_failures

REPO = Path(__file__).resolve().parents[1]
# torchrun's ChildFailedError summary as slurm/launch.sh's job log holds it (torch 2.x)
TORCHRUN_SIGKILL = """
[rank0]: RuntimeError: Connection closed by peer [127.0.0.1]:41000
============================================================
/work/train.py FAILED
------------------------------------------------------------
Failures:
  <NO_OTHER_FAILURES>
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-07_03:24:49
  host      : gpu-0042.cluster
  rank      : 1 (local_rank: 0)
  exitcode  : -9 (pid: 25497)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 25497
============================================================
"""


def record(rank, node, status="exited", **fields):
    return {"rank": rank, "node": node, "pid": 100 + rank, "time": 1000.0 + rank, "status": status, **fields}


def test_torchrun_summary_is_parsed():
    assert torchrun_failures(TORCHRUN_SIGKILL) == [{"node": "gpu-0042.cluster", "rank": 1, "exit_code": -9, "signal": "SIGKILL"}]
    assert torchrun_failures("no summary here\n") == []


def test_a_killed_rank_is_blamed_on_its_slurm_node_not_on_the_ranks_that_lost_it():
    ranks = [record(0, "node1", exit_code=1, message="Connection closed by peer"), record(1, "node2", status="running")]
    f = diagnose(ranks, torchrun_failures(TORCHRUN_SIGKILL), 1)
    assert (f["node"], f["signal"], f["reason"], f["exclude"]) == ("node2", "SIGKILL", "killed", True)
    # without torchrun's report, the rank that never said how it ended
    f = diagnose(ranks, [], 1)
    assert (f["node"], f["reason"], f["exclude"]) == ("node2", "killed", True)


def test_a_config_error_or_divergence_is_never_retried_and_names_the_message():
    ranks = [record(0, "node1", exit_code=2, message="optim.lr=-1.0 must be a finite number > 0"),
             record(1, "node2", exit_code=2, message="optim.lr=-1.0 must be a finite number > 0")]
    f = diagnose(ranks, [], 1)
    assert f["exit_code"] in failures.NOT_RETRIED and f["reason"] == "config" and "optim.lr" in f["message"]
    f = diagnose([record(0, "node1", exit_code=3, message="3 steps in a row")], [], 1)
    assert f["exit_code"] in failures.NOT_RETRIED and f["reason"] == "diverged"


def test_a_hang_blames_the_rank_whose_own_watchdog_could_not_run():
    waiting = record(0, "node1", exit_code=4, message="rank 0 hung", stalled_s=0.3)
    stopped = record(1, "node2", exit_code=4, message="rank 1 hung", stalled_s=23.0)
    f = diagnose([waiting, stopped], [], 1)
    assert (f["node"], f["reason"], f["exclude"]) == ("node2", "hang", True)
    # every watchdog ran: a deadlock with no single culprit; no node is left out
    f = diagnose([waiting, dict(stopped, stalled_s=0.5)], [], 1)
    assert f["reason"] == "hang" and not f["exclude"] and "no node is to blame alone" in f["message"]


def test_a_preflight_failure_names_the_bad_node():
    ranks = [record(0, "node1", exit_code=5, message="preflight: node node3 (rank 2) sees 7 GPU(s)",
                    bad_node="node3", bad_rank=2)]
    f = diagnose(ranks, [], 1)
    assert (f["node"], f["reason"], f["exclude"]) == ("node3", "preflight", True)


def test_failures_are_counted_in_the_run_directory(tmp_path):
    assert failures.failure_count(tmp_path) == 0
    (tmp_path / failures.RECORD).write_text(json.dumps({"failure": 1}) + "\n" + json.dumps({"failure": 2}) + "\n")
    assert failures.failure_count(tmp_path) == 2
    (tmp_path / "checkpoints" / "step_4").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_6").mkdir()
    (tmp_path / "checkpoints" / "step_4" / "meta.json").write_text("{}")
    assert failures.newest_checkpoint_step(tmp_path) == 4  # step_6 is not complete


def test_the_watchdog_dumps_every_thread_and_exits_4_when_no_step_finishes(tmp_path):
    script = f"""
import threading, time
from fms_dyt.watchdog import Watchdog
dog = Watchdog({str(tmp_path)!r}, rank=3, step_factor=5, min_s=1.5, startup_s=30)
dog._thread.start()
for step in range(1, 6):
    time.sleep(0.05)
    dog.step_done(step)
threading.Event().wait()  # the main thread hangs after step 5
"""
    env = dict(os.environ, FMS_DYT_ATTEMPT="77.0", PYTHONPATH=str(REPO))
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == failures.EXIT_HUNG, done.stderr
    assert 1.5 < time.monotonic() - start < 20
    stacks = (tmp_path / "failures" / "77.0" / "stacks_rank_3.txt").read_text()
    assert "rank 3" in stacks and "hung after step 5" in stacks
    assert 'File "<string>", line 9' in stacks, stacks  # where the main thread waits
    record = json.loads((tmp_path / "failures" / "77.0" / "rank_3.json").read_text())
    assert record["exit_code"] == 4 and record["reason"] == "hang" and record["step"] == 5


def test_a_main_thread_leaving_while_its_watchdog_fires_waits_for_the_stacks(tmp_path):
    # A stopped rank that runs again: its watchdog fires as its main thread leaves with its peers'
    # error. The dump is slowed here so the main thread reaches note_exit while it is being written.
    script = f"""
import faulthandler, sys, threading, time, types
from fms_dyt import failures, watchdog
writing = threading.Event()
def slow_dump(**kw):
    writing.set()
    time.sleep(1.0)
    faulthandler.dump_traceback(**kw)
watchdog.faulthandler = types.SimpleNamespace(dump_traceback=slow_dump)
dog = watchdog.current = watchdog.Watchdog({str(tmp_path)!r}, rank=1, step_factor=5, min_s=0.5, startup_s=30)
dog._thread.start()
for step in range(1, 4):
    time.sleep(0.05)
    dog.step_done(step)
writing.wait(30)
sys.exit(failures.note_exit({str(tmp_path)!r}, 1, RuntimeError("a peer closed its connection")))
"""
    env = dict(os.environ, FMS_DYT_ATTEMPT="78.0", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == failures.EXIT_HUNG, done.stderr  # the watchdog's exit, after its report
    stacks = (tmp_path / "failures" / "78.0" / "stacks_rank_1.txt").read_text()
    assert "rank 1" in stacks and "hung after step 3" in stacks and 'File "<string>"' in stacks, stacks
    record = json.loads((tmp_path / "failures" / "78.0" / "rank_1.json").read_text())
    assert record["reason"] == "hang" and record["step"] == 3, record


def test_preflight_names_the_node_whose_device_fails(monkeypatch):
    import torch

    from fms_dyt import preflight
    from fms_dyt.parallel import Dist

    monkeypatch.setenv("SLURMD_NODENAME", "node7")
    monkeypatch.setattr(preflight, "device_problem", lambda *a: "sees 7 GPU(s) for 8 rank(s) on the node")
    d = Dist(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))
    with pytest.raises(preflight.PreflightError, match="node7.*sees 7 GPU") as e:
        preflight.preflight(d, 10, 60, "1.0")
    assert e.value.bad_node == "node7" and e.value.exit_code == failures.EXIT_PREFLIGHT
