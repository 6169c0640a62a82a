"""Process groups, the device mesh, and the one function that parallelises a model.

``apply_parallelism`` takes the plain ``Transformer`` (ideally still on the meta device) and applies,
per transformer block: activation checkpointing, ``torch.compile``, then FSDP2 ``fully_shard``; the
embedding and (final norm, output head) are FSDP units of their own; the root comes last. Every
sharding mode is FSDP2: full sharding on a 1-D ``("shard",)`` mesh of the whole world (FSDP proper,
as torchtitan and OLMo-core lay it out), hybrid on a 2-D ``("replicate", "shard")`` mesh of
(replicas, world / replicas) and none on (world, 1). One code path runs with NCCL (plus gloo for CPU
tensors) on GPUs and gloo on CPUs.

Timeouts: a collective that waits longer than its process group's timeout ends the run on every
rank, so a dead or hung rank costs minutes, not the rest of the allocation. Start-up (rendezvous,
rank 0's reads, the DCP load, the first compiled step) can legitimately keep ranks waiting for many
minutes at 1,024 ranks and runs under ``parallel.init_timeout_s``; after the first step every group
switches to ``parallel.timeout_s`` (:func:`use_step_timeout`), except the checkpoint group, whose
collectives wait for the slowest rank's write (:func:`checkpoint_group`). docs/architecture.md
explains the defaults.
"""

from __future__ import annotations

import os
import pickle
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, TypeVar

import torch
import torch.distributed as dist
from torch.distributed._composable import checkpoint as checkpoint_activations
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.distributed_c10d import _world
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from fms_dyt import float8
from fms_dyt.errors import ConfigError, config_dtype

T = TypeVar("T")
CHECKPOINT_GROUP = "checkpoint"  # the description of DCP's own gloo process group


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now, for a process group of several local processes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_group_backend(device: torch.device) -> str:
    """NCCL for CUDA tensors plus gloo for CPU ones: ``dcp.async_save`` stages and synchronises on
    the CPU, so NCCL alone fails at the first asynchronous checkpoint. CPU runs: gloo."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def init_distributed(device: str = "auto", timeout_s: int = 1800) -> Dist:
    """Join the process group torchrun set up, or make a one-process group for ``python train.py``.

    ``timeout_s`` is the start-up timeout (the trainer passes ``parallel.init_timeout_s``); the
    trainer shortens it after the first step with :func:`use_step_timeout`."""
    if "RANK" not in os.environ and os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
        # Hydra sweeps through submitit: one process per GPU started by srun, ranks from Slurm
        import submitit

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    alone = os.environ["WORLD_SIZE"] == "1"
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    elif device in ("auto", "cpu"):
        dev = torch.device("cpu")
    else:
        raise ConfigError(f"train.device={device!r}: use auto, cuda or cpu")
    if not dist.is_initialized():
        # one process: an in-memory store, not a TCP port (two runs started at once picked the
        # same "free" port and one died with EADDRINUSE)
        store = dict(store=dist.HashStore(), rank=0, world_size=1) if alone else {}
        dist.init_process_group(
            backend=process_group_backend(dev),
            timeout=timedelta(seconds=timeout_s),
            device_id=dev if use_cuda else None,
            **store,
        )
    return Dist(rank, world, local_rank, local_world, dev)


def mesh_shape(sharding: str, world_size: int, local_world_size: int, replicas: int | None) -> tuple[int, int]:
    """(replicate, shard) sizes of the data parallelism: how many copies of the model, and over how
    many ranks each copy is sharded (full sharding: one copy; :func:`mesh_layout` makes it a 1-D mesh)."""
    if sharding == "full":
        return 1, world_size
    if sharding == "none":
        return world_size, 1
    replicas = replicas or max(1, world_size // local_world_size)
    if world_size % replicas:
        raise ConfigError(
            f"parallel.sharding=hybrid: world size {world_size} is not divisible by "
            f"parallel.replicas={replicas}; set parallel.replicas to a divisor of the world size"
        )
    return replicas, world_size // replicas


def mesh_layout(sharding: str, world_size: int, local_world_size: int,
                replicas: int | None) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """The data-parallel mesh's (shape, dimension names). Full sharding: 1-D ``("shard",)`` over
    the world, so FSDP2 takes its plain path (a (1, world) mesh made it run the hybrid path, with a
    replicate group of one rank and its all-reduce per step). Hybrid and none: 2-D
    ``("replicate", "shard")``."""
    replicate, shard = mesh_shape(sharding, world_size, local_world_size, replicas)
    if sharding == "full":
        return (shard,), ("shard",)
    return (replicate, shard), ("replicate", "shard")


def build_mesh(cfg_parallel, d: Dist) -> DeviceMesh:
    """The data-parallel mesh (:func:`mesh_layout`); its process groups start with
    ``parallel.init_timeout_s`` (torch gives a new group its own default, 10 or 30 minutes)."""
    shape, names = mesh_layout(cfg_parallel.sharding, d.world_size, d.local_world_size, cfg_parallel.replicas)
    mesh = init_device_mesh(d.device.type, shape, mesh_dim_names=names)
    for group in mesh.get_all_groups():
        dist.set_timeout(timedelta(seconds=cfg_parallel.init_timeout_s), group)
    return mesh


def checkpoint_group(timeout_s: int) -> dist.ProcessGroup:
    """A gloo process group of every rank for DCP's collectives alone, made once per process group
    (every rank calls it, like any ``new_group``): an asynchronous save runs them in a background
    thread, and on the default group they would interleave with the training step's. Its timeout
    stays ``timeout_s`` (the start-up one): DCP's last collective of a save or load waits for the
    slowest rank's I/O, which the step timeout is not sized for."""
    for group in _world.pg_map:
        if group.group_desc == CHECKPOINT_GROUP:
            return group
    return dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s), group_desc=CHECKPOINT_GROUP)


def use_step_timeout(timeout_s: int) -> None:
    """Switch every process group of this process but the checkpoint group to ``timeout_s``
    (``parallel.timeout_s``): called once start-up is over, after the first step. Applies to the
    collectives issued from now on, NCCL's and gloo's alike."""
    for group in list(_world.pg_map):
        if group.group_desc != CHECKPOINT_GROUP:
            dist.set_timeout(timedelta(seconds=timeout_s), group)


def on_rank0(read: Callable[[], T], device: torch.device | None = None) -> T:
    """``read()`` on rank 0 alone, its result on every rank: for whatever every rank needs and one
    read can serve (the validation windows, telemetry's batch, the choice of the checkpoint to
    resume), so 1,024 ranks do not open, stat or stream the same files at start-up.

    The result travels pickled in one ``broadcast_object_list``; a tensor result, when ``device`` is
    given, goes by a second ``broadcast`` on that device instead (NCCL on GPUs). Rank 0's exception
    is raised on every rank, as the same type when it pickles (a ConfigError still exits 2
    everywhere), so no rank waits for a value that never comes."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return read()
    if dist.get_rank() == 0:
        try:
            value = read()
        except Exception as e:
            dist.broadcast_object_list([("error", _portable(e))], src=0, device=device)
            raise
        as_tensor = isinstance(value, torch.Tensor) and device is not None
        header = [("tensor", tuple(value.shape), value.dtype) if as_tensor else ("value", value)]
        dist.broadcast_object_list(header, src=0, device=device)
        if not as_tensor:
            return value
        buffer = value.to(device)
    else:
        header = [None]
        dist.broadcast_object_list(header, src=0, device=device)
        kind, *rest = header[0]
        if kind == "error":
            raise rest[0]
        if kind == "value":
            return rest[0]
        buffer = torch.empty(rest[0], dtype=rest[1], device=device)
    dist.broadcast(buffer, src=0)
    return buffer


def _portable(error: Exception) -> Exception:
    """``error`` as it can be raised on another rank: itself when it pickles, else a RuntimeError
    with its type and message; either way noting that rank 0 raised it."""
    try:
        copy = pickle.loads(pickle.dumps(error))
    except Exception:
        copy = RuntimeError(f"{type(error).__name__}: {error}")
    copy.add_note("(raised on rank 0, which reads this for every rank)")
    return copy


def checkpointed_blocks(n_layers: int, mode: str, fraction: float) -> list[bool]:
    """Which blocks recompute their activations: all (full), a spread-out fraction (selective), none."""
    if mode == "full":
        return [True] * n_layers
    if mode == "off":
        return [False] * n_layers
    # Selective: block i is checkpointed when floor((i+1)p) steps up, e.g. every other block at p=0.5.
    return [int((i + 1) * fraction) > int(i * fraction) for i in range(n_layers)]


def apply_parallelism(model: torch.nn.Module, cfg_parallel, mesh: DeviceMesh) -> torch.nn.Module:
    """FP8 linear layers (``parallel.float8``), activation checkpointing, per-block compile and
    FSDP2, in place (parameter names unchanged)."""
    if cfg_parallel.float8 != float8.OFF:  # before sharding and compile, which must see Float8Linear
        float8.convert(model, cfg_parallel.float8)
        if cfg_parallel.float8_dyt_static_scale:
            float8.scale_dyt_outputs(model)
    param_dtype = config_dtype("parallel.param_dtype", cfg_parallel.param_dtype)
    mp = MixedPrecisionPolicy(
        param_dtype=None if param_dtype == torch.float32 else param_dtype,
        reduce_dtype=config_dtype("parallel.reduce_dtype", cfg_parallel.reduce_dtype),
    )
    ac = checkpointed_blocks(len(model.layers), cfg_parallel.activation_checkpointing, cfg_parallel.ac_fraction)
    # FSDP units as torchtitan lays them out: the embedding, each block, then the final norm and the
    # output head together, kept unsharded after forward because backward starts with them at once.
    embedding = fully_shard(model.tok_embeddings, mesh=mesh, mp_policy=mp)
    # The embedding's backward needs the token ids and the output gradient, not its weight: skip
    # the all-gather of vocab x dim before it (at 7B, 0.26 GB per micro-batch in bf16).
    embedding.set_unshard_in_backward(False)
    for block, recompute in zip(model.layers, ac):
        if recompute:
            checkpoint_activations(block)
        if cfg_parallel.compile:
            # A graph break is an error, not a silent slowdown. Only forward is compiled: the hooks
            # of activation checkpointing and FSDP run around it (dynamo cannot trace the former).
            block.forward = torch.compile(block.forward, fullgraph=True)
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard([model.norm, model.output], mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


@torch.no_grad()
def materialize(model: torch.nn.Module, device: torch.device, seed: int) -> None:
    """Allocate a meta-device model on ``device`` and initialise it from the seed.

    Each rank computes each parameter's full initial value from (seed, name) and keeps its own
    shard, with no communication, so weights do not depend on the world size or the sharding.
    """
    model.to_empty(device=device)
    for name, p in model.named_parameters():
        full = model.initial_value(name, p, seed).to(device=device, dtype=p.dtype)
        if isinstance(p, DTensor):
            full = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
        p.copy_(full)
    model.init_buffers(device)
