"""``python -m fms_dyt.plan [hydra overrides] [--json] [--nodes N --gpus-per-node G --gpu a100|h100|h200]``

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
``torch.compile``d blocks keep less (inductor recomputes pointwise results), so for compiled runs
the plan is an upper bound.
"""

from __future__ import annotations

import argparse
import json
import sys
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from fms_dyt.config import ConfigError, load_config, model_args, norm_args, schedule
from fms_dyt.errors import config_dtype
from fms_dyt.metrics import PEAK_FLOPS, flops_per_token
from fms_dyt.model import ModelArgs, Transformer, count_parameters
from fms_dyt.loss import cross_entropy

GIB = 2**30


@dataclass(frozen=True)
class Gpu:
    peak_flops: float  # dense bf16, FLOP/s
    memory_gib: float


GPUS = {
    "a100": Gpu(PEAK_FLOPS["A100"], 80.0),  # A100 80GB SXM
    "h100": Gpu(PEAK_FLOPS["H100"], 80.0),  # H100 SXM
    "h200": Gpu(PEAK_FLOPS["H200"], 141e9 / GIB),  # 141 GB HBM3e
}
GPUS_PER_NODE = 8
DEFAULT_MFU = 0.40  # fms-fsdp reports 0.38-0.68 for LLaMA 7B-70B on A100/H100 (compiled)
DEFAULT_OVERHEAD_GIB = 2.0  # CUDA context, NCCL buffers, allocator fragmentation: an assumption


def _dtype_bytes(key: str, name: str) -> int:
    return torch.empty((), dtype=config_dtype(key, name)).element_size()


# ---- activations ---------------------------------------------------------------------------------


def _norm_saved_bytes(kind: str, dim: int, compute_bytes: int) -> int:
    """Bytes per token one norm layer keeps for backward."""
    if kind == "dyt":
        return compute_bytes * dim  # the fused op keeps its input only
    # RMSNorm: the fp32 copy of x (x itself in fp32), the normalised x before the weight, 1/rms.
    return 4 * dim + compute_bytes * dim + 4


def activation_bytes(args: ModelArgs, norm_kind: str, micro_batch: int, seq_len: int,
                     compute_bytes: int, checkpointed: list[bool]) -> dict[str, int]:
    """Activation memory of one micro-batch: what forward keeps for backward, and the peak.

    Per token and block (eager, flash-style attention): both norms' inputs (see above), the
    normed input of the attention and FFN projections, q, k, v after RoPE, the attention output
    and its log-sum-exp (fp32, one per head), and SwiGLU's four [ffn_dim] tensors. A
    checkpointed block keeps its input only and is recomputed during backward. Around the blocks:
    the embedding output (kept for the embedding scalar's gradient), the final norm, its output,
    the logits and one fp32 log-sum-exp per token (``fms_dyt.loss.cross_entropy``, the trainer's loss).
    """
    p, d, f, L = compute_bytes, args.dim, args.ffn_dim, args.n_layers
    kv_width = args.kv_heads * args.head_dim
    norm = _norm_saved_bytes(norm_kind, d, p)
    full_block = 2 * norm + p * (4 * d + 2 * kv_width + 4 * f) + 4 * args.n_heads
    block_input = p * d
    tokens = micro_batch * seq_len
    n_ckpt = sum(checkpointed)
    saved = ((L - n_ckpt) * full_block + n_ckpt * block_input) * tokens
    # RoPE tables cast to the compute dtype, 4 per kept block, shared by the micro-batch.
    if p != 4:
        saved += (L - n_ckpt) * 4 * seq_len * args.head_dim * p
    embedding_kept = p * d if norm_kind == "dyt" else 0
    head = embedding_kept + norm + p * d + p * args.vocab_size + 4
    saved += head * tokens
    # Transients on top: the logits' gradient, or a block's backward (two [ffn_dim] gradients
    # alive at SwiGLU's backward), plus the recomputed block when activations are checkpointed.
    loss_grad = p * args.vocab_size
    block_backward = 2 * p * f + (full_block - block_input if n_ckpt else 0)
    transient = max(loss_grad, block_backward) * tokens
    return {"saved": saved, "peak": saved + transient}


class _LiveTensorBytes(TorchDispatchMode):
    """Bytes held by tensors created under this mode, by storage, after every operation.

    Parameter gradients are not activations: when autograd accumulates one, its bytes are taken
    out of every point of the timeline since the operation that created it, so the peak is that
    of activations and backward temporaries alone.
    """

    def __init__(self, existing: list[torch.Tensor]):
        super().__init__()
        self.existing = {t.untyped_storage().data_ptr() for t in existing}
        self.live: dict[int, tuple[int, int]] = {}  # storage -> (bytes, timeline index at creation)
        self.grads: set[int] = set()
        self.timeline: list[int] = []
        self.total = 0  # activation bytes alive now

    @property
    def peak(self) -> int:
        return max(self.timeline, default=0)

    def _free(self, key: int) -> None:
        nbytes, _ = self.live.pop(key)
        if key in self.grads:
            self.grads.discard(key)
        else:
            self.total -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key in self.existing or key in self.live or storage.nbytes() == 0:
                    continue
                self.live[key] = (storage.nbytes(), len(self.timeline))
                self.total += storage.nbytes()
                weakref.finalize(storage, self._free, key)
        self.timeline.append(self.total)
        return out

    def grad_accumulated(self, param: torch.Tensor) -> None:
        key = param.grad.untyped_storage().data_ptr()
        if key in self.live and key not in self.grads:
            nbytes, created = self.live[key]
            self.grads.add(key)
            self.total -= nbytes
            for i in range(created, len(self.timeline)):
                self.timeline[i] -= nbytes


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
    counter = _LiveTensorBytes([*model.parameters(), *model.buffers(), tokens])
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(counter.grad_accumulated)
    with counter:
        logits = model(inputs)  # kept, as the trainer keeps it, until backward is done
        loss = cross_entropy(logits.flatten(0, 1), targets.flatten())
        saved = counter.total
        loss.backward()
    return {"saved": saved, "peak": counter.peak}


# ---- the cluster plan ------------------------------------------------------------------------------


def default_layout(cfg) -> tuple[int, int]:
    """(nodes, GPUs per node) at which one micro-batch per GPU makes the global batch."""
    t = cfg.train
    world = max(1, t.global_batch_tokens // (t.micro_batch_size * t.seq_len))
    if world % GPUS_PER_NODE == 0:
        return world // GPUS_PER_NODE, GPUS_PER_NODE
    return 1, world


def _block_params(model: Transformer) -> tuple[int, int]:
    """(parameters of one block, parameters outside the blocks: FSDP2's root group)."""
    block = sum(p.numel() for p in model.layers[0].parameters())
    root = sum(p.numel() for p in model.parameters()) - block * len(model.layers)
    return block, root


def cluster_plan(cfg, model: Transformer, n_params: int, nodes: int, gpus_per_node: int, gpu: str,
                 mfu: float, overhead_gib: float) -> dict:
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
    block, root = _block_params(model)
    ckpt = checkpointed_blocks(args.n_layers, p_cfg.activation_checkpointing, p_cfg.ac_fraction)
    acts = activation_bytes(args, norm_args(cfg).kind, t.micro_batch_size, t.seq_len, compute, ckpt)
    # FSDP2 keeps fp32 shards of parameters, gradients and AdamW's two moments; it all-gathers
    # the root group (embedding, head, final norm) for the whole step and up to two blocks at a
    # time (the running one and the prefetched next) in the compute dtype; backward holds the
    # root's unsharded gradients until the end, and one block's in the compute and reduce dtypes.
    memory = {
        "params": 4 * n_params / shard + (root + 2 * block) * compute,
        "grads": 4 * n_params / shard + (root + block) * (compute + reduce),
        "optimizer": 8 * n_params / shard,
        "activations": acts["peak"],
        "overhead": overhead_gib * GIB,
    }
    memory_gib = {k: round(v / GIB, 3) for k, v in memory.items()}
    total_gib = round(sum(memory.values()) / GIB, 3)

    fpt = flops_per_token(args, t.seq_len)
    spec = GPUS[gpu]
    tps_gpu = mfu * spec.peak_flops / fpt
    train_tokens = t.tokens if t.tokens is not None else (t.max_steps * t.global_batch_tokens if t.max_steps else None)
    return {
        "layout": {
            "nodes": nodes, "gpus_per_node": gpus_per_node, "gpu": gpu, "world_size": world,
            "sharding": p_cfg.sharding, "replicas": replicas, "shard_size": shard,
            "micro_batch_size": t.micro_batch_size, "seq_len": t.seq_len, "grad_accum_steps": accum,
            "activation_checkpointing": p_cfg.activation_checkpointing,
            "checkpointed_blocks": sum(ckpt), "param_dtype": p_cfg.param_dtype, "reduce_dtype": p_cfg.reduce_dtype,
        },
        "memory_per_gpu_gib": total_gib,
        "memory_gib": memory_gib,
        "gpu_memory_gib": round(spec.memory_gib, 1),
        "fits": total_gib <= spec.memory_gib,
        "flops_per_token": fpt,
        "mfu": mfu,
        "tokens_per_s_per_gpu": round(tps_gpu, 1),
        "tokens_per_s": round(tps_gpu * world, 1),
        "train_tokens": train_tokens,
        "steps": steps if (t.tokens is not None or t.max_steps is not None) else None,
        "days": round(train_tokens / (tps_gpu * world) / 86400, 3) if train_tokens else None,
    }


def plan(cfg, nodes: int | None = None, gpus_per_node: int | None = None, gpu: str = "h100",
         mfu: float = DEFAULT_MFU, overhead_gib: float = DEFAULT_OVERHEAD_GIB) -> dict:
    args, norm = model_args(cfg), norm_args(cfg)
    with torch.device("meta"):
        model = Transformer(args, norm)
    parts = count_parameters(model)
    alpha = None
    if norm.kind == "dyt":
        alpha = {"attn": norm.alpha_attn, "ffn": norm.alpha_ffn, "final": norm.alpha_final}
    default_nodes, default_gpus = default_layout(cfg)
    if gpus_per_node is None:
        gpus_per_node = default_gpus if nodes is None else GPUS_PER_NODE
    nodes = default_nodes if nodes is None else nodes
    return {
        "model": cfg.model.name,
        "norm": norm.kind,
        "n_params": parts["total"],
        "params_by_part": {k: v for k, v in parts.items() if k != "total"},
        "alpha": alpha,
        "embedding_scale": model.embedding_scale is not None,
        **cluster_plan(cfg, model, parts["total"], nodes, gpus_per_node, gpu, mfu, overhead_gib),
    }


def format_plan(p: dict) -> str:
    lines = [f"model {p['model']}, norm {p['norm']}: {p['n_params']:,} parameters"]
    for part, n in p["params_by_part"].items():
        lines.append(f"  {part:<10} {n:>16,}")
    if p["alpha"]:
        a = p["alpha"]
        lines.append(f"alpha0: attention {a['attn']:.4g}, ffn {a['ffn']:.4g}, final {a['final']:.4g}")
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
        f"optimizer {m['optimizer']:.1f}, activations {m['activations']:.1f}, overhead {m['overhead']:.1f}"
    )
    lines.append(
        f"{p['flops_per_token']:.3g} FLOP per token; at MFU {p['mfu']:.2f}: "
        f"{p['tokens_per_s_per_gpu']:,.0f} tokens/s per GPU, {p['tokens_per_s']:,.0f} tokens/s in all"
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
    parser.add_argument("--mfu", type=float, default=DEFAULT_MFU, help=f"assumed MFU (default {DEFAULT_MFU})")
    parser.add_argument("--overhead-gib", type=float, default=DEFAULT_OVERHEAD_GIB,
                        help=f"per-GPU memory outside the model (default {DEFAULT_OVERHEAD_GIB})")
    parser.add_argument("--measure", action="store_true",
                        help="also run one micro-batch on the CPU and compare its activation memory with the plan")
    ns = parser.parse_intermixed_args(argv)
    if not 0 < ns.mfu <= 1:
        print(f"fms_dyt.plan: --mfu {ns.mfu} must be within (0, 1]", file=sys.stderr)
        return 2
    try:
        cfg = load_config(ns.overrides)
        p = plan(cfg, ns.nodes, ns.gpus_per_node, ns.gpu, ns.mfu, ns.overhead_gib)
    except ConfigError as e:
        print(f"fms_dyt.plan: configuration error: {e}", file=sys.stderr)
        return 2
    if ns.measure:
        from fms_dyt.parallel import checkpointed_blocks

        args, norm, t, par = model_args(cfg), norm_args(cfg), cfg.train, cfg.parallel
        dtype = config_dtype("parallel.param_dtype", par.param_dtype)
        ckpt = checkpointed_blocks(args.n_layers, par.activation_checkpointing, par.ac_fraction)
        estimate = activation_bytes(args, norm.kind, t.micro_batch_size, t.seq_len, _dtype_bytes("parallel.param_dtype", par.param_dtype), ckpt)
        measured = measure_activation_bytes(args, norm, t.micro_batch_size, t.seq_len, dtype, ckpt)
        p["activations_measured_cpu"] = {"plan_bytes": estimate["peak"], "measured_bytes": measured["peak"]}
        if not ns.json:
            print(format_measurement(estimate, measured), file=sys.stderr)
    print(json.dumps(p) if ns.json else format_plan(p))
    return 0


if __name__ == "__main__":
    sys.exit(main())
