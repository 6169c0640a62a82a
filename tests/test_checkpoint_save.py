"""Checkpoint retention never holds the ranks in a barrier: expired checkpoints leave the step_*
namespace by a rename and are deleted in the background; RNG states round-trip; a save that runs
out of space leaves the previous checkpoint as it was and the run resumes once space is freed."""

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from fms_dyt import checkpoint
from fms_dyt.checkpoint import Checkpointer, complete_checkpoints
from fms_dyt.config import load_config, model_args, norm_args
from fms_dyt.model import Transformer, count_parameters
from helpers import losses

REPO = Path(__file__).resolve().parents[1]


def _complete(root, step):
    d = root / f"step_{step}"
    d.mkdir(parents=True)
    (d / "meta.json").write_text(json.dumps({"step": step}))


def _finish_step(ckpt, root, step):
    tmp = root / f".tmp_step_{step}"
    tmp.mkdir()
    ckpt._finish(tmp, root / f"step_{step}", {"step": step, "data_state": [{}]})


def test_finish_returns_before_expired_checkpoints_are_deleted_and_keeps_k(tmp_path, one_rank, monkeypatch):
    root = tmp_path / "run" / "checkpoints"
    for step in (1, 2):
        _complete(root, step)
    release, real_rmtree = threading.Event(), shutil.rmtree

    def slow_rmtree(path, *args, **kwargs):  # a deletion that takes as long as the test wants
        assert release.wait(timeout=60), "the deletion was never released"
        real_rmtree(path, *args, **kwargs)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", slow_rmtree)

    ckpt = Checkpointer(str(tmp_path / "run"), load_config(["checkpoint.keep=2"]), rank=0, world_size=1)
    _finish_step(ckpt, root, 3)
    assert not release.is_set()  # _finish returned while the deletion still waits
    assert [d.name for d in complete_checkpoints(tmp_path / "run")] == ["step_2", "step_3"]
    expired = [d.name for d in root.iterdir() if d.name.startswith(".expired_")]
    assert len(expired) == 1 and expired[0].startswith(".expired_step_1_")
    assert (root / expired[0] / "meta.json").is_file()  # still on disk, out of the step_* namespace

    release.set()
    ckpt.deleting.join(timeout=120)
    assert sorted(d.name for d in root.iterdir()) == ["step_2", "step_3"]


def test_saving_a_step_again_replaces_it_off_the_collective_path(tmp_path, one_rank):
    root = tmp_path / "run" / "checkpoints"
    _complete(root, 3)
    (root / "step_3" / "from_the_first_save").touch()
    ckpt = Checkpointer(str(tmp_path / "run"), load_config(["checkpoint.keep=0"]), rank=0, world_size=1)
    _finish_step(ckpt, root, 3)
    ckpt.deleting.join(timeout=120)
    assert sorted(d.name for d in root.iterdir()) == ["step_3"]
    assert not (root / "step_3" / "from_the_first_save").exists()


def test_leftover_expired_checkpoints_are_removed_at_the_next_start(tmp_path, one_rank):
    root = tmp_path / "run" / "checkpoints"
    _complete(root, 4)
    (root / ".expired_step_2_0123abcd" / "rng").mkdir(parents=True)  # a job ended mid-deletion
    ckpt = Checkpointer(str(tmp_path / "run"), load_config([]), rank=0, world_size=1)
    ckpt.clean_partial()
    ckpt.deleting.join(timeout=120)
    assert sorted(d.name for d in root.iterdir()) == ["step_4"]


def test_rng_state_round_trips_and_old_checkpoints_still_load():
    torch.manual_seed(3)
    saved = checkpoint._rng_state()
    expected = torch.rand(4)
    if torch.cuda.is_initialized():
        assert "cuda" in saved
    checkpoint._set_rng_state(saved)
    assert torch.equal(torch.rand(4), expected)
    checkpoint._set_rng_state(saved["cpu"])  # written before checkpoints held a dict of states
    assert torch.equal(torch.rand(4), expected)


def test_dcp_saves_and_loads_on_its_own_gloo_group_made_once(tmp_path, one_rank, monkeypatch):
    """checkpoint.async_save runs DCP's collectives in a background thread: on a gloo group of
    their own (description "checkpoint"), made once, not the default group of the step."""
    from fms_dyt.audit import StepAudit

    cfg = load_config(["checkpoint.async_save=true"])
    ckpt = Checkpointer(str(tmp_path / "run"), cfg, rank=0, world_size=1)
    assert ckpt.group.group_desc == "checkpoint" and torch.distributed.get_backend(ckpt.group) == "gloo"
    assert Checkpointer(str(tmp_path / "run"), cfg, rank=0, world_size=1).group is ckpt.group  # made once
    groups = []
    for name in ("save", "async_save", "load"):
        real = getattr(checkpoint.dcp, name)
        monkeypatch.setattr(checkpoint.dcp, name, lambda *a, real=real, name=name, **k: groups.append(
            (name, k.get("process_group"))) or real(*a, **k))
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    ckpt.save(1, 8, model, optimizer, {"i": 1})
    ckpt.wait()
    with StepAudit() as audit:
        path = ckpt.save(2, 16, model, optimizer, {"i": 2}, blocking=True)
    dcp_groups = {group for (kind, group) in audit.collectives if kind in ("gather", "scatter", "broadcast")}
    assert dcp_groups == {"checkpoint"}, audit.collectives  # DCP's plan and result exchanges
    ckpt.load(path, model, optimizer)
    assert groups == [("async_save", ckpt.group), ("save", ckpt.group), ("load", ckpt.group)]


# ---- a full disk loses nothing (issue 22) -----------------------------------------------------

SMALL_RUN = ["experiment=quickstart", "model.n_layers=2", "train.max_steps=4", "train.seq_len=32",
             "train.micro_batch_size=2", "train.global_batch_tokens=128", "checkpoint.interval=2", "checkpoint.keep=1",
             "logging.wandb.mode=disabled", "validation.interval=null", "logging.telemetry_interval=null"]


@pytest.fixture
def small_fs(tmp_path):
    """A tmpfs of a few MB of its own (root only), unmounted afterwards; ``(mount point, mount)``
    where ``mount(size)`` (re)mounts it at ``size`` bytes."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    where = tmp_path / "small_fs"
    where.mkdir()

    def mount(size: int):
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)
    yield where, mount
    subprocess.run(["umount", str(where)], check=False)


def test_a_save_that_runs_out_of_space_loses_nothing_and_resumes_after_space_is_freed(tmp_path, small_fs):
    where, mount = small_fs
    train = [sys.executable, "train.py", *SMALL_RUN]
    # a checkpoint's size: fp32 parameters and AdamW's two moments (a few KB of metadata besides)
    cfg = load_config(SMALL_RUN)
    with torch.device("meta"):
        size = 12 * count_parameters(Transformer(model_args(cfg), norm_args(cfg)))["total"]
    # room for two checkpoints, taken down to one and a half by a file that is deleted later
    mount(2 * size + 2_000_000)
    filler = where / "filler"
    filler.write_bytes(b"\0" * (size // 2 + 1_000_000))
    run_dir = where / "run"
    first = subprocess.run(train + [f"run_dir={run_dir}"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert first.returncode == 6, first.stdout[-2000:] + first.stderr[-3000:]
    names = sorted(d.name for d in (run_dir / "checkpoints").iterdir())
    # no partial directory; checkpoint.keep=1 kept the last complete one since no newer one completed
    assert names == ["step_2"], names
    assert checkpoint.inspect_checkpoint(run_dir / "checkpoints" / "step_2")[0] is None
    error = first.stderr  # one line: "fms-dyt: checkpoint ... could not be written: ..."
    m = re.search(r"checkpoint (\S+) could not be written: out of space .*needs about ([\d,]+) bytes; "
                  r"\S+ has ([\d,]+) bytes free", error)
    assert m, first.stderr[-3000:]
    assert m.group(1) == str(run_dir / "checkpoints" / "step_4")
    need, free = (int(g.replace(",", "")) for g in m.groups()[1:])
    assert 0.5 * size < need < 2 * size and free < need, (need, free, size)
    before = losses(run_dir)
    assert sorted(before) == [1, 2, 3, 4]

    filler.unlink()
    again = subprocess.run(train + [f"run_dir={run_dir}"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / 'step_2'} (step 2," in again.stdout + again.stderr
    after = losses(run_dir)
    assert after == before  # steps 3 and 4 again, bit for bit the uninterrupted ones
    # step_4 complete, step_2 went (checkpoint.keep=1) only then
    assert sorted(d.name for d in (run_dir / "checkpoints").iterdir()) == ["step_4"]
