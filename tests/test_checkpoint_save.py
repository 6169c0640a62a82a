"""Checkpoint retention never holds the ranks in a barrier: expired checkpoints leave the step_*
namespace by a rename and are deleted in the background; RNG states round-trip."""

import json
import shutil
import threading

import torch

from fms_dyt import checkpoint
from fms_dyt.checkpoint import Checkpointer, complete_checkpoints
from fms_dyt.config import load_config


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
