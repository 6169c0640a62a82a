"""apply_parallelism on one gloo process: activation checkpointing really recomputes."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from fms_dyt.config import ParallelConfig
from fms_dyt.model import ModelArgs, Transformer
from fms_dyt.norms import NormArgs
from fms_dyt.parallel import apply_parallelism

ARGS = ModelArgs(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=192, vocab_size=300, max_seq_len=64)


@pytest.fixture(scope="module")
def mesh():
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def _saved_bytes_and_grads(mesh, mode: str):
    """Bytes autograd keeps from the forward for backward, and the gradients of one step."""
    torch.manual_seed(0)
    model = Transformer(ARGS, NormArgs(kind="dyt", alpha_attn=0.8, alpha_ffn=0.2, alpha_final=0.2))
    # the schema's defaults for every other key (float8 off), so a new parallel key needs no edit here
    parallel = ParallelConfig(param_dtype="float32", reduce_dtype="float32", activation_checkpointing=mode,
                              ac_fraction=0.5, compile=False)
    apply_parallelism(model, parallel, mesh)
    tokens = torch.randint(0, ARGS.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))
    kept = {}

    def pack(t):
        kept.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(tokens[:, :-1])
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    return sum(kept.values()), {n: p.grad.full_tensor().clone() for n, p in model.named_parameters()}


def test_activation_checkpointing_recomputes_instead_of_keeping(mesh):
    off, grads_off = _saved_bytes_and_grads(mesh, "off")
    selective, grads_selective = _saved_bytes_and_grads(mesh, "selective")
    full, grads_full = _saved_bytes_and_grads(mesh, "full")
    # Checkpointed blocks keep only their inputs; the others keep every activation.
    assert full < selective < off
    assert full < 0.5 * off
    for name, g in grads_off.items():  # and the recomputed backward is the same backward
        assert torch.allclose(grads_full[name], g, rtol=1e-5, atol=1e-7), name
        assert torch.allclose(grads_selective[name], g, rtol=1e-5, atol=1e-7), name
