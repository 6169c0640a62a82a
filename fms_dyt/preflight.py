"""Preflight: before the first step of every (re)start, each rank checks that it sees its device
and that every rank answers one small collective within ``preflight.timeout_s``. A node that
fails is named and the run exits 5, so a job on a bad node fails in seconds (and
``slurm/launch.sh`` requeues it without that node) instead of hanging until its time limit.

Two rounds: every rank checks in on the rendezvous store (which needs no device and shows which
ranks never arrived), then one all-reduce on the training process group (NCCL on GPUs), with the
group's timeout shortened for it.
"""

from __future__ import annotations

import logging
from datetime import timedelta

import torch
import torch.distributed as dist

from fms_dyt.errors import EXIT_PREFLIGHT
from fms_dyt.failures import node_name

log = logging.getLogger("fms_dyt")


class PreflightError(RuntimeError):
    """A node failed the preflight check; ``bad_node`` names it (None: unknown), ``bad_rank`` a rank on it."""

    exit_code = EXIT_PREFLIGHT

    def __init__(self, message: str, bad_node: str | None, bad_rank: int | None):
        super().__init__(message)
        self.bad_node, self.bad_rank = bad_node, bad_rank


def device_problem(device: torch.device, local_rank: int, local_world: int) -> str | None:
    """What is wrong with this rank's device (None: nothing): too few GPUs, or one that fails a
    tiny computation."""
    if device.type != "cuda":
        return None
    try:
        count = torch.cuda.device_count()
        if count < local_world:
            return f"sees {count} GPU(s) for {local_world} rank(s) on the node"
        x = torch.ones(1024, device=device)
        if float((x * 2).sum()) != 2048.0:
            return f"GPU {local_rank} computed a wrong sum"
    except Exception as e:  # a lost or faulty GPU raises anything from RuntimeError to AcceleratorError
        return f"GPU {local_rank} fails: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def preflight(d, timeout_s: float, init_timeout_s: float, attempt: str) -> None:
    """Run the checks on every rank; raise :class:`PreflightError` naming the bad node."""
    me = node_name()
    problem = device_problem(d.device, d.local_rank, d.local_world_size)
    if d.world_size == 1:
        if problem:
            raise PreflightError(f"preflight: {me}: {problem}", me, d.rank)
        return
    store = dist.distributed_c10d._get_default_store()
    prefix = f"fms_dyt/preflight/{attempt}/"
    store.set(f"{prefix}{d.rank}", f"{me}\n{problem or ''}")
    keys = [f"{prefix}{r}" for r in range(d.world_size)]
    try:
        store.wait(keys, timedelta(seconds=timeout_s))
    except Exception:  # a timeout: some ranks never checked in
        missing = [r for r in range(d.world_size) if not store.check([keys[r]])]
        nodes = sorted({r // d.local_world_size for r in missing})
        raise PreflightError(
            f"preflight: rank(s) {missing} (node group(s) {nodes} of {d.local_world_size} ranks) did not check in "
            f"within preflight.timeout_s={timeout_s:g} s", None, missing[0]) from None
    reports = [store.get(k).decode().split("\n", 1) for k in keys]
    bad = [(r, node, why) for r, (node, why) in enumerate(reports) if why]
    if bad:
        r, node, why = bad[0]
        raise PreflightError(f"preflight: node {node} (rank {r}) {why}; other bad ranks: "
                             f"{[b[0] for b in bad[1:]] or 'none'}", node, r)
    nodes = [node for node, _ in reports]
    group = dist.group.WORLD
    dist.set_timeout(timedelta(seconds=timeout_s), group)
    try:
        total = torch.ones(1, device=d.device)
        dist.all_reduce(total, group=group)
        if int(total.item()) != d.world_size:
            raise PreflightError(f"preflight: an all-reduce of ones over {d.world_size} ranks gave {total.item()}",
                                 None, None)
    except PreflightError:
        raise
    except Exception as e:
        raise PreflightError(f"preflight: the all-reduce over all ranks failed within preflight.timeout_s="
                             f"{timeout_s:g} s on node {me}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                             None, None) from None
    finally:
        dist.set_timeout(timedelta(seconds=init_timeout_s), group)
    if d.is_main:
        log.info("preflight: %d ranks on %d node(s) see their devices and answer a collective", d.world_size,
                 len(set(nodes)))
