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

The last of those steps is also audited (:class:`fms_dyt.audit.StepAudit`): the collectives it issues
by kind, process group and bytes, and its device-to-host reads. The step is the trainer's own
``fms_dyt.trainer.train_step``, called with the arguments the training loop passes, so what it
counts is what a non-log step of ``train.py`` costs (the loop's stop agreement,
``StopRequest.agreed``, is called outside ``train_step`` and is not part of it). A fake tensor has
no value to read back: each read is counted and answered with zero (a finite loss, no stop).

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
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from fms_dyt.audit import _HOST_READS, StepAudit, _op_name, collective_kind, process_groups
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


class _FakeStepAudit(StepAudit):
    """:class:`StepAudit` for fake tensors: a device-to-host read is counted and answered with zero
    (a fake tensor has no value; zero is a finite loss and "no stop"), and the ranks of every
    process group a collective runs on are kept (``groups``: description -> ranks), so that the
    planner can tell a group within a node from one across nodes."""

    def __init__(self):
        super().__init__()
        self.groups: dict[str, list[int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = _op_name(func)
        if name in _HOST_READS and not is_traceable_wrapper_subclass(args[0]):  # a DTensor's: its shard's, below
            self.host_reads[name] += 1
            dtype = args[0].dtype
            return False if dtype == torch.bool else 0.0 if dtype.is_floating_point else 0
        if collective_kind(func) is not None:
            for group in process_groups([*args, *(kwargs or {}).values()]):
                self.groups.setdefault(group.group_desc or group.group_name, dist.get_process_group_ranks(group))
        return super().__torch_dispatch__(func, types, args, kwargs)


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
            audit = _FakeStepAudit()
            # The audit below the meter: the meter sees DTensor ops whole, as the trainer holds them.
            with audit, meter, _fsdp_roles(meter), _optimizer_role(meter, optimizer):
                for step in range(1, STEPS + 1):
                    audit.reset()  # the last step is reported: the first one also creates AdamW's state
                    # As fms_dyt.trainer's loop calls it on every step.
                    trainer.train_step(model, optimizer, batches, accum, cfg.optim.grad_clip, d.device,
                                       defer_grad_sync=cfg.parallel.defer_grad_sync,
                                       hybrid=cfg.parallel.sharding != "full")
    finally:
        dist.destroy_process_group()
    return {
        "simulated_peak_gib": round(meter.peak / GIB, 3),
        "simulated_gib": {k: round(v / GIB, 3) for k, v in meter.at_peak.items()},
        "simulated_steps": STEPS,
        "simulated_wall_s": round(time.perf_counter() - t0, 1),
        "collectives_per_step": audit.by_kind(),
        "collectives_per_step_by_group": [
            {"kind": kind, "group": group, "ranks": len(audit.groups.get(group, ())),
             "nodes": len({r // gpus_per_node for r in audit.groups.get(group, ())}),
             "count": n, "bytes": audit.collective_bytes[kind, group]}
            for (kind, group), n in sorted(audit.collectives.items())
        ],
        "host_syncs_per_step": audit.total_host_reads(),
        "host_reads_per_step": dict(audit.host_reads),
    }
