"""``python -m fms_dyt.plan [hydra overrides] [--json] [--nodes N --gpus-per-node G --gpu a100|h100|h200] [--simulate]``

What a config will build and what it will cost, without building it: the parameter count by part,
the α₀ chosen per norm site, and for a GPU cluster the memory each GPU needs (parameters,
gradients, optimiser state, activations), the training FLOPs per token, tokens/s at an assumed
MFU and the days needed for ``train.tokens``. The model is instantiated on the meta device, so
the 70B plan runs on a laptop.

The default cluster is the one the config implies: as many GPUs as make one micro-batch per GPU
add up to ``train.global_batch_tokens`` (no gradient accumulation), in nodes of 8 — exactly the
paper's layouts (7B/13B: 64 nodes x 8, 34B/70B: 128 x 8).

The activation model counts the tensors eager PyTorch keeps for backward in fms-dyt's model
(flash-style attention: no sequence² term), plus the largest transient of the backward pass;
``--measure`` checks it on this machine's CPU by running the config's micro-batch once.

Tokens/s: the step's compute at the assumed MFU (``--mfu``, the efficiency of the GPU while it
computes; a checkpointed block's backward computes its forward again), plus the communication
compute does not hide. FSDP2's collectives (all-gathers of each unit's parameters, reduce-scatters
of its gradients, with hybrid sharding all-reduces across replicas) are counted in bytes and timed
at the link bandwidths of the GPU's node (:class:`Network`: NVLink within a node, one InfiniBand
port per GPU across nodes, ring algorithms); FSDP2 overlaps each collective with the compute of a
neighbouring unit, and only what sticks out is added (:func:`step_communication`).
``torch.compile``d blocks keep less (inductor recomputes pointwise results), so for compiled runs
the plan is an upper bound. ``--simulate`` also runs rank 0's training steps at the full world size
on fake tensors (``fms_dyt.simulate``) and reports its measured peak next to the plan, and the
collectives (count, bytes and link time by kind and group) and device-to-host reads of its last
step, the trainer's own ``train_step``; it exits 2 when that peak does not fit the GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import weakref
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten

from fms_dyt.config import ConfigError, load_config, model_args, norm_args, schedule
from fms_dyt.errors import EXIT_CONFIG, config_dtype, refuse
from fms_dyt.metrics import PEAK_FLOPS, flops_per_token, matmul_params
from fms_dyt.model import ModelArgs, Transformer, count_parameters
from fms_dyt.norms import NormArgs, norm_class
from fms_dyt.loss import cross_entropy

GIB = 2**30


@dataclass(frozen=True)
class Gpu:
    peak_flops: float  # dense bf16, FLOP/s
    memory_gib: float
    nvlink_gb_s: float  # within a node: NVLink, GB/s per GPU and direction
    network_gbit_s: float  # across nodes: the GPU's own InfiniBand port, Gb/s per direction


GPUS = {
    # A100 80GB SXM: NVLink3 600 GB/s in both directions together (NVIDIA A100 datasheet); DGX A100:
    # one 200 Gb/s HDR InfiniBand port per GPU (ConnectX-6, DGX A100 user guide).
    "a100": Gpu(PEAK_FLOPS["A100"], 80.0, 300.0, 200.0),
    # H100 SXM: NVLink4 900 GB/s in both directions together (NVIDIA H100 datasheet); DGX H100: one
    # 400 Gb/s NDR InfiniBand port per GPU (ConnectX-7, DGX H100 user guide).
    "h100": Gpu(PEAK_FLOPS["H100"], 80.0, 450.0, 400.0),
    # H200 SXM: 141 GB HBM3e, NVLink 900 GB/s (NVIDIA H200 datasheet); networked as the DGX H100.
    "h200": Gpu(PEAK_FLOPS["H200"], 141e9 / GIB, 450.0, 400.0),
}
GPUS_PER_NODE = 8
DEFAULT_MFU = 0.40  # fms-fsdp reports 0.38-0.68 for LLaMA 7B-70B on A100/H100 (compiled)
DEFAULT_OVERHEAD_GIB = 2.0  # CUDA context, NCCL buffers, allocator fragmentation: an assumption


def _dtype_bytes(key: str, name: str) -> int:
    return torch.empty((), dtype=config_dtype(key, name)).element_size()


# ---- activations ---------------------------------------------------------------------------------


def activation_bytes(args: ModelArgs, norm: NormArgs, micro_batch: int, seq_len: int,
                     compute_bytes: int, checkpointed: list[bool], cpu: bool = False,
                     fp8_normed_inputs: bool = False) -> dict[str, int]:
    """Activation memory of one micro-batch: what forward keeps for backward, the bytes alive at
    the two moments of backward where the step peaks, and the larger. On GPUs, or with ``cpu``
    as the model runs eagerly on a CPU (what :func:`measure_activation_bytes` measures).

    Per token and block (eager, flash-style attention): what both norms keep (their class's
    ``saved_bytes``, ``fms_dyt.norms``), the normed input of the attention and FFN projections,
    q, k, v after RoPE, the attention output
    and its log-sum-exp (fp32, one per head), and SwiGLU's four [ffn_dim] tensors. A
    checkpointed block keeps its input only and is recomputed during backward. Around the blocks:
    the embedding output (kept for the embedding scalar's gradient), the final norm, its output,
    the logits, which the loss keeps for its backward (``fms_dyt.loss.cross_entropy``, the trainer's
    loss: its fp32 work is done in row chunks and in the gradient's own buffer).
    ``fp8_normed_inputs`` (``parallel.float8_dyt_static_scale``): the FP8 layers keep the normed
    inputs as the FP8 copy the norm hands them, 1 byte an element. (Without it torchao's
    ``Float8Linear`` keeps its high-precision input, as a plain linear layer does: no change.)
    """
    p, d, f, L = compute_bytes, args.dim, args.ffn_dim, args.n_layers
    kv_width = args.kv_heads * args.head_dim
    block_norms = norm_class(norm.kind).saved_bytes(d, p, cpu)
    normed = 2 * d * (1 if fp8_normed_inputs else p)  # the attention's and the FFN's input
    full_block = 2 * block_norms + normed + p * (2 * d + 2 * kv_width + 4 * f) + 4 * args.n_heads
    block_input = p * d
    tokens = micro_batch * seq_len
    n_ckpt, ckpt_last = sum(checkpointed), bool(checkpointed) and checkpointed[-1]
    saved = ((L - n_ckpt) * full_block + n_ckpt * block_input) * tokens
    # RoPE tables cast to the compute dtype, 4 per kept block, shared by the micro-batch.
    if p != 4:
        saved += (L - n_ckpt) * 4 * seq_len * args.head_dim * p
    embedding_kept = p * d if norm.embedding_scale else 0  # the scalar's gradient reads it
    final_norm = norm_class(norm.kind_at("final")).saved_bytes(d, p, cpu)
    head = final_norm + p * d + p * args.vocab_size  # freed by the backward of the loss, norm and head
    saved += (embedding_kept + head) * tokens
    # Transients on top, at the two candidate peaks: the loss's backward (the logits' gradient,
    # beside the logits), or the last block's backward (two [ffn_dim] gradients alive at SwiGLU's
    # backward), plus the recomputed block when activations are checkpointed.
    loss = saved + p * args.vocab_size * tokens
    block = saved - head * tokens + (2 * p * f + (full_block - block_input if ckpt_last else 0)) * tokens
    return {"saved": saved, "loss_backward": loss, "block_backward": block, "peak": max(loss, block)}


MEMORY_CATEGORIES = ("params", "grads", "optimizer", "activations", "comm")


class MemoryMeter(TorchDispatchMode):
    """Bytes of the tensor storages alive under this mode, by category, after every operation.

    A storage is counted from the operation that creates it until it is freed (its last tensor is
    gone) and follows in-place resizes (``storage.resize_``, which FSDP2 uses to free and refill
    unsharded parameters). It is counted in the category being allocated when it appears
    (``allocating``, default activations) until ``tag`` names its role, e.g. a gradient once
    autograd accumulates it. Works on real and fake tensors alike (storages are told apart by
    their C++ object, not their data pointer, which fake tensors lack).

    ``peak`` is the largest total and ``at_peak`` its parts at that moment; ``peaks`` holds each
    category's own largest value.
    """

    def __init__(self, existing: dict[str, list[torch.Tensor]] | None = None):
        super().__init__()
        self.live: dict[int, list] = {}  # storage -> [bytes, category]
        self.now = dict.fromkeys(MEMORY_CATEGORIES, 0)
        self.peaks = dict(self.now)
        self.at_peak = dict(self.now)
        self.peak = 0
        self.category = "activations"
        for category, tensors in (existing or {}).items():
            self.tag(tensors, category)

    def tag(self, tensors, category: str) -> None:
        """Count the storages of ``tensors`` as ``category`` from now on (tracking them if new)."""
        for storage in _storages(tensors):
            entry = self.live.get(storage._cdata)
            if entry is None:
                self._track(storage, category)
            elif entry[1] != category:
                self.now[entry[1]] -= entry[0]
                self.now[category] += entry[0]
                entry[1] = category
        self._update_peaks()

    @contextmanager
    def allocating(self, category: str):
        """Storages created inside this block start in ``category``."""
        outer, self.category = self.category, category
        try:
            yield
        finally:
            self.category = outer

    def resized(self, storage: torch.UntypedStorage) -> None:
        entry = self.live.get(storage._cdata)
        if entry is None:
            self._track(storage, self.category)
        else:
            self.now[entry[1]] += storage.nbytes() - entry[0]
            entry[0] = storage.nbytes()
        self._update_peaks()

    def _track(self, storage: torch.UntypedStorage, category: str) -> None:
        key = storage._cdata
        self.live[key] = [storage.nbytes(), category]
        self.now[category] += storage.nbytes()
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        nbytes, category = self.live.pop(key)
        self.now[category] -= nbytes

    def _update_peaks(self) -> None:
        for category, nbytes in self.now.items():
            if nbytes > self.peaks[category]:
                self.peaks[category] = nbytes
        total = sum(self.now.values())
        if total > self.peak:
            self.peak, self.at_peak = total, dict(self.now)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for storage in _storages(tree_flatten(out)[0]):
            if storage._cdata not in self.live:
                self._track(storage, self.category)
        self._update_peaks()
        return out


def _storages(tensors):
    """The storages that hold ``tensors``' data: a tensor subclass that wraps others (DTensor and
    its local shard) is its inner tensors, not its own storage, which has the global size."""
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        if is_traceable_wrapper_subclass(t):
            yield from _storages(getattr(t, name) for name in t.__tensor_flatten__()[0])
        else:
            yield t.untyped_storage()


def measure_activation_bytes(args: ModelArgs, norm, micro_batch: int, seq_len: int,
                             dtype: torch.dtype, checkpointed: list[bool]) -> dict[str, int]:
    """Run one forward + backward of the micro-batch on the CPU and count tensor bytes.

    Returns the bytes alive at the end of forward (``saved``) and the peak over the step
    (``peak``), both without parameters and their gradients: the measured counterpart of
    :func:`activation_bytes`.
    """
    from torch.distributed._composable import checkpoint as checkpoint_activations

    torch.manual_seed(0)
    model = Transformer(args, norm).to(dtype)
    model.init_buffers()  # RoPE tables stay fp32, as FSDP2's mixed precision leaves buffers
    for block, recompute in zip(model.layers, checkpointed):
        if recompute:
            checkpoint_activations(block)
    tokens = torch.randint(0, args.vocab_size, (micro_batch, seq_len + 1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    meter = MemoryMeter({"params": [*model.parameters(), *model.buffers(), tokens]})
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda p: meter.tag([p.grad], "grads"))
    with meter:
        loss = cross_entropy(model(inputs).flatten(0, 1), targets.flatten())  # as trainer.train_step
        saved = meter.now["activations"]
        loss.backward()
    return {"saved": saved, "peak": meter.peaks["activations"]}


# ---- the cluster plan ------------------------------------------------------------------------------


def default_layout(cfg) -> tuple[int, int]:
    """(nodes, GPUs per node) at which one micro-batch per GPU makes the global batch."""
    t = cfg.train
    world = max(1, t.global_batch_tokens // (t.micro_batch_size * t.seq_len))
    if world % GPUS_PER_NODE == 0:
        return world // GPUS_PER_NODE, GPUS_PER_NODE
    return 1, world


def _unit_params(model: Transformer) -> dict[str, int]:
    """Parameters of each FSDP2 unit: one block, the embedding, the final norm with the head, and
    the root (the model's own parameters: the embedding scalar)."""
    def count(*modules):
        return sum(p.numel() for m in modules for p in m.parameters())
    units = {"block": count(model.layers[0]), "embedding": count(model.tok_embeddings),
             "head": count(model.norm, model.output)}
    units["root"] = count(model) - units["embedding"] - len(model.layers) * units["block"] - units["head"]
    return units


def float8_layout(model: Transformer, recipe: str, compute: int, seq_len: int) -> dict:
    """What ``parallel.float8=<recipe>`` changes, from the meta model: the FP8 layers
    (``fms_dyt.float8.converts``: one block's, counted once per block), their parameters, the
    share of the training FLOPs that run as FP8 matrix multiplies (``rowwise_with_gw_hp``: two of
    each layer's three; attention's score FLOPs stay in the compute dtype), and each FSDP unit's all-gather bytes:
    with ``tensorwise`` FSDP2 gathers an FP8 layer's weight in FP8 (1 byte an element, its scale
    computed after the optimizer step), the other recipes gather the compute dtype and cast after."""
    from fms_dyt.float8 import converts

    block = model.layers[0]
    layers = [m for name, m in block.named_modules() if recipe != "off" and converts(m, f"layers.0.{name}")]
    fp8_params = sum(m.weight.numel() for m in layers)
    units = _unit_params(model)
    gathered = {unit: compute * n for unit, n in units.items()}
    if recipe == "tensorwise":
        gathered["block"] -= (compute - 1) * fp8_params
    n_layers = len(model.layers)
    fp8_flops = (4 if recipe == "rowwise_with_gw_hp" else 6) * n_layers * fp8_params
    return {"recipe": recipe, "fp8_layers": n_layers * len(layers), "fp8_params": n_layers * fp8_params,
            "fp8_flops_fraction": round(fp8_flops / flops_per_token(model.args, seq_len), 4), "gathered_bytes": gathered,
            "fp8_allgather": recipe == "tensorwise" and bool(layers)}


def memory_phases(n_params: int, units: dict[str, int], shard: int, compute: int, reduce: int,
                  accum: int, defer_grad_sync: bool, acts: dict[str, int],
                  gathered: dict[str, float] | None = None) -> dict[str, dict[str, float]]:
    """Bytes a rank holds, by category, at each moment of the step where it can peak.

    FSDP2 keeps fp32 shards of the parameters and AdamW's two moments for the whole step. With
    gradient accumulation, a later micro-batch also holds the gradients of the earlier ones: fp32
    shards, or (``defer_grad_sync``) fp32 unsharded gradients of the whole model. Then:
    ``loss_backward``: the head unit stays all-gathered from its forward (no reshard) while the
    loss's backward runs on every block's saved activations; ``block_backward``: a block is
    all-gathered and the next one's all-gather is in flight, the block's unsharded gradients are
    alive and so is the reduce-scatter input of the unit before it; ``embedding_backward``: all gradients are
    reduced but the embedding's, whose dense gradient and reduce-scatter input are alive;
    ``update``: clipping and AdamW over the shards. ``gathered``: bytes of each unit's all-gathered
    parameters (default: its parameters in the compute dtype; FP8 all-gathers make them smaller).
    """
    P, s, c, g = n_params, shard, compute, reduce
    gathered = gathered or {unit: c * n for unit, n in units.items()}
    block, head, emb = units["block"], units["head"], units["embedding"]
    shards = {"params": 4 * P / s, "optimizer": 8 * P / s}
    earlier = 0 if accum == 1 else (g * P if defer_grad_sync else 4 * P / s)
    reducing = accum == 1 or not defer_grad_sync  # the peak micro-batch reduce-scatters
    return {
        "loss_backward": {**shards, "params": shards["params"] + gathered["head"], "grads": earlier,
                          "activations": acts["loss_backward"], "comm": 0},
        "block_backward": {**shards, "params": shards["params"] + gathered["block"], "grads": earlier + c * block,
                           "activations": acts["block_backward"],
                           "comm": gathered["block"] + (g * max(block, head) if reducing else 0)},
        "embedding_backward": {**shards, "params": shards["params"] + gathered["embedding"],
                               "grads": max(earlier, 4 * P / s) + c * emb, "activations": 0,
                               "comm": g * emb if reducing else 0},
        "update": {**shards, "grads": 4 * P / s, "activations": 0, "comm": 0},
    }


# ---- communication ---------------------------------------------------------------------------------

# The bytes each rank sends (and receives) per byte of a collective's buffer S over n ranks, with
# NCCL's ring algorithms (the "bus bandwidth" factors of nccl-tests' doc/PERFORMANCE.md): an
# all-gather or reduce-scatter passes (n-1)/n·S through every rank's link, an all-reduce (a
# reduce-scatter, then an all-gather) 2(n-1)/n·S; NCCL's tree all-reduce has the same bandwidth
# term. S is the gathered size (all-gather), the input (reduce-scatter), the buffer (all-reduce).
LINK_BYTES = {
    "allgather": lambda n: (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "allreduce": lambda n: 2 * (n - 1) / n,
    "broadcast": lambda n: 1.0 if n > 1 else 0.0,
}


@dataclass(frozen=True)
class Network:
    """The bandwidths the planner assumes, bytes/s per GPU and direction: NVLink when a group's
    ranks share a node, the GPU's own InfiniBand port when they do not (NCCL gives each GPU's
    traffic to the port beside it, so a group across nodes runs at the port's speed).
    Bandwidth terms only: latency (microseconds a hop) and protocol overhead are left out, so the
    times are lower bounds, closest for the large all-gathers and reduce-scatters of FSDP."""

    intra_node: float
    inter_node: float

    @classmethod
    def of(cls, gpu: Gpu, nvlink_gb_s: float | None = None, network_gbit_s: float | None = None) -> "Network":
        return cls((nvlink_gb_s or gpu.nvlink_gb_s) * 1e9, (network_gbit_s or gpu.network_gbit_s) * 1e9 / 8)

    def seconds(self, kind: str, nbytes: float, ranks: int, nodes: int) -> float:
        """Link time of one collective of ``nbytes`` over ``ranks`` ranks spread over ``nodes`` nodes."""
        if ranks <= 1 or kind not in LINK_BYTES:
            return 0.0
        return LINK_BYTES[kind](ranks) * nbytes / (self.intra_node if nodes <= 1 else self.inter_node)

    def describe(self) -> dict:
        return {"intra_node_GB_s": self.intra_node / 1e9, "inter_node_Gbit_s": self.inter_node * 8 / 1e9,
                "algorithm": "ring: all-gather and reduce-scatter move (n-1)/n of the buffer through each "
                             "GPU's link, all-reduce 2(n-1)/n; bandwidth only, no latency"}


def group_nodes(ranks: list[int], gpus_per_node: int) -> int:
    return len({r // gpus_per_node for r in ranks})


def step_communication(units: dict[str, int], n_layers: int, replicas: int, shard: int, gpus_per_node: int,
                       compute: int, reduce: int, accum: int, defer_grad_sync: bool, network: Network,
                       unit_compute_s: dict[str, tuple[float, float]], gathered: dict[str, float] | None = None,
                       fp8_layers: int = 0) -> dict:
    """FSDP2's collectives in one step of one rank, their link time, and the part compute cannot hide.

    FSDP2 units as ``fms_dyt.parallel.apply_parallelism`` lays them out: the root (parameters of
    the model itself, the embedding scalar), the embedding, each block, the head (final norm and
    output, not resharded after forward). Per micro-batch: an all-gather of every unit in forward
    (compute dtype), again in backward for the blocks (the embedding's backward needs no weight:
    ``set_unshard_in_backward(False)``; the head stays gathered), and a
    reduce-scatter of every unit's gradients (reduce dtype) -- with ``defer_grad_sync`` on the
    last micro-batch only; with a replicate dimension (hybrid), an all-reduce of each reduced shard
    across the replicas on the last micro-batch. The gradient-norm reduction (a few bytes) is left out.

    Overlap: FSDP2 gathers the next unit while the current one computes, and reduces a unit's
    gradients while the one before it computes its backward. So in forward the first gathers
    (root, embedding) are exposed, and each next gather beyond the compute of the unit it hides
    behind; in backward likewise for the gather of the next unit plus the reduction of the last
    one, and the reductions of the embedding and root (nothing computes after them) are exposed.
    Collectives that overlap one unit's compute share its links: their times add.
    ``unit_compute_s``: unit -> (forward, backward) seconds of one micro-batch. ``gathered``: bytes
    of each unit's all-gather (default: its parameters in the compute dtype). ``fp8_layers``: layers
    whose weights are all-gathered in FP8 (tensorwise), whose scales one all-reduce of one fp32
    number each computes after the optimizer step.
    """
    gathered = gathered or {unit: compute * n for unit, n in units.items()}
    shard_nodes = group_nodes(list(range(shard)), gpus_per_node)
    replicate_nodes = group_nodes([r * shard for r in range(replicas)], gpus_per_node)
    root = units["root"]

    def gather(nbytes):
        return network.seconds("allgather", nbytes, shard, shard_nodes)

    def reduction(n, last):
        if defer_grad_sync and not last:
            return 0.0
        t = network.seconds("reduce_scatter", n * reduce, shard, shard_nodes)
        return t + (network.seconds("allreduce", n / shard * reduce, replicas, replicate_nodes) if last else 0.0)

    names = ["root", "embedding"] + ["block"] * n_layers + ["head"]
    names = [u for u in names if units[u] or u != "root"]
    per_micro_gather = names + [u for u in names if u == "block"]
    exposed = comm = 0.0
    counts = {"allgather": 0, "reduce_scatter": 0, "allreduce": 0}
    nbytes = dict.fromkeys(counts, 0)
    for micro in range(accum):
        last = micro == accum - 1
        counts["allgather"] += len(per_micro_gather)
        nbytes["allgather"] += sum(gathered[u] for u in per_micro_gather)
        if last or not defer_grad_sync:
            counts["reduce_scatter"] += len(names)
            nbytes["reduce_scatter"] += sum(units[u] for u in names) * reduce
        if last and replicas > 1:
            counts["allreduce"] += len(names)
            nbytes["allreduce"] += sum(units[u] for u in names) / shard * reduce
        # forward: gathers in order, each hidden behind the unit before it
        exposed += gather(gathered[names[0]])
        for prev, nxt in zip(names, names[1:]):
            exposed += max(0.0, gather(gathered[nxt]) - unit_compute_s[prev][0])
        # backward: head, blocks, embedding; the root's and embedding's gradients are reduced last
        order = [u for u in reversed(names) if u != "root"]
        for k, unit in enumerate(order):
            nxt = order[k + 1] if k + 1 < len(order) else None
            prefetch = gather(gathered[nxt]) if nxt == "block" else 0.0
            reducing = reduction(units[order[k - 1]], last) if k else 0.0
            exposed += max(0.0, prefetch + reducing - unit_compute_s[unit][1])
        exposed += reduction(units["embedding"], last) + (reduction(root, last) if root else 0.0)
        comm += gather(sum(gathered[u] for u in per_micro_gather)) + reduction(sum(units[u] for u in names), last)
    if fp8_layers and shard > 1:  # the FP8 weights' scales, after the optimizer step (exposed: nothing overlaps)
        counts["allreduce"] += 1
        nbytes["allreduce"] += 4 * fp8_layers
        scales = network.seconds("allreduce", 4 * fp8_layers, shard, shard_nodes)
        comm, exposed = comm + scales, exposed + scales
    if shard == 1:  # sharding=none: FSDP2 issues no all-gather or reduce-scatter (as --simulate counts)
        counts["allgather"] = counts["reduce_scatter"] = 0
        nbytes["allgather"] = nbytes["reduce_scatter"] = 0
    per_kind = {k: {"count": counts[k], "bytes": int(nbytes[k])} for k in counts if counts[k]}
    return {"comm_per_step": per_kind, "comm_s_per_step": comm, "exposed_comm_s_per_step": exposed}


def cluster_plan(cfg, model: Transformer, n_params: int, nodes: int, gpus_per_node: int, gpu: str,
                 mfu: float, overhead_gib: float, nvlink_gb_s: float | None = None,
                 network_gbit_s: float | None = None) -> dict:
    from fms_dyt.parallel import checkpointed_blocks, mesh_shape

    args, p_cfg, t = model.args, cfg.parallel, cfg.train
    if gpu not in GPUS:
        raise ConfigError(f"--gpu {gpu!r} is not one of {sorted(GPUS)}")
    if nodes < 1 or gpus_per_node < 1:
        raise ConfigError(f"--nodes {nodes} --gpus-per-node {gpus_per_node}: both must be >= 1")
    world = nodes * gpus_per_node
    replicas, shard = mesh_shape(p_cfg.sharding, world, gpus_per_node, p_cfg.replicas)
    probe = cfg.copy()
    if probe.train.max_steps is None and probe.train.tokens is None:
        probe.train.max_steps = 1  # only the accumulation count is wanted here
    steps, accum = schedule(probe, world)

    compute = _dtype_bytes("parallel.param_dtype", p_cfg.param_dtype)
    reduce = _dtype_bytes("parallel.reduce_dtype", p_cfg.reduce_dtype)
    ckpt = checkpointed_blocks(args.n_layers, p_cfg.activation_checkpointing, p_cfg.ac_fraction)
    norm = norm_args(cfg)
    fp8 = float8_layout(model, p_cfg.float8, compute, t.seq_len)
    static_scale = (p_cfg.float8_dyt_static_scale and norm_class(norm.kind).bounded_by_gamma
                    and fp8["fp8_layers"] > 0)
    acts = activation_bytes(args, norm, t.micro_batch_size, t.seq_len, compute, ckpt, fp8_normed_inputs=static_scale)
    phases = memory_phases(n_params, _unit_params(model), shard, compute, reduce, accum,
                           p_cfg.defer_grad_sync, acts, fp8["gathered_bytes"])
    peak_phase = max(phases, key=lambda k: sum(phases[k].values()))
    memory = {**phases[peak_phase], "overhead": overhead_gib * GIB}
    memory_gib = {k: round(v / GIB, 3) for k, v in memory.items()}
    total_gib = round(sum(memory.values()) / GIB, 3)

    fpt = flops_per_token(args, t.seq_len)
    spec = GPUS[gpu]
    network = Network.of(spec, nvlink_gb_s, network_gbit_s)
    # Compute: every unit's FLOPs at the assumed MFU; a checkpointed block's backward runs its
    # forward again (selective checkpointing: the fraction of blocks that do).
    speed = mfu * spec.peak_flops
    tokens = t.micro_batch_size * t.seq_len
    block_fwd = tokens * (2 * (matmul_params(args) - args.dim * args.vocab_size) / args.n_layers
                          + 4 * args.dim * t.seq_len) / speed
    head_fwd = tokens * 2 * args.dim * args.vocab_size / speed
    recompute = sum(ckpt) / args.n_layers
    unit_s = {"root": (0.0, 0.0), "embedding": (0.0, 0.0), "block": (block_fwd, (2 + recompute) * block_fwd),
              "head": (head_fwd, 2 * head_fwd)}
    compute_s = accum * (args.n_layers * sum(unit_s["block"]) + sum(unit_s["head"]))
    comm = step_communication(_unit_params(model), args.n_layers, replicas, shard, gpus_per_node, compute, reduce,
                              accum, p_cfg.defer_grad_sync, network, unit_s, fp8["gathered_bytes"],
                              fp8["fp8_layers"] if fp8["fp8_allgather"] else 0)
    step_s = compute_s + comm["exposed_comm_s_per_step"]
    tps_gpu = tokens * accum / step_s
    train_tokens = t.tokens if t.tokens is not None else (t.max_steps * t.global_batch_tokens if t.max_steps else None)
    # The planner times every matrix multiply at the assumed MFU of the compute dtype. A bound on
    # what FP8 can give: its FLOPs at twice the peak (H100/H200 dense FP8 vs bf16, NVIDIA's
    # datasheets; A100 has no FP8: none) at the same MFU, casts and scales free.
    fp8_share = fp8["fp8_flops_fraction"] if gpu != "a100" else 0.0
    fp8_bound_s = compute_s * (1 - fp8_share / 2) + comm["exposed_comm_s_per_step"]
    float8 = {k: v for k, v in fp8.items() if k != "gathered_bytes"}
    float8.update(dyt_static_scale=static_scale, tokens_per_s_per_gpu_bound=round(tokens * accum / fp8_bound_s, 1))
    return {
        "layout": {
            "nodes": nodes, "gpus_per_node": gpus_per_node, "gpu": gpu, "world_size": world,
            "sharding": p_cfg.sharding, "replicas": replicas, "shard_size": shard,
            "micro_batch_size": t.micro_batch_size, "seq_len": t.seq_len, "grad_accum_steps": accum,
            "activation_checkpointing": p_cfg.activation_checkpointing,
            "checkpointed_blocks": sum(ckpt), "param_dtype": p_cfg.param_dtype, "reduce_dtype": p_cfg.reduce_dtype,
            "defer_grad_sync": p_cfg.defer_grad_sync,
        },
        "memory_per_gpu_gib": total_gib,
        "memory_gib": memory_gib,
        "memory_peak_at": peak_phase,
        "gpu_memory_gib": round(spec.memory_gib, 1),
        "fits": total_gib <= spec.memory_gib,
        "flops_per_token": fpt,
        "mfu": mfu,
        "network": network.describe(),
        "comm_per_step": comm["comm_per_step"],
        "compute_s_per_step": round(compute_s, 6),
        "comm_s_per_step": round(comm["comm_s_per_step"], 6),
        "exposed_comm_s_per_step": round(comm["exposed_comm_s_per_step"], 6),
        "step_s": round(step_s, 6),
        "compute_tokens_per_s_per_gpu": round(tokens * accum / compute_s, 1),
        "tokens_per_s_per_gpu": round(tps_gpu, 1),
        "mfu_effective": round(tps_gpu * fpt / spec.peak_flops, 4),
        "tokens_per_s": round(tps_gpu * world, 1),
        "train_tokens": train_tokens,
        "steps": steps if (t.tokens is not None or t.max_steps is not None) else None,
        "days": round(train_tokens / (tps_gpu * world) / 86400, 3) if train_tokens else None,
        "float8": float8,
    }


def plan(cfg, nodes: int | None = None, gpus_per_node: int | None = None, gpu: str = "h100",
         mfu: float = DEFAULT_MFU, overhead_gib: float = DEFAULT_OVERHEAD_GIB, nvlink_gb_s: float | None = None,
         network_gbit_s: float | None = None) -> dict:
    args, norm = model_args(cfg), norm_args(cfg)
    with torch.device("meta"):
        model = Transformer(args, norm)
    parts = count_parameters(model)
    default_nodes, default_gpus = default_layout(cfg)
    if gpus_per_node is None:
        gpus_per_node = default_gpus if nodes is None else GPUS_PER_NODE
    nodes = default_nodes if nodes is None else nodes
    return {
        "model": cfg.model.name,
        "norm": norm.description(),
        "n_params": parts["total"],
        "params_by_part": {k: v for k, v in parts.items() if k != "total"},
        "alpha": norm.alpha0() or None,
        "embedding_scale": model.embedding_scale is not None,
        **cluster_plan(cfg, model, parts["total"], nodes, gpus_per_node, gpu, mfu, overhead_gib, nvlink_gb_s,
                       network_gbit_s),
    }


SITE_NAMES = {"attn": "attention", "ffn": "ffn", "final": "final"}


def format_plan(p: dict) -> str:
    lines = [f"model {p['model']}, norm {p['norm']}: {p['n_params']:,} parameters"]
    for part, n in p["params_by_part"].items():
        lines.append(f"  {part:<10} {n:>16,}")
    if p["alpha"]:
        lines.append("alpha0: " + ", ".join(f"{SITE_NAMES[site]} {a:.4g}" for site, a in p["alpha"].items()))
    lines.append(f"embedding scalar (init sqrt(dim)): {'on' if p['embedding_scale'] else 'off'}")
    lo = p["layout"]
    lines.append(
        f"cluster: {lo['nodes']} node(s) x {lo['gpus_per_node']} {lo['gpu'].upper()} = {lo['world_size']} GPUs, "
        f"{lo['sharding']} sharding (shard size {lo['shard_size']}, {lo['replicas']} replicas), "
        f"micro-batch {lo['micro_batch_size']} x {lo['seq_len']}, {lo['grad_accum_steps']} accumulation step(s), "
        f"activation checkpointing {lo['activation_checkpointing']} ({lo['checkpointed_blocks']} blocks)"
    )
    m = p["memory_gib"]
    lines.append(
        f"memory per GPU: {p['memory_per_gpu_gib']:.1f} GiB of {p['gpu_memory_gib']:.0f} "
        f"({'fits' if p['fits'] else 'DOES NOT FIT'}): params {m['params']:.1f}, grads {m['grads']:.1f}, "
        f"optimizer {m['optimizer']:.1f}, activations {m['activations']:.1f}, comm {m['comm']:.1f}, "
        f"overhead {m['overhead']:.1f} (peak at {p['memory_peak_at'].replace('_', ' ')})"
    )
    if "simulated_peak_gib" in p:
        sim = p["simulated_gib"]
        lines.append(
            f"simulated peak of rank 0 ({p['simulated_steps']} steps on fake tensors, {p['simulated_wall_s']:.0f} s): "
            f"{p['simulated_peak_gib']:.1f} GiB: params {sim['params']:.1f}, grads {sim['grads']:.1f}, "
            f"optimizer {sim['optimizer']:.1f}, activations {sim['activations']:.1f}, comm {sim['comm']:.1f}, "
            f"overhead {sim['overhead']:.1f} (assumed, as planned)"
        )
    net = p["network"]
    comm = ", ".join(f"{kind} {c['count']} x, {c['bytes'] / 1e9:.2f} GB" for kind, c in p["comm_per_step"].items())
    lines.append(
        f"communication per step and GPU (FSDP2, planned): {comm or 'none'}; "
        f"{p['comm_s_per_step']:.3g} s on the links (NVLink {net['intra_node_GB_s']:.0f} GB/s, "
        f"InfiniBand {net['inter_node_Gbit_s']:.0f} Gb/s per GPU), {p['exposed_comm_s_per_step']:.3g} s not hidden "
        f"behind {p['compute_s_per_step']:.3g} s of compute"
    )
    if "collectives_per_step" in p:
        sim = ", ".join(f"{kind} {c['count']} x, {c['bytes'] / 1e9:.2f} GB"
                        for kind, c in p["collectives_per_step"].items())
        lines.append(f"simulated step of rank 0: collectives {sim or 'none'} ({p['simulated_comm_s_per_step']:.3g} s "
                     f"on the links); {p['host_syncs_per_step']} device-to-host read(s)")
    lines.append(
        f"{p['flops_per_token']:.3g} FLOP per token; at MFU {p['mfu']:.2f} while computing, with the exposed "
        f"communication: {p['tokens_per_s_per_gpu']:,.0f} tokens/s per GPU (MFU {p['mfu_effective']:.2f}), "
        f"{p['tokens_per_s']:,.0f} tokens/s in all"
    )
    if p["days"] is not None:
        lines.append(f"{p['train_tokens']:,.0f} tokens ({p['steps']:,} steps): {p['days']:.3g} days")
    return "\n".join(lines)


def format_measurement(estimate: dict, measured: dict) -> str:
    rows = [f"{'':<10} {'plan MiB':>10} {'measured MiB':>13} {'plan/measured':>14}"]
    for key in ("saved", "peak"):
        rows.append(f"{key:<10} {estimate[key] / 2**20:>10.1f} {measured[key] / 2**20:>13.1f} "
                    f"{estimate[key] / measured[key]:>14.3f}")
    return "activations of one micro-batch on this CPU:\n" + "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fms_dyt.plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=llama7b_dyt")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--nodes", type=int, help="nodes (default: the config's own layout, see above)")
    parser.add_argument("--gpus-per-node", type=int, help=f"GPUs per node (default {GPUS_PER_NODE})")
    parser.add_argument("--gpu", choices=sorted(GPUS), default="h100", help="GPU model (default h100)")
    parser.add_argument("--mfu", type=float, default=DEFAULT_MFU,
                        help=f"assumed MFU while computing, communication aside (default {DEFAULT_MFU})")
    parser.add_argument("--nvlink-gbs", type=float,
                        help="GB/s per GPU and direction within a node (default: the GPU's NVLink, e.g. h100 450)")
    parser.add_argument("--network-gbits", type=float,
                        help="Gb/s per GPU across nodes (default: one InfiniBand port per GPU, h100 400, a100 200)")
    parser.add_argument("--overhead-gib", type=float, default=DEFAULT_OVERHEAD_GIB,
                        help=f"per-GPU memory outside the model (default {DEFAULT_OVERHEAD_GIB})")
    parser.add_argument("--measure", action="store_true",
                        help="also run one micro-batch on the CPU and compare its activation memory with the plan")
    parser.add_argument("--simulate", action="store_true",
                        help="also run two training steps of rank 0 on fake tensors at the full world size "
                             "and report its peak memory, and the collectives (count, bytes, link time) and "
                             "device-to-host reads of its last step (fms_dyt.simulate)")
    ns = parser.parse_intermixed_args(argv)
    if not 0 < ns.mfu <= 1:
        return refuse("fms_dyt.plan", f"--mfu {ns.mfu} must be within (0, 1]")
    try:
        cfg = load_config(ns.overrides)
        p = plan(cfg, ns.nodes, ns.gpus_per_node, ns.gpu, ns.mfu, ns.overhead_gib, ns.nvlink_gbs, ns.network_gbits)
    except ConfigError as e:
        return refuse("fms_dyt.plan", e)
    if ns.measure:
        from fms_dyt.parallel import checkpointed_blocks

        args, norm, t, par = model_args(cfg), norm_args(cfg), cfg.train, cfg.parallel
        dtype = config_dtype("parallel.param_dtype", par.param_dtype)
        ckpt = checkpointed_blocks(args.n_layers, par.activation_checkpointing, par.ac_fraction)
        estimate = activation_bytes(args, norm, t.micro_batch_size, t.seq_len,
                                    _dtype_bytes("parallel.param_dtype", par.param_dtype), ckpt, cpu=True)
        measured = measure_activation_bytes(args, norm, t.micro_batch_size, t.seq_len, dtype, ckpt)
        p["activations_measured_cpu"] = {"plan_bytes": estimate["peak"], "measured_bytes": measured["peak"]}
        if not ns.json:
            print(format_measurement(estimate, measured), file=sys.stderr)
    if ns.simulate:
        from fms_dyt.simulate import simulate

        lo, overhead = p["layout"], p["memory_gib"]["overhead"]
        sim = simulate(cfg, lo["nodes"], lo["gpus_per_node"])
        # Fake tensors hold no CUDA context or NCCL buffers: the GPU's figure adds the planner's
        # assumption for them, so both figures count the same things.
        p.update(sim, simulated_tensor_peak_gib=sim["simulated_peak_gib"],
                 simulated_peak_gib=round(sim["simulated_peak_gib"] + overhead, 3),
                 simulated_gib={**sim["simulated_gib"], "overhead": overhead})
        p["plan_over_simulated"] = round(p["memory_per_gpu_gib"] / p["simulated_peak_gib"], 3)
        network = Network.of(GPUS[ns.gpu], ns.nvlink_gbs, ns.network_gbits)
        for entry in p["collectives_per_step_by_group"]:
            entry["seconds"] = round(network.seconds(entry["kind"], entry["bytes"], entry["ranks"], entry["nodes"]), 6)
        p["simulated_comm_s_per_step"] = round(sum(e["seconds"] for e in p["collectives_per_step_by_group"]), 6)
    print(json.dumps(p) if ns.json else format_plan(p))
    if ns.simulate:
        needed = p["simulated_peak_gib"]
        if needed > p["gpu_memory_gib"]:
            print(f"fms_dyt.plan: does not fit: rank 0's simulated peak is {p['simulated_tensor_peak_gib']:.1f} GiB "
                  f"(+ {p['memory_gib']['overhead']:.1f} GiB overhead = {needed:.1f} GiB), more than the "
                  f"{p['gpu_memory_gib']:.0f} GiB of one {p['layout']['gpu'].upper()}; use more GPUs, activation "
                  "checkpointing (parallel.activation_checkpointing) or a smaller train.micro_batch_size",
                  file=sys.stderr)
            return EXIT_CONFIG
    return 0


if __name__ == "__main__":
    sys.exit(main())
