"""A run directory belongs to one run, and checkpoints that fail to load are named and skipped."""

import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from fms_dyt.checkpoint import CheckpointError, checkpoint_problem
from fms_dyt.config import ConfigError, load_config
from fms_dyt.resume import check_same_run
from fms_dyt.trainer import train
from helpers import losses

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=tiny", "model.n_layers=2", "train.seq_len=32", "train.micro_batch_size=2",
        "train.global_batch_tokens=128", "parallel.param_dtype=float32", "logging.wandb.mode=disabled",
        "logging.interval=1", "optim.lr=3e-3", "optim.warmup_steps=2"]


def snapshot(root: Path) -> dict:
    """Every file and directory under root with its bytes and modification time."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def test_norm_rmsnorm_into_a_dyt_run_dir_is_refused_and_changes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    common = [sys.executable, "train.py", "experiment=quickstart", *TINY, "train.max_steps=2", "data.num_workers=0",
              f"run_dir={run_dir}"]
    first = subprocess.run(common, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    before = snapshot(run_dir)
    refused = subprocess.run([*common, "norm=rmsnorm"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "norm.name: 'dyt' -> 'rmsnorm'" in refused.stderr, refused.stderr
    assert "train.resume=force" in refused.stderr and "run_dir=" in refused.stderr
    assert "step 1" not in refused.stdout  # refused before training
    assert snapshot(run_dir) == before


def _write_run(run_dir: Path, overrides):
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(load_config(["experiment=quickstart", *overrides])))


def test_which_changes_a_resumed_run_may_make(tmp_path, caplog):
    run_dir = tmp_path / "run"
    _write_run(run_dir, [f"run_dir={run_dir}"])
    same_run = ["experiment=quickstart", f"run_dir={run_dir}"]
    # a longer run, other logging, checkpointing, parallelism and worker count: the same run
    check_same_run(load_config([*same_run, "train.max_steps=500", "logging.interval=5", "checkpoint.keep=5",
                                "parallel.activation_checkpointing=full", "data.num_workers=4"]), run_dir)
    with pytest.raises(ConfigError) as e:
        check_same_run(load_config([*same_run, "optim.lr=1e-3", "seed=1", "norm.alpha_attn=0.5"]), run_dir)
    message = str(e.value)
    for line in ("optim.lr: 0.003 -> 0.001", "seed: 2023 -> 1", "norm.alpha_attn: 4.0 -> 0.5"):
        assert line in message, message
    with caplog.at_level(logging.WARNING, logger="fms_dyt"):
        check_same_run(load_config([*same_run, "optim.lr=1e-3", "train.resume=force"]), run_dir)
    assert "optim.lr: 0.003 -> 0.001" in caplog.text
    check_same_run(load_config([*same_run, "optim.lr=1e-3"]), tmp_path / "new")  # a new directory: anything goes


def test_a_key_the_old_run_did_not_have_counts_as_its_default(tmp_path):
    run_dir = tmp_path / "run"
    _write_run(run_dir, [f"run_dir={run_dir}"])
    old = OmegaConf.load(run_dir / "config.yaml")
    del old.norm["impl"]  # as written by an fms-dyt without norm.impl
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(old))
    check_same_run(load_config(["experiment=quickstart", f"run_dir={run_dir}"]), run_dir)
    with pytest.raises(ConfigError, match="norm.impl: 'fused' -> 'eager'"):
        check_same_run(load_config(["experiment=quickstart", f"run_dir={run_dir}", "norm.impl=eager"]), run_dir)


class Batches:
    """Deterministic batches; the state is the number handed out."""

    def __init__(self):
        self.i = 0

    def __iter__(self):
        while True:
            window = torch.randint(0, 500, (2, 33), generator=torch.Generator().manual_seed(self.i))
            self.i += 1
            yield window[:, :-1], window[:, 1:]

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, states):
        self.i = states[0]["i"]

    def stats(self):
        return {}


def _train(run_dir, *overrides):
    try:
        return train(load_config([*TINY, "checkpoint.interval=2", f"run_dir={run_dir}", *overrides]), data=Batches())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_a_truncated_newest_checkpoint_is_named_and_the_previous_one_resumes(tmp_path, caplog):
    run_dir = tmp_path / "run"
    assert _train(run_dir, "train.max_steps=4") == 0
    first = losses(run_dir)
    shard = run_dir / "checkpoints" / "step_4" / "__0_0.distcp"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    with caplog.at_level(logging.INFO, logger="fms_dyt"):
        assert _train(run_dir, "train.max_steps=6") == 0
    assert f"checkpoint {run_dir / 'checkpoints' / 'step_4'} cannot be loaded: shard __0_0.distcp is truncated" \
        in caplog.text, caplog.text
    assert f"resumed from {run_dir / 'checkpoints' / 'step_2'} (step 2" in caplog.text
    # set aside, not deleted; the run went on from step 2 (step 3 has the same learning rate in both
    # schedules, so the same loss; later steps differ as the cosine now ends at step 6)
    assert (run_dir / "checkpoints" / "step_4.unloadable" / "__0_0.distcp").is_file()
    again = losses(run_dir)
    assert sorted(again) == list(range(1, 7)) and again[3] == first[3]


def test_no_loadable_checkpoint_is_an_error_naming_each(tmp_path):
    run_dir = tmp_path / "run"
    assert _train(run_dir, "train.max_steps=4") == 0
    (run_dir / "checkpoints" / "step_4" / "meta.json").write_text("")
    (run_dir / "checkpoints" / "step_2" / "data_state.json").unlink()
    with pytest.raises(CheckpointError) as e:
        _train(run_dir, "train.max_steps=6")
    message = str(e.value)
    assert f"{run_dir / 'checkpoints' / 'step_4'}: meta.json is empty" in message, message
    assert f"{run_dir / 'checkpoints' / 'step_2'}: data_state.json is missing" in message, message
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_2", "step_4"]  # left as they were


def test_each_kind_of_damage_is_described(tmp_path):
    run_dir = tmp_path / "run"
    assert _train(run_dir, "train.max_steps=2") == 0
    good = run_dir / "checkpoints" / "step_2"
    assert checkpoint_problem(good) is None

    def damaged(name, damage):
        copy = tmp_path / name
        shutil.copytree(good, copy)
        damage(copy)
        return checkpoint_problem(copy)

    assert damaged("invalid_meta", lambda d: (d / "meta.json").write_text("{step")).startswith("meta.json is not valid JSON")
    assert damaged("meta_keys", lambda d: (d / "meta.json").write_text("{}")) == \
        "meta.json lacks step, tokens_seen, world_size"
    assert damaged("no_index", lambda d: (d / ".metadata").unlink()).startswith(".metadata (DCP's index")
    assert damaged("no_shard", lambda d: (d / "__0_0.distcp").unlink()) == "shard __0_0.distcp is missing"


def test_a_step_dir_without_meta_json_is_set_aside_not_deleted(tmp_path, caplog):
    run_dir = tmp_path / "run"
    assert _train(run_dir, "train.max_steps=2") == 0
    (run_dir / "checkpoints" / "step_8").mkdir()
    (run_dir / "checkpoints" / "step_8" / "notes.txt").write_text("mine")
    with caplog.at_level(logging.INFO, logger="fms_dyt"):
        assert _train(run_dir, "train.max_steps=3") == 0
    assert (run_dir / "checkpoints" / "step_8.incomplete" / "notes.txt").read_text() == "mine"
    assert "step_8 has no meta.json" in caplog.text and "resumed from" in caplog.text


def _rank(rank, world, port, run_dir, max_steps, codes):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    cfg = load_config([*TINY, "train.global_batch_tokens=256", "checkpoint.interval=2",
                       "parallel.timeout_s=60", f"train.max_steps={max_steps}", f"run_dir={run_dir}"])
    codes[rank] = train(cfg, data=Batches())


def _spawn(world, run_dir, max_steps):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    codes = mp.Manager().dict()
    mp.start_processes(_rank, args=(world, port, str(run_dir), max_steps, codes), nprocs=world, start_method="spawn")
    return dict(codes)


def test_when_one_rank_cannot_load_every_rank_takes_the_previous_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    assert _spawn(2, run_dir, 4) == {0: 0, 1: 0}
    (run_dir / "checkpoints" / "step_4" / "rng" / "rank_1.pt").write_bytes(b"not a tensor")  # only rank 1 reads it
    assert _spawn(2, run_dir, 6) == {0: 0, 1: 0}  # nobody hangs, both go on
    assert (run_dir / "checkpoints" / "step_4.unloadable" / "rng" / "rank_1.pt").read_bytes() == b"not a tensor"
    assert (run_dir / "checkpoints" / "step_6" / "meta.json").is_file()
    assert sorted(losses(run_dir)) == list(range(1, 7))
