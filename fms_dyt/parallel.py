"""Process groups, the device mesh, and the one function that parallelises a model.

``apply_parallelism`` takes the plain ``Transformer`` (ideally still on the meta device) and applies,
per transformer block: activation checkpointing, ``torch.compile``, then FSDP2 ``fully_shard``; the
embedding and (final norm, output head) are FSDP units of their own; the root comes last. Every
sharding mode is FSDP2 on a 2-D (replicate, shard) mesh: full = (1, world), hybrid = (replicas,
world / replicas), none = (world, 1). One code path runs with NCCL (plus gloo for CPU tensors) on
GPUs and gloo on CPUs.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed._composable import checkpoint as checkpoint_activations
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from fms_dyt.errors import ConfigError, config_dtype


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


def init_distributed(device: str = "auto", timeout_s: int = 600) -> Dist:
    """Join the process group torchrun set up, or make a one-process group for ``python train.py``."""
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
    """(replicate, shard) sizes of the data-parallel mesh."""
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


def build_mesh(cfg_parallel, d: Dist) -> DeviceMesh:
    shape = mesh_shape(cfg_parallel.sharding, d.world_size, d.local_world_size, cfg_parallel.replicas)
    return init_device_mesh(d.device.type, shape, mesh_dim_names=("replicate", "shard"))


def checkpointed_blocks(n_layers: int, mode: str, fraction: float) -> list[bool]:
    """Which blocks recompute their activations: all (full), a spread-out fraction (selective), none."""
    if mode == "full":
        return [True] * n_layers
    if mode == "off":
        return [False] * n_layers
    # Selective: block i is checkpointed when floor((i+1)p) steps up, e.g. every other block at p=0.5.
    return [int((i + 1) * fraction) > int(i * fraction) for i in range(n_layers)]


def apply_parallelism(model: torch.nn.Module, cfg_parallel, mesh: DeviceMesh) -> torch.nn.Module:
    """Activation checkpointing, per-block compile and FSDP2, in place (parameter names unchanged)."""
    param_dtype = config_dtype("parallel.param_dtype", cfg_parallel.param_dtype)
    mp = MixedPrecisionPolicy(
        param_dtype=None if param_dtype == torch.float32 else param_dtype,
        reduce_dtype=config_dtype("parallel.reduce_dtype", cfg_parallel.reduce_dtype),
    )
    ac = checkpointed_blocks(len(model.layers), cfg_parallel.activation_checkpointing, cfg_parallel.ac_fraction)
    # FSDP units as torchtitan lays them out: the embedding, each block, then the final norm and the
    # output head together, kept unsharded after forward because backward starts with them at once.
    fully_shard(model.tok_embeddings, mesh=mesh, mp_policy=mp)
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
