"""The full-scale dry run (``fms_dyt.plan --simulate``) against reality and against the planner.

Reality: the same trainer step run for real on 2 gloo ranks of this CPU, its peak read from the
C library's accounting of the bytes in use (``mallinfo2``), not from the simulator's meter.
Run as a script under torchrun, this file is that real run.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# An 8,000-token vocabulary: at 32,000 the embedding and head are 40% of this model's weights,
# and gloo's reduce-scatter copies its whole input (NCCL's does not), so the real run's peak would
# be gloo's copy of the head's gradients, which is no part of what a GPU holds.
SMALL = ["model=small", "model.vocab_size=8000", "train.seq_len=512", "train.micro_batch_size=2", "train.max_steps=2"]
VARIANTS = {  # name: overrides on top of SMALL (2 ranks: 2,048 tokens a micro-batch step)
    "plain": ["train.global_batch_tokens=2048"],
    "checkpointed": ["train.global_batch_tokens=2048", "parallel.activation_checkpointing=full"],
    "accumulation_4": ["train.global_batch_tokens=8192"],
}


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}


def _simulate(overrides: list[str], nodes: int = 1, gpus_per_node: int = 2) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "fms_dyt.plan", *overrides, "--simulate", "--json",
         "--nodes", str(nodes), "--gpus-per-node", str(gpus_per_node)],
        capture_output=True, text=True, timeout=600, env=_env(), cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def _measure(overrides: list[str], tmp_path: Path) -> dict:
    result = tmp_path / "measured.json"
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         __file__, str(result), *overrides],
        capture_output=True, text=True, timeout=600, env=_env(), cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(result.read_text())


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_simulated_peak_matches_a_real_cpu_run(variant, tmp_path):
    overrides = SMALL + VARIANTS[variant]
    simulated = _simulate(overrides)
    measured = _measure(overrides, tmp_path)
    measured_gib = measured["peak_bytes"] / 2**30
    # A CPU has no CUDA context: the measured bytes compare with the simulated tensors alone.
    print(f"{variant}: simulated {simulated['simulated_tensor_peak_gib']:.3f} GiB, measured {measured_gib:.3f} GiB "
          f"({measured['samples']} samples of rank 0)")
    assert simulated["simulated_tensor_peak_gib"] == pytest.approx(measured_gib, rel=0.15), (simulated, measured_gib)
    parts = simulated["simulated_gib"]
    assert set(parts) == {"params", "grads", "optimizer", "activations", "comm", "overhead"}
    assert sum(parts.values()) == pytest.approx(simulated["simulated_peak_gib"], abs=0.01)
    assert parts["overhead"] == simulated["memory_gib"]["overhead"]
    # AdamW's two fp32 moments of this rank's half of the parameters.
    assert parts["optimizer"] == pytest.approx(8 * simulated["n_params"] / 2 / 2**30, rel=0.01)


def test_gradients_stay_shard_sized_with_accumulation_unless_deferred():
    base = SMALL + ["train.global_batch_tokens=16384"]  # 8 micro-batches a step on 2 ranks
    default = _simulate(base)
    deferred = _simulate(base + ["parallel.defer_grad_sync=true"])
    n = default["n_params"]
    assert default["layout"]["grad_accum_steps"] == 8
    # Reduce-scattered every micro-batch: fp32 shards of the gradients and one block's transients.
    assert default["simulated_gib"]["grads"] < 1.5 * 4 * n / 2 / 2**30
    # Deferred: fp32 gradients of the whole model until the last micro-batch.
    assert deferred["simulated_gib"]["grads"] >= 4 * n / 2**30
    for p in (default, deferred):
        # Like with like (at this size the 2 GiB overhead both figures add would hide any gap).
        planned = p["memory_per_gpu_gib"] - p["memory_gib"]["overhead"]
        assert planned == pytest.approx(p["simulated_tensor_peak_gib"], rel=0.15)
        # The planner's collectives are the step's: gathers every micro-batch, reduce-scatters
        # every micro-batch or (deferred) on the last one only.
        for kind in ("allgather", "reduce_scatter"):
            assert p["collectives_per_step"][kind]["count"] == p["comm_per_step"][kind]["count"], kind
            assert p["collectives_per_step"][kind]["bytes"] == pytest.approx(p["comm_per_step"][kind]["bytes"], rel=1e-3)
    assert deferred["comm_per_step"]["reduce_scatter"]["count"] * 8 == default["comm_per_step"]["reduce_scatter"]["count"]


def test_a_config_that_does_not_fit_fails_with_the_figures():
    out = subprocess.run(
        [sys.executable, "-m", "fms_dyt.plan", "model=small", "train.seq_len=4096", "train.micro_batch_size=96",
         "train.global_batch_tokens=393216", "train.max_steps=2", "--nodes", "1", "--gpus-per-node", "1",
         "--simulate", "--json"],
        capture_output=True, text=True, timeout=600, env=_env(), cwd=ROOT,
    )
    assert out.returncode == 2, out.stderr[-3000:]
    assert "does not fit" in out.stderr and "80 GiB" in out.stderr


@pytest.fixture(scope="module")
def llama7b_dyt() -> dict:
    """The 7B DyT paper run simulated at its full size, 64 nodes x 8 GPUs (about 20 s)."""
    return _simulate(["experiment=llama7b_dyt"], nodes=64, gpus_per_node=8)


def test_simulated_collectives_are_the_planned_ones_and_are_timed(llama7b_dyt):
    p = llama7b_dyt
    simulated, planned = p["collectives_per_step"], p["comm_per_step"]
    for kind in ("allgather", "reduce_scatter"):  # FSDP2's, on the 8 GPUs of a node (hybrid sharding)
        assert simulated[kind]["count"] == planned[kind]["count"], kind
        assert simulated[kind]["bytes"] == pytest.approx(planned[kind]["bytes"], rel=1e-3), kind
    groups = {(g["kind"], g["group"]): g for g in p["collectives_per_step_by_group"]}
    assert {(g["ranks"], g["nodes"]) for (kind, _), g in groups.items() if kind != "allreduce"} == {(8, 1)}
    # Across the 64 replicas, one GPU a node: each unit's reduced shard, fp32.
    across = [g for g in groups.values() if g["kind"] == "allreduce" and g["ranks"] == 64]
    assert len(across) == 1 and across[0]["nodes"] == 64
    assert across[0]["count"] == planned["allreduce"]["count"]
    assert across[0]["bytes"] == pytest.approx(planned["allreduce"]["bytes"], rel=1e-3)
    assert across[0]["seconds"] == pytest.approx(2 * 63 / 64 * across[0]["bytes"] / 50e9, rel=1e-3)
    assert p["simulated_comm_s_per_step"] == pytest.approx(p["comm_s_per_step"], rel=0.01)


def test_a_non_log_step_reads_nothing_back_and_adds_one_reduction_to_fsdp(llama7b_dyt):
    """The trainer's step between log steps (issue 20): no device-to-host read, and besides FSDP2's
    own collectives only the gradient norm's reduction."""
    p = llama7b_dyt
    assert p["host_syncs_per_step"] == 0, p["host_reads_per_step"]
    fsdp = p["comm_per_step"]["allreduce"]["count"]
    assert p["collectives_per_step"]["allreduce"]["count"] <= fsdp + 1, p["collectives_per_step_by_group"]


def _real_run(result: str, overrides: list[str]) -> None:
    """Two steps of the trainer's step on real CPU tensors; rank 0 writes its peak bytes in use."""
    import torch

    from fms_dyt.config import load_config
    from fms_dyt.optim import build_optimizer
    from fms_dyt.parallel import build_mesh, init_distributed
    from fms_dyt.config import schedule
    from fms_dyt.simulate import STEPS
    from fms_dyt.trainer import build_model, train_step

    cfg = load_config(overrides)
    d = init_distributed("cpu")
    _, accum = schedule(cfg, d.world_size)
    with _malloc_peak() as malloc:
        model = build_model(cfg, d, build_mesh(cfg.parallel, d))
        optimizer = build_optimizer(model, cfg.optim)
        tokens = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.train.seq_len))
        for _ in range(STEPS):
            train_step(model, optimizer, itertools.repeat((tokens, tokens)), accum, cfg.optim.grad_clip,
                       d.device, defer_grad_sync=cfg.parallel.defer_grad_sync)
    if d.is_main:
        Path(result).write_text(json.dumps({"peak_bytes": malloc.peak - malloc.baseline, "samples": malloc.samples}))
    torch.distributed.destroy_process_group()


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


_LIBC = None


def _malloc_in_use() -> int:
    """Bytes glibc has handed out and not taken back: mmapped blocks (any thread) and the main heap.
    The library is loaded on the first call and kept."""
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.mallinfo2.restype = _Mallinfo2
    info = _LIBC.mallinfo2()
    return info.hblkhd + info.uordblks


# An operation's output of this size or more is a block of its own (MALLOC_MMAP_THRESHOLD_, _env).
_SAMPLED_BYTES = 65536


def _malloc_peak():
    """The C library's bytes in use, sampled where they can reach a new peak. This is the
    allocator's own accounting, independent of fms-dyt's meter. (torch.profiler's allocation
    events miss the frees made on gloo's threads, so their running total only grows.) With
    MALLOC_MMAP_THRESHOLD_ fixed, every tensor above 64 KiB is a block of its own that leaves the
    count when it is freed, so between two samples the count grows by at most the blocks the
    operations in between returned (bar a few small bytes): a sample is taken when those blocks,
    added to the last sample, could pass the peak so far, and after every collective (gloo's
    copies of its buffers are alive when the op returns). mallinfo2 walks every arena's free
    lists, so a sample is not free: after every operation the accumulation run took minutes."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class MallocPeak(TorchDispatchMode):
        samples = 0

        def __enter__(self):
            self.baseline = self.peak = self.last = _malloc_in_use()
            self.grown = 0  # bytes of the blocks returned since the last sample
            return super().__enter__()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.grown += _new_block_bytes(out, args)
            if func.namespace == "c10d" or self.last + self.grown > self.peak:
                self.samples += 1
                self.last, self.grown = _malloc_in_use(), 0
                self.peak = max(self.peak, self.last)
            return out

    return MallocPeak()


_PAGE = 4096


def _new_block_bytes(out, args) -> int:
    """Bytes of the blocks of their own (storages of :data:`_SAMPLED_BYTES` or more, rounded up to
    whole pages and one for the block's header) that ``out`` holds and none of ``args`` holds."""
    import torch
    from torch.utils._pytree import tree_flatten

    storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tree_flatten(out)[0]
                if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() >= _SAMPLED_BYTES}
    if not storages:
        return 0
    for t in tree_flatten(args)[0]:
        if isinstance(t, torch.Tensor):
            storages.pop(t.untyped_storage()._cdata, None)
    return sum(-(-n // _PAGE) * _PAGE + _PAGE for n in storages.values())


if __name__ == "__main__":
    _real_run(sys.argv[1], sys.argv[2:])
