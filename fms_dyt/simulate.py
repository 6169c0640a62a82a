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
Ops take the path a GPU takes (fms-dyt's CPU kernels are switched off: they need real data), and
``torch.compile`` is off, so for compiled runs the activations are an upper bound.
"""

from __future__ import annotations

import itertools
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from unittest import mock

import torch
import torch.distributed as dist
from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

from fms_dyt import ops
from fms_dyt.ops import cross_entropy
from fms_dyt.plan import GIB, MemoryMeter

STEPS = 2  # the second step has the optimizer state the first one creates


@dataclass
class StepResult:
    loss: torch.Tensor  # mean over micro-batches and ranks
    grad_norm: torch.Tensor
    updated: bool
    data_wait_s: float


# TODO(merge): use trainer.train_step (same signature and semantics).
def _train_step(model, optimizer, batches, accum: int, grad_clip: float, device, *,
                defer_grad_sync: bool = False, hybrid: bool = False, check_finite: bool = True) -> StepResult:
    """One optimizer step over ``accum`` micro-batches from ``batches``.

    By default every micro-batch's backward reduce-scatters its gradients (each rank keeps only
    its fp32 gradient shard); with ``hybrid`` the all-reduce across replicas waits for the last
    micro-batch; ``defer_grad_sync`` keeps unsharded fp32 gradients until the last one instead.
    ``check_finite=False`` never reads a value on the host (no ``.item()``) and always updates.
    """
    loss_sum = torch.zeros((), device=device)
    data_wait = 0.0
    for micro in range(accum):
        last = micro == accum - 1
        if defer_grad_sync:
            model.set_requires_gradient_sync(last)
        elif hybrid:
            model.set_requires_all_reduce(last)
        t_data = time.perf_counter()
        inputs, targets = next(batches)
        data_wait += time.perf_counter() - t_data
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        loss = micro_batch_loss(model, inputs, targets) / accum
        loss.backward()
        loss_sum += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    dist.all_reduce(loss_sum)  # SUM: gloo has no AVG
    loss_mean = loss_sum / dist.get_world_size()
    updated = not check_finite or bool(torch.isfinite(loss_mean) & torch.isfinite(grad_norm))
    if updated:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_mean, grad_norm, updated, data_wait)


def micro_batch_loss(model, inputs, targets) -> torch.Tensor:
    # The logits die with this frame: the loss keeps what its backward needs.
    logits = model(inputs)
    return cross_entropy(logits.flatten(0, 1), targets.flatten())


def gpu_ops():
    """Inside this block fms-dyt's ops take the formulation they take on a GPU: the CPU kernels
    (DyT, cross-entropy) are switched off. They need real data, and the loss kernel keeps less
    memory than the fp32 log-softmax a GPU keeps."""
    # TODO(merge): keep this switch if ops.py still has the CPU kernels behind ops.cpu_kernel.
    return mock.patch.object(ops, "cpu_kernel", lambda: None)


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
    _, accum = trainer.schedule(cfg, world)
    replicas, _ = mesh_shape(cfg.parallel.sharding, world, gpus_per_node, cfg.parallel.replicas)
    d = Dist(rank=0, world_size=world, local_rank=0, local_world_size=gpus_per_node, device=torch.device("cpu"))
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        mesh = build_mesh(cfg.parallel, d)
        fake = FakeTensorMode(allow_non_fake_inputs=True)

        def allocate(model, device, seed):
            # materialize's allocation on fake tensors, without its initial values: fake weights
            # have none, and computing and scattering them at 1,024 ranks takes longer than the steps.
            # TODO(merge): call trainer.materialize itself if it now fills each shard locally.
            # Metered from the allocation on, so that every storage the model holds is counted.
            with fake, meter, meter.allocating("params"):
                model.to_empty(device=device)
                model.init_buffers(device)

        meter = MemoryMeter()
        # Built and parallelised on the meta device, as train.py does.
        with mock.patch.object(trainer, "materialize", allocate):
            model = trainer.build_model(cfg, d, mesh)
        with fake, gpu_ops():
            optimizer = build_optimizer(model, cfg.optim)
            t, vocab = cfg.train, cfg.model.vocab_size
            tokens = torch.randint(0, vocab, (t.micro_batch_size, t.seq_len))
            batches = itertools.repeat((tokens, tokens))
            with meter, _fsdp_roles(meter), _optimizer_role(meter, optimizer):
                for _ in range(STEPS):
                    _train_step(model, optimizer, batches, accum, cfg.optim.grad_clip, d.device,
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
