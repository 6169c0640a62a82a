"""Signals as a cluster and a user send them: SIGTERM to the whole process group (DataLoader
workers and W&B's process included) -> exit 75 with a checkpoint, Ctrl-C -> exit 130, and the same
command resumes with the losses of an uninterrupted run; submitit's SIGUSR2 -> every rank saves,
then submitit requeues."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import torch.multiprocessing as mp

from fms_dyt import stop as stop_module
from fms_dyt.config import load_config
from fms_dyt.trainer import main, train
from helpers import CountedBatches, losses

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8
ARGS = ["experiment=quickstart", "model.n_layers=2", f"train.max_steps={STEPS}", "train.seq_len=32",
        "train.micro_batch_size=2", "train.global_batch_tokens=128", "checkpoint.interval=100", "data.num_workers=2"]


def start(run_dir, *extra):
    return subprocess.Popen([sys.executable, "train.py", *ARGS, f"run_dir={run_dir}", *extra], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for_step(proc, run_dir, step):
    deadline = time.time() + 600
    while step not in losses(run_dir):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.05)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    out, _ = start(run_dir, "logging.wandb.mode=disabled").communicate(timeout=600)
    assert sorted(losses(run_dir)) == list(range(1, STEPS + 1)), out
    return losses(run_dir)


def _interrupt_then_resume(run_dir, signum, wandb_mode):
    proc = start(run_dir, f"logging.wandb.mode={wandb_mode}")
    wait_for_step(proc, run_dir, 2)
    workers = psutil.Process(proc.pid).children(recursive=True)
    assert workers, "the DataLoader workers should be running"
    # W&B's service runs in a session of its own; a cluster signals it too
    wandb_core = [p for p in psutil.process_iter(["cmdline"])
                  if p.info["cmdline"] and "wandb-core" in p.info["cmdline"][0] and str(proc.pid) in p.info["cmdline"]]
    for p in wandb_core:
        p.send_signal(signum)
    os.killpg(proc.pid, signum)  # the main process and its DataLoader workers, as Slurm and `timeout` do
    out, _ = proc.communicate(timeout=600)
    stopped_at = max(losses(run_dir))
    assert stopped_at < STEPS, out
    assert (run_dir / "checkpoints" / f"step_{stopped_at}" / "meta.json").is_file(), out
    assert "Traceback" not in out and "killed by signal" not in out, out
    first = proc.returncode, out

    again = start(run_dir, f"logging.wandb.mode={wandb_mode}")
    out2, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out2
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{stopped_at}'} (step {stopped_at}" in out2, out2
    return first, losses(run_dir), wandb_core


def test_sigterm_to_the_process_group_and_wandb_saves_exits_75_and_resumes_exactly(tmp_path, reference):
    (code, out), resumed, wandb_core = _interrupt_then_resume(tmp_path / "run", signal.SIGTERM, "offline")
    assert code == 75, out
    assert wandb_core, "W&B's service process should have been running (logging.wandb.mode=offline)"
    assert resumed == reference  # bit for bit, every step


def test_ctrl_c_saves_exits_130_and_resumes_exactly(tmp_path, reference):
    (code, out), resumed, _ = _interrupt_then_resume(tmp_path / "run", signal.SIGINT, "disabled")
    assert code == 130, out
    assert "press Ctrl-C again to stop at once" in out
    assert resumed == reference


def test_sigterm_to_one_dataloader_worker_alone_stops_the_run(tmp_path):
    run_dir = tmp_path / "run"
    proc = start(run_dir, "logging.wandb.mode=disabled")
    wait_for_step(proc, run_dir, 2)
    worker = psutil.Process(proc.pid).children()[0]
    worker.send_signal(signal.SIGTERM)  # the worker passes it on to the training process
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 75, out
    stopped_at = max(losses(run_dir))
    assert stopped_at < STEPS and (run_dir / "checkpoints" / f"step_{stopped_at}" / "meta.json").is_file(), out
    assert out.count("got SIGTERM") == 1, out


def test_second_ctrl_c_stops_at_once():
    before = signal.getsignal(signal.SIGINT)
    request = stop_module.StopRequest()
    try:
        os.kill(os.getpid(), signal.SIGINT)  # the first: a flag, the step goes on
        assert request.reason == stop_module.INTERRUPTED
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs here at the latest
    finally:
        request.restore()
    assert signal.getsignal(signal.SIGINT) is before


def test_a_second_ctrl_c_exits_130_with_one_line(monkeypatch, capsys):
    import fms_dyt.trainer as trainer

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "train", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        main(load_config(["experiment=quickstart", "run_dir=runs/x"]))
    assert exit_info.value.code == 130
    err = capsys.readouterr().err
    assert "stopped at once by a second Ctrl-C" in err and "runs/x/checkpoints" in err and "Traceback" not in err


# --- submitit (Hydra's submitit launcher): SIGUSR2, its handler requeues on rank 0 ---------------

class Batches:
    """Fixed random batches; sends SIGUSR2 to its own process before batch ``signal_at``."""

    def __init__(self, rank, world, signal_at):
        self.rank, self.world, self.signal_at, self.i = rank, world, signal_at, 0

    def __iter__(self):
        while True:
            if self.i == self.signal_at:
                os.kill(os.getpid(), signal.SIGUSR2)
            g = torch.Generator().manual_seed(self.i * self.world + self.rank)
            window = torch.randint(0, 500, (2, 33), generator=g)
            self.i += 1
            yield window[:, :-1], window[:, 1:]

    def state_dict(self):
        return {"i": self.i}

    def stats(self):
        return {}


class SweepJob:
    """Stands for Hydra's submitit launcher: a checkpointable job (made one in the worker)."""

    def __call__(self):
        return None


def _submitit_rank(rank, world, port, run_dir, folder, codes):
    from submitit.core.job_environment import SignalHandler
    from submitit.core.utils import DelayedSubmission, JobPaths
    from submitit.helpers import Checkpointable
    from submitit.slurm.slurm import SlurmJobEnvironment

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), SUBMITIT_EXECUTOR="slurm",
                      SLURM_JOB_ID="4242", SLURM_PROCID=str(rank), SLURM_NTASKS=str(world), SLURM_JOB_NUM_NODES="1",
                      SLURM_NODEID="0", SLURM_LOCALID=str(rank))
    torch.set_num_threads(1)
    # What submitit's job runner installs before it calls the job (submitit/core/submission.py).
    job = type("Job", (SweepJob, Checkpointable), {})()
    delayed = DelayedSubmission(job)
    delayed.set_timeout(60, 3)
    handler = SignalHandler(SlurmJobEnvironment(), JobPaths(folder, "4242"), delayed)
    signal.signal(signal.SIGUSR2, handler.checkpoint_and_try_requeue)
    cfg = load_config(["model=tiny", "model.n_layers=2", "train.seq_len=32", "train.micro_batch_size=2",
                       f"train.global_batch_tokens={32 * 2 * world}", "parallel.param_dtype=float32",
                       "logging.wandb.mode=disabled", "train.max_steps=20", "parallel.timeout_s=60", f"run_dir={run_dir}"])
    codes[rank] = train(cfg, data=Batches(rank, world, signal_at=2 + rank))  # ranks see it at different steps


def test_submitit_signal_every_rank_saves_then_rank_0_requeues(tmp_path):
    # a stand-in for Slurm's scontrol: records the requeue and which checkpoints existed then
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / "submitit").mkdir()  # submitit's job folder, where its job file lives
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" $(ls {tmp_path}/run/checkpoints) >> {tmp_path}/requeued\n")
    (bin_dir / "scontrol").chmod(0o755)
    os.environ["PATH"] = f"{bin_dir}:{os.environ['PATH']}"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    codes = mp.Manager().dict()
    mp.start_processes(_submitit_rank, args=(2, port, str(tmp_path / "run"), str(tmp_path / "submitit"), codes),
                       nprocs=2, start_method="spawn")
    assert dict(codes) == {0: 75, 1: 75}
    saved = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert len(saved) == 1 and (tmp_path / "run" / "checkpoints" / saved[0] / "meta.json").is_file()
    # submitit requeued once, after every rank's checkpoint was complete
    assert (tmp_path / "requeued").read_text().split() == ["requeue", "4242", saved[0]]
    assert (tmp_path / "submitit" / "4242_submitted.pkl").is_file()  # submitit rewrote its job file


# --- SIGTERM to one rank of two: the ranks agree to stop after the same step -----------------------

class Preempted(CountedBatches):
    """Random batches by count; sends SIGTERM to its own process before batch ``at`` (None: never)."""

    def __init__(self, rank, world, at):
        super().__init__()
        self.rank, self.world, self.at = rank, world, at

    def __iter__(self):
        while True:
            if self.i == self.at:
                os.kill(os.getpid(), signal.SIGTERM)
            window = torch.randint(0, 500, (2, 33), generator=torch.Generator().manual_seed(self.i * self.world + self.rank))
            self.i += 1
            yield window[:, :-1], window[:, 1:]


def _preempted_rank(rank, world, port, run_dir, sigterm_at, codes):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    cfg = load_config(["model=tiny", "model.n_layers=2", "norm=dyt", "train.seq_len=32", "train.micro_batch_size=2",
                       f"train.global_batch_tokens={32 * 2 * world}", "parallel.param_dtype=float32",
                       "logging.interval=1", "logging.wandb.mode=disabled", f"train.max_steps={STEPS}",
                       "checkpoint.interval=100", "parallel.timeout_s=60", f"run_dir={run_dir}"])
    codes[rank] = train(cfg, data=Preempted(rank, world, sigterm_at.get(rank)))


def _two_ranks(run_dir, sigterm_at):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    codes = mp.Manager().dict()
    mp.start_processes(_preempted_rank, args=(2, port, str(run_dir), sigterm_at, codes), nprocs=2, start_method="spawn")
    return dict(codes)


def test_sigterm_to_one_of_two_ranks_stops_both_after_the_same_step_and_resumes_exactly(tmp_path):
    assert _two_ranks(tmp_path / "ref", {}) == {0: 0, 1: 0}
    run_dir = tmp_path / "run"
    assert _two_ranks(run_dir, {1: 3}) == {0: 75, 1: 75}  # rank 0 never sees the signal
    saved = sorted((run_dir / "checkpoints").iterdir())
    # signalled while step 4 fetched its batch: its flag goes out after step 4, read after step 5
    assert [p.name for p in saved] == ["step_5"]
    assert (saved[0] / "meta.json").is_file() and len(list(saved[0].glob("**/__1_*.distcp"))) >= 1
    assert _two_ranks(run_dir, {}) == {0: 0, 1: 0}
    assert losses(run_dir) == losses(tmp_path / "ref")
