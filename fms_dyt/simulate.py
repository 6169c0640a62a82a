"""A full-scale dry run of one rank's training steps on fake tensors, on a machine without a GPU.

``python -m fms_dyt.plan <overrides> --simulate [--nodes N --gpus-per-node G]`` calls
:func:`simulate`: it joins a fake process group of the cluster's whole world size (collectives
return at once and move nothing), builds the model exactly as ``train.py`` does
(``fms_dyt.trainer.build_model``: meta init, ``apply_parallelism`` with its activation
checkpointing, mixed precision and FSDP2 sharding), allocates it as ``materialize`` does but under
``FakeTensorMode`` and without initial values, and runs two training steps of rank 0 (forward, loss, backward, gradient
clipping, AdamW, the config's gradient accumulation) on fake batches of the config's
micro-batch x seq_len. Fake tensors have shapes, dtypes and storages but no data, so a 70B step
takes minutes on two cores and no memory. :class:`fms_dyt.plan.MemoryMeter` counts every
storage alive after every operation and reports rank 0's peak by category: parameters (fp32
shards and the all-gathered compute-dtype copies), gradients, optimizer state, activations
(everything autograd keeps, and the step's temporaries) and communication buffers (FSDP2's
all-gather and reduce-scatter buffers).

What it is not: the fake devices are CPUs (FSDP2 on a "cuda" mesh needs a CUDA driver), so the
figure is the bytes of PyTorch tensors only. What a GPU holds outside them -- the CUDA context,
NCCL's own buffers, the caching allocator's fragmentation -- stays the planner's ``overhead``.
``torch.compile`` is off, so for compiled runs the activations are an upper bound.
"""

from __future__ import annotations

import itertools
import time
from contextlib import ExitStack, contextmanager
from unittest import mock

import torch
import torch.distributed as dist
from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

from fms_dyt.config import schedule
from fms_dyt.plan import GIB, MemoryMeter

STEPS = 2  # the second step has the optimizer state the first one creates


@contextmanager
def _fsdp_roles(meter: MemoryMeter):
    """Tell the meter what FSDP2's allocations are for.

    Unsharding (all-gather) and the post-backward reduction allocate communication buffers; the
    all-gathered parameters are parameters; reduced and accumulated gradients are gradients, and
    so is each unsharded gradient as autograd accumulates it.
    """
    hooked: set[int] = set()

    def on_grad(param):
        meter.tag([param.grad], "grads")

    def unshard(group, *args, **kwargs):
        with meter.allocating("comm"):
            return original["unshard"](group, *args, **kwargs)

    def wait_for_unshard(group, *args, **kwargs):
        with meter.allocating("comm"):
            out = original["wait_for_unshard"](group, *args, **kwargs)
        for fsdp_param in group.fsdp_params:
            meter.tag(fsdp_param.all_gather_outputs, "params")
            param = fsdp_param.unsharded_param
            if id(param) not in hooked:
                hooked.add(id(param))
                param.register_post_accumulate_grad_hook(on_grad)
        return out

    def post_backward(group, *args, **kwargs):
        with meter.allocating("comm"):
            out = original["post_backward"](group, *args, **kwargs)
        for fsdp_param in group.fsdp_params:
            meter.tag([fsdp_param.sharded_param.grad, fsdp_param.unsharded_accumulated_grad], "grads")
        meter.tag([group._partial_reduce_output], "grads")  # HSDP: the shard kept for the replica all-reduce
        return out

    def resize_(storage, size):
        out = original_resize(storage, size)
        meter.resized(storage)
        return out

    original = {name: getattr(FSDPParamGroup, name) for name in ("unshard", "wait_for_unshard", "post_backward")}
    original_resize = torch.UntypedStorage.resize_
    with ExitStack() as stack:
        for name, wrapper in (("unshard", unshard), ("wait_for_unshard", wait_for_unshard),
                              ("post_backward", post_backward)):
            stack.enter_context(mock.patch.object(FSDPParamGroup, name, wrapper))
        stack.enter_context(mock.patch.object(torch.UntypedStorage, "resize_", resize_))
        yield


@contextmanager
def _optimizer_role(meter: MemoryMeter, optimizer):
    """What ``optimizer.step`` allocates (AdamW's moments on the first step) is optimizer state."""
    outer = []

    def pre(*_):
        outer.append(meter.category)
        meter.category = "optimizer"

    def post(*_):
        meter.category = outer.pop()

    handles = [optimizer.register_step_pre_hook(pre), optimizer.register_step_post_hook(post)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def simulate(cfg, nodes: int, gpus_per_node: int) -> dict:
    """Rank 0's peak memory over :data:`STEPS` training steps at the cluster's world size.

    Returns ``simulated_peak_gib``, its parts ``simulated_gib`` and the run's wall time.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from fms_dyt import trainer
    from fms_dyt.optim import build_optimizer
    from fms_dyt.parallel import Dist, build_mesh, mesh_shape

    t0 = time.perf_counter()
    cfg = cfg.copy()
    cfg.parallel.compile = False  # compiled blocks keep less; the simulator measures eager ones
    if cfg.train.max_steps is None and cfg.train.tokens is None:
        cfg.train.max_steps = STEPS
    world = nodes * gpus_per_node
    _, accum = schedule(cfg, world)
    replicas, _ = mesh_shape(cfg.parallel.sharding, world, gpus_per_node, cfg.parallel.replicas)
    d = Dist(rank=0, world_size=world, local_rank=0, local_world_size=gpus_per_node, device=torch.device("cpu"))
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        mesh = build_mesh(cfg.parallel, d)
        fake = FakeTensorMode(allow_non_fake_inputs=True)

        def allocate(model, device, seed):
            # materialize's allocation on fake tensors, without its initial values: fake weights
            # have none to compute. Metered from the allocation on, so that every storage the model holds is counted.
            with fake, meter, meter.allocating("params"):
                model.to_empty(device=device)
                model.init_buffers(device)

        meter = MemoryMeter()
        # Built and parallelised on the meta device, as train.py does.
        with mock.patch.object(trainer, "materialize", allocate):
            model = trainer.build_model(cfg, d, mesh)
        with fake:
            optimizer = build_optimizer(model, cfg.optim)
            t, vocab = cfg.train, cfg.model.vocab_size
            tokens = torch.randint(0, vocab, (t.micro_batch_size, t.seq_len))
            batches = itertools.repeat((tokens, tokens))
            with meter, _fsdp_roles(meter), _optimizer_role(meter, optimizer):
                for _ in range(STEPS):
                    trainer.train_step(model, optimizer, batches, accum, cfg.optim.grad_clip, d.device,
                                       defer_grad_sync=cfg.parallel.defer_grad_sync, hybrid=replicas > 1,
                                       check_finite=False)
    finally:
        dist.destroy_process_group()
    return {
        "simulated_peak_gib": round(meter.peak / GIB, 3),
        "simulated_gib": {k: round(v / GIB, 3) for k, v in meter.at_peak.items()},
        "simulated_steps": STEPS,
        "simulated_wall_s": round(time.perf_counter() - t0, 1),
    }
