"""Every shared read done once: on 2 gloo ranks under torchrun, with Python audit hooks, rank 1
opens no data file for validation or telemetry and makes no ``stat`` of a checkpoint shard before
DCP's own load; rank 0 does those reads and checks and broadcasts what it found. Also: rank 0's
errors reach every rank, and the process groups switch from the start-up timeout to the step
timeout after the first step (the checkpoint group keeps the start-up one)."""

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fms_dyt.config import ConfigError, load_config
from fms_dyt.data.synthetic import write_shards
from fms_dyt.parallel import CHECKPOINT_GROUP, checkpoint_group, free_port, on_rank0, use_step_timeout

ROOT = Path(__file__).resolve().parents[1]
SEQ, MB = 16, 2
TINY = ["model=tiny", "model.n_layers=2", "norm=dyt", "parallel.param_dtype=float32", f"train.seq_len={SEQ}",
        f"train.micro_batch_size={MB}", f"train.global_batch_tokens={SEQ * MB * 2}", "data.num_workers=0",
        "logging.wandb.mode=disabled", "logging.telemetry_interval=2", "validation.interval=2",
        f"validation.tokens={4 * (SEQ + 1)}", "checkpoint.interval=2", "data.holdout=0.2"]

# Runs the trainer with an audit hook that records, per rank, every open, stat and directory listing
# with the phase of start-up it happened in. CPython 3.11 raises no audit event for os.stat, so the
# wrapper makes os.stat and os.lstat raise one ("os.stat") before they run: pathlib's stat, exists
# and is_file and os.path.isfile/getsize all go through them.
AUDITED = r"""
import os, sys
events, phase = [], ["start-up"]


def hook(event, args):
    if event in ("open", "os.stat", "os.listdir", "os.scandir") and args and isinstance(args[0], (str, bytes, os.PathLike)):
        events.append((phase[0], event, os.path.abspath(os.fsdecode(args[0]))))


def raising_stat(stat):
    def audited(path, *args, **kwargs):
        sys.audit("os.stat", path)
        return stat(path, *args, **kwargs)
    return audited


os.stat, os.lstat = raising_stat(os.stat), raising_stat(os.lstat)
sys.addaudithook(hook)

import json
import torch
import torch.distributed.checkpoint as dcp
import fms_dyt.telemetry as telemetry
import fms_dyt.trainer as trainer
from fms_dyt.config import load_config

torch.set_num_threads(1)


def in_phase(name, fn):
    def run(*args, **kwargs):
        outer, phase[0] = phase[0], name
        try:
            return fn(*args, **kwargs)
        finally:
            phase[0] = outer if name != "training" else name
    return run


trainer.build_validation = in_phase("validation", trainer.build_validation)
telemetry.Telemetry.for_run = classmethod(in_phase("telemetry", telemetry.Telemetry.for_run.__func__))
dcp.load = in_phase("dcp load", dcp.load)
trainer.train_step = in_phase("training", trainer.train_step)
out, overrides = sys.argv[1], sys.argv[2:]
trainer.main(load_config(overrides))
with open(f"{out}/rank{os.environ['RANK']}.json", "w") as f:
    json.dump(events, f)
"""


def _torchrun(tmp_path, script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           script, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_rank_1_reads_no_shared_file_and_stats_no_checkpoint_shard_before_dcps_load(tmp_path):
    data, run_dir, out = tmp_path / "data", tmp_path / "run", tmp_path / "events"
    write_shards(data, files=2, rows=60)
    out.mkdir()
    script = tmp_path / "audited.py"
    script.write_text(AUDITED)
    common = [*TINY, "data=local", f"data.path={data}", f"run_dir={run_dir}"]
    first = _torchrun(tmp_path, str(script), str(out), *common, "train.max_steps=2")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    resumed = _torchrun(tmp_path, str(script), str(out), *common, "train.max_steps=3")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr
    assert "resumed from" in log and "(step 2," in log, log[-3000:]

    shard_names = {p.name for p in (run_dir / "checkpoints" / "step_2").glob("*.distcp")}
    assert shard_names == {"__0_0.distcp", "__1_0.distcp"}
    step_2 = str(run_dir / "checkpoints" / "step_2")
    data_files = {str(p) for p in data.iterdir()}
    for rank in (0, 1):
        events = [tuple(e) for e in json.loads((out / f"rank{rank}.json").read_text())]
        phases = [p for p, _, _ in events]
        assert "dcp load" in phases and "training" in phases
        start_up = events[:phases.index("training")]
        before_load = events[:phases.index("dcp load")]
        data_reads = {(p, e, path) for p, e, path in start_up if path in data_files}
        shard_stats = {os.path.basename(path) for p, e, path in before_load
                       if e == "os.stat" and path.startswith(step_2) and path.endswith(".distcp")}
        checkpoint_files = {os.path.basename(path) for _, e, path in before_load
                            if e == "open" and path.startswith(step_2)}
        if rank == 0:  # the one reader: validation windows, telemetry's batch, the checkpoint's checks
            assert {p for p, e, _ in data_reads if e == "open"} >= {"validation", "telemetry"}, data_reads
            assert shard_stats == shard_names
            assert checkpoint_files >= {"meta.json", "data_state.json", ".metadata"}
        else:
            assert not {r for r in data_reads if r[0] in ("validation", "telemetry")}, data_reads
            assert not shard_stats and not checkpoint_files, (shard_stats, checkpoint_files)
            # what rank 1 then reads of the checkpoint: DCP's index and shards, and its own RNG state
            loaded = {os.path.relpath(path, step_2) for p, e, path in start_up
                      if e == "open" and path.startswith(step_2 + os.sep)}
            assert loaded <= {".metadata", *shard_names, "rng/rank_1.pt"} and "rng/rank_1.pt" in loaded, loaded


# ---- the helper, and the timeouts ----------------------------------------------------------------

def _rank(rank, world, port, out, fn, *args):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    out[rank] = fn(rank, *args)


def _spawn(fn, *args) -> dict:
    out = mp.Manager().dict()
    mp.start_processes(_rank, args=(2, free_port(), out, fn, *args), nprocs=2, start_method="spawn")
    return dict(out)


def _reads(rank):
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    reads = []

    def read(value):
        def run():
            reads.append(1)
            if isinstance(value, Exception):
                raise value
            return value
        return run
    got = {"tensor": on_rank0(read(torch.arange(6).view(2, 3)), torch.device("cpu")).tolist(),
           "object": on_rank0(read({"path": Path("/x/step_4"), "step": 4}))}
    for name, error in (("config", ConfigError("validation.tokens=9 is too many")), ("os", FileNotFoundError(2, "gone"))):
        try:
            on_rank0(read(error))
        except Exception as e:
            got[name] = [type(e).__name__, str(e), getattr(e, "__notes__", [])]
    got["reads"] = len(reads)
    dist.destroy_process_group()
    return got


def test_on_rank0_reads_once_and_gives_every_rank_the_value_or_the_same_error():
    got = _spawn(_reads)
    zero, one = got[0], got[1]
    assert zero["reads"] == 4 and one["reads"] == 0
    for got in (zero, one):
        assert got["tensor"] == [[0, 1, 2], [3, 4, 5]] and got["object"] == {"path": Path("/x/step_4"), "step": 4}
        assert got["config"][:2] == ["ConfigError", "validation.tokens=9 is too many"]  # exit 2 on every rank
        assert got["os"][:2] == ["FileNotFoundError", "[Errno 2] gone"]
    assert one["config"][2] == ["(raised on rank 0, which reads this for every rank)"] and zero["config"][2] == []


def _timeout(group) -> timedelta:
    return group._get_backend(torch.device("cpu")).options._timeout


def test_every_group_but_the_checkpoint_group_switches_to_the_step_timeout(tmp_path):
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=timedelta(seconds=1800))
    try:
        other = dist.new_group(backend="gloo", group_desc="stop_agreement", timeout=timedelta(seconds=1800))
        ckpt = checkpoint_group(1800)
        assert checkpoint_group(1800) is ckpt and ckpt.group_desc == CHECKPOINT_GROUP  # made once
        use_step_timeout(300)
        assert _timeout(dist.group.WORLD) == _timeout(other) == timedelta(seconds=300)
        assert _timeout(ckpt) == timedelta(seconds=1800)
    finally:
        dist.destroy_process_group()


class StallingBatches:
    """Random batches; rank 1 sleeps ``stall_s`` before the batches of the given steps."""

    def __init__(self, rank, stall_s, stall_steps, accum):
        self.rank, self.stall_s, self.stall_steps, self.accum, self.i = rank, stall_s, stall_steps, accum, 0

    def __iter__(self):
        import time

        while True:
            if self.rank == 1 and self.i % self.accum == 0 and self.i // self.accum + 1 in self.stall_steps:
                time.sleep(self.stall_s)
            tokens = torch.randint(0, 500, (MB, SEQ + 1), generator=torch.Generator().manual_seed(self.i))
            self.i += 1
            yield tokens[:, :-1], tokens[:, 1:]

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, states):
        self.i = states[self.rank]["i"]

    def stats(self):
        return {}


def _stalling_run(rank, run_dir, stall_steps):
    from fms_dyt.trainer import train

    cfg = load_config([*TINY, "validation.interval=null", "logging.telemetry_interval=null", "checkpoint.interval=100",
                       "parallel.init_timeout_s=60", "parallel.timeout_s=2", "train.max_steps=3", f"run_dir={run_dir}"])
    try:
        return train(cfg, data=StallingBatches(rank, 5, stall_steps, accum=1))
    except Exception as e:
        return f"{type(e).__name__}: {e}"


@pytest.mark.parametrize("stall_step, survives", [(1, True), (3, False)])
def test_a_stall_longer_than_the_step_timeout_is_tolerated_at_start_up_only(tmp_path, stall_step, survives):
    """Rank 1 stalls 5 s, with parallel.timeout_s=2 and parallel.init_timeout_s=60: at step 1 (like
    a first compile) rank 0 waits; at step 3 rank 0 gives up."""
    codes = _spawn(_stalling_run, str(tmp_path), {stall_step})
    if survives:
        assert codes == {0: 0, 1: 0}, codes
    else:
        assert codes[0] != 0 and "timed out" in str(codes[0]).lower(), codes
