"""train.py's loop under FSDP2 on gloo: rank-count invariance, HSDP, AC/compile, resume, faults."""

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fms_dyt.config import ConfigError, load_config
from fms_dyt.parallel import free_port
from fms_dyt.trainer import NonFiniteError, train
from helpers import losses

SEQ, MICRO = 32, 2
BASE = ["model=tiny", "model.n_layers=2", "norm=dyt", f"train.seq_len={SEQ}", f"train.micro_batch_size={MICRO}",
        f"train.global_batch_tokens={SEQ * MICRO * 4}", "parallel.param_dtype=float32", "logging.interval=1",
        "logging.wandb.mode=disabled", "optim.lr=3e-3", "optim.warmup_steps=2"]


class FixedBatches:
    """An in-memory source: global batch g is fixed by (g, seed); rank r takes its micro-batches of it."""

    def __init__(self, rank, world, accum, seed=0):
        self.rank, self.world, self.accum, self.seed, self.i = rank, world, accum, seed, 0

    def __iter__(self):
        while True:
            g, micro = divmod(self.i, self.accum)
            full = torch.randint(0, 500, (MICRO * 4, SEQ + 1), generator=torch.Generator().manual_seed(self.seed + g))
            row = (micro * self.world + self.rank) * MICRO
            self.i += 1
            yield full[row:row + MICRO, :-1], full[row:row + MICRO, 1:]

    def state_dict(self):
        return {"i": self.i, "world": self.world}

    def load_state_dict(self, states):
        # Global batches consumed, whatever the old world size: position it for this world size.
        s = states[0]
        self.i = s["i"] // (4 // s["world"]) * self.accum

    def stats(self):
        return {"batches": self.i}


def _worker(rank, world, port, overrides, result_codes):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    cfg = load_config(overrides)
    result_codes[rank] = train(cfg, data=FixedBatches(rank, world, 4 // world))


def run(world, overrides):
    codes = mp.Manager().dict()
    mp.start_processes(_worker, args=(world, free_port(), BASE + overrides, codes), nprocs=world, start_method="spawn")
    return dict(codes)


def test_two_fsdp_ranks_match_one_process(tmp_path):
    run(1, ["train.max_steps=4", f"run_dir={tmp_path}/one"])
    run(2, ["train.max_steps=4", f"run_dir={tmp_path}/two"])
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(one) == [1, 2, 3, 4]
    assert one[4] < one[1]  # it learns
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5, abs=1e-5)


def test_hsdp_on_a_2x2_mesh_runs_and_matches(tmp_path):
    run(4, ["train.max_steps=2", "parallel.sharding=hybrid", "parallel.replicas=2", f"run_dir={tmp_path}/h"])
    run(1, ["train.max_steps=2", f"run_dir={tmp_path}/one"])
    h, one = losses(tmp_path / "h"), losses(tmp_path / "one")
    assert h[2] == pytest.approx(one[2], rel=1e-5)
    assert (tmp_path / "h" / "checkpoints" / "step_2" / "meta.json").is_file()


def test_activation_checkpointing_and_compile_switches(tmp_path):
    run(1, ["train.max_steps=2", f"run_dir={tmp_path}/plain"])
    run(1, ["train.max_steps=2", "parallel.activation_checkpointing=full", f"run_dir={tmp_path}/full"])
    run(1, ["train.max_steps=2", "parallel.activation_checkpointing=selective", "parallel.ac_fraction=0.5",
            "parallel.compile=true", f"run_dir={tmp_path}/sel"])
    plain = losses(tmp_path / "plain")
    assert losses(tmp_path / "full") == pytest.approx(plain, rel=1e-6)  # recomputation is exact
    assert losses(tmp_path / "sel") == pytest.approx(plain, rel=1e-4)


def test_resume_from_two_ranks_on_one_and_partial_saves_are_ignored(tmp_path):
    rd = tmp_path / "r"
    run(2, ["train.max_steps=6", "checkpoint.interval=3", f"run_dir={rd}"])
    run(1, ["train.max_steps=6", f"run_dir={tmp_path}/ref"])
    # What a save killed half-way leaves: a temporary directory, and a step dir without meta.json.
    (rd / "checkpoints" / ".tmp_step_9" / "rng").mkdir(parents=True)
    (rd / "checkpoints" / "step_12").mkdir()
    run(1, ["train.max_steps=8", "checkpoint.interval=3", f"run_dir={rd}"])
    assert not (rd / "checkpoints" / ".tmp_step_9").exists() and not (rd / "checkpoints" / "step_12").exists()
    resumed = losses(rd)
    assert sorted(resumed) == list(range(1, 9))
    assert resumed[6] == pytest.approx(losses(tmp_path / "ref")[6], rel=1e-5)
    meta = json.loads((rd / "checkpoints" / "step_8" / "meta.json").read_text())
    assert meta["world_size"] == 1 and meta["tokens_seen"] == 8 * SEQ * MICRO * 4


def test_checkpoint_keep_async_save_and_wandb_offline_resume(tmp_path):
    common = ["checkpoint.interval=1", "checkpoint.keep=2", "checkpoint.async_save=true",
              "logging.wandb.mode=offline", f"run_dir={tmp_path}"]
    run(1, ["train.max_steps=4", *common])
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_3", "step_4"]
    run_id = (tmp_path / "wandb_id").read_text().strip()
    run(1, ["train.max_steps=6", *common])
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_5", "step_6"]
    assert (tmp_path / "wandb_id").read_text().strip() == run_id  # the resumed job continues the W&B run
    assert sorted(losses(tmp_path)) == list(range(1, 7))
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("loss", "lr", "grad_norm", "tokens_seen", "tokens_per_s", "mfu", "data_wait_s", "peak_memory_gib",
                "alpha/attn/0", "alpha/ffn/1", "alpha/final", "embedding_scale"):
        assert key in record, key
    assert record["tokens_seen"] == 6 * SEQ * MICRO * 4


class DyingRank(FixedBatches):
    """Rank 1 dies without a word at its third batch."""

    def __iter__(self):
        for i, batch in enumerate(super().__iter__()):
            if self.rank == 1 and i == 2:
                os._exit(3)
            yield batch


def _dying_worker(rank, world, port, overrides):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    train(load_config(overrides), data=DyingRank(rank, world, 2))


def test_a_dead_rank_makes_the_other_exit_instead_of_hanging(tmp_path):
    ctx = mp.start_processes(_dying_worker, args=(2, free_port(), BASE + ["train.max_steps=20", "parallel.timeout_s=30",
                             f"run_dir={tmp_path}"]), nprocs=2, join=False, start_method="spawn")
    for p in ctx.processes:
        p.join(timeout=120)
    assert [p.exitcode for p in ctx.processes if p.is_alive()] == []  # nobody hangs
    assert all(p.exitcode != 0 for p in ctx.processes)


def test_global_batch_that_does_not_divide_fails_before_training(tmp_path):
    cfg = load_config(BASE + ["train.global_batch_tokens=1000", "train.max_steps=1", f"run_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="train.global_batch_tokens=1000"):
        train(cfg, data=FixedBatches(0, 1, 4))
    assert not dist.is_initialized()  # a failed run ends its process group too
    assert not (tmp_path / "checkpoints").exists()


def test_non_finite_loss_skips_updates_then_aborts(tmp_path, monkeypatch):
    import fms_dyt.trainer as trainer

    monkeypatch.setattr(trainer, "cross_entropy", lambda logits, targets: logits.sum() * float("nan"))
    cfg = load_config(BASE + ["train.max_steps=10", "train.max_bad_steps=3", f"run_dir={tmp_path}"])
    with pytest.raises(NonFiniteError, match="3 steps in a row"):
        train(cfg, data=FixedBatches(0, 1, 4))
    assert not dist.is_initialized()  # a failed run ends its process group too
