"""Training throughput on 1 vs 2 processes (gloo, FSDP2 full sharding), the same global batch.

Each process runs fms-dyt's own path: meta-device model, ``apply_parallelism`` (FSDP2 units as
the trainer lays them out), ``materialize`` from the seed, ``build_optimizer`` and the trainer's
``train_step``.
The cores are split between the processes, so on one machine this measures what sharding costs
(all-gathers, reduce-scatters, the gloo transport), not a speed-up.
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
import time

import torch
import torch.multiprocessing as mp
from harness import median

from fms_dyt.parallel import free_port


def _worker(rank: int, world: int, port: int, spec: dict, out_path: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from fms_dyt.config import load_config, model_args, norm_args
    from fms_dyt.model import Transformer
    from fms_dyt.optim import build_optimizer
    from fms_dyt.parallel import apply_parallelism, materialize
    from fms_dyt.trainer import train_step

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, spec["cores"] // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cfg = load_config([*spec["model"], "norm=dyt", "parallel.param_dtype=float32"])
        with torch.device("meta"):
            model = Transformer(model_args(cfg), norm_args(cfg))
        mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("replicate", "shard"))
        apply_parallelism(model, cfg.parallel, mesh)
        materialize(model, torch.device("cpu"), seed=0)
        optimizer = build_optimizer(model, cfg.optim)
        g = torch.Generator().manual_seed(rank)
        per_rank = spec["global_batch"] // world
        tokens = torch.randint(0, model.args.vocab_size, (per_rank, spec["seq_len"] + 1), generator=g)
        batches = itertools.repeat((tokens[:, :-1], tokens[:, 1:]))
        times = []
        for i in range(spec["warmup"] + spec["steps"]):
            dist.barrier()
            t0 = time.perf_counter()
            train_step(model, optimizer, batches, 1, cfg.optim.grad_clip, torch.device("cpu"))
            dist.barrier()
            if i >= spec["warmup"]:
                times.append(time.perf_counter() - t0)
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(times, f)
    finally:
        dist.destroy_process_group()


def step_times(world: int, spec: dict) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.json")
        mp.spawn(_worker, args=(world, free_port(), spec, out), nprocs=world, join=True)
        with open(out) as f:
            return json.load(f)


def measure(quick: bool = False) -> tuple[dict, dict]:
    model = ["model=tiny", "model.n_layers=2", "model.vocab_size=512"] if quick else ["model=small"]
    spec = {"model": model, "global_batch": 4, "seq_len": 32 if quick else 256,
            "warmup": 1 if quick else 2, "steps": 3 if quick else 5, "cores": os.cpu_count() or 1}
    tokens = spec["global_batch"] * spec["seq_len"]
    rates = {}
    for world in (1, 2):
        rates[world] = tokens / median(step_times(world, spec))
    results = {
        "gloo_1rank_tokens_per_s": rates[1],
        "gloo_2rank_tokens_per_s": rates[2],
        "gloo_2rank_over_1rank_throughput": rates[2] / rates[1],
    }
    return results, {"scaling": spec}
