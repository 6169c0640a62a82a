"""The fused DyT op and cross-entropy: exact against the plain formulas, in every dtype mix FSDP2 produces."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from fms_dyt import ops
from fms_dyt.ops import _DyTFunction, dyt, dyt_reference


def pytorch_formulation(x, alpha, weight, bias=None):
    """What GPUs (and CPUs without a compiler) run."""
    return _DyTFunction.apply(x, alpha, weight, bias, False)


def custom_op(x, alpha, weight, bias=None):
    """What torch.compile sees on CPU."""
    return torch.ops.fms_dyt.dyt(x, alpha, weight, bias)


IMPLEMENTATIONS = pytest.mark.parametrize(
    "fn", [dyt, custom_op, pytorch_formulation], ids=["cpu_kernel", "custom_op", "pytorch"]
)

needs_cc = pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None, reason="no C compiler")


def _inputs(shape, dtype, bias, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    alpha = torch.tensor([0.7], dtype=torch.float64).to(dtype)
    weight = torch.randn(shape[-1], generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(shape[-1], generator=g, dtype=torch.float64).to(dtype) if bias else None
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return x, alpha, weight, b, dy


def _grads(fn, x, alpha, weight, bias, dy):
    leaves = [t.detach().clone().requires_grad_() for t in (x, alpha, weight)]
    b = None if bias is None else bias.detach().clone().requires_grad_()
    y = fn(*leaves, b)
    y.backward(dy.to(y.dtype))
    return y.detach(), [t.grad for t in leaves] + ([] if b is None else [b.grad])


def _reference(x, alpha, weight, bias, dy):
    to64 = lambda t: None if t is None else t.double()  # noqa: E731
    return _grads(dyt_reference, to64(x), to64(alpha), to64(weight), to64(bias), dy.double())


def _rel_err(a, b):
    return ((a.double() - b).abs().max() / b.abs().max()).item()


@needs_cc
def test_cpu_kernel_builds():
    assert ops.cpu_kernel() is not None


@IMPLEMENTATIONS
@pytest.mark.parametrize("bias", [False, True])
def test_gradcheck_fp64(fn, bias):
    x, alpha, weight, b, _ = _inputs((2, 3, 5), torch.float64, bias)
    args = [t.requires_grad_() for t in (x, alpha, weight)] + [None if b is None else b.requires_grad_()]
    assert torch.autograd.gradcheck(fn, tuple(args))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 5e-6), (torch.bfloat16, 1.6e-2)])
@pytest.mark.parametrize("bias", [False, True])
@IMPLEMENTATIONS
def test_matches_fp64_formula(dtype, tol, bias, fn):
    # 300 rows: more than one fp32 accumulation block of the kernel, split across threads.
    inputs = _inputs((300, 2, 67), dtype, bias)
    y, grads = _grads(fn, *inputs)
    y_ref, grads_ref = _reference(*inputs)
    assert y.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert _rel_err(y, y_ref) < tol
    for g, g_ref in zip(grads, grads_ref):
        assert _rel_err(g, g_ref) < tol


@IMPLEMENTATIONS
def test_mixed_precision_params_fp32_input_bf16(fn):
    # FSDP2 with param_dtype=bf16 keeps fp32 norm params when they are wrapped apart: x bf16, params fp32.
    x, alpha, weight, b, dy = _inputs((64, 48), torch.bfloat16, True)
    y, (gx, ga, gw, gb) = _grads(fn, x, alpha.float(), weight.float(), b.float(), dy)
    assert y.dtype == gx.dtype == torch.bfloat16
    assert ga.dtype == gw.dtype == gb.dtype == torch.float32
    y_ref, (gx_ref, ga_ref, gw_ref, gb_ref) = _reference(x, alpha.float(), weight.float(), b.float(), dy)
    assert _rel_err(y, y_ref) < 1e-2 and _rel_err(gx, gx_ref) < 1e-2
    # Parameter gradients are fp32 sums of exact bf16 products: far better than bf16.
    for g, g_ref in ((ga, ga_ref), (gw, gw_ref), (gb, gb_ref)):
        assert _rel_err(g, g_ref) < 1e-5


def test_fp32_tanh_within_a_few_ulp_everywhere():
    z = torch.cat([torch.linspace(-12, 12, 200_001), torch.logspace(-30, 1, 20_001), -torch.logspace(-30, 1, 20_001)])
    one = torch.ones(1)
    y = dyt(z.reshape(-1, 1), one, one)
    ref = torch.tanh(z.double())
    ulp = torch.nextafter(ref.float().abs(), torch.tensor(float("inf"))).double() - ref.float().abs().double()
    assert ((y.reshape(-1).double() - ref).abs() / ulp).max() <= 8


def test_fp32_gradient_accurate_where_tanh_saturates():
    # 1 - tanh² underflows to rounding noise when computed from tanh in fp32; the kernel keeps it.
    z = torch.linspace(4, 20, 1001).reshape(-1, 1)
    one = torch.ones(1)
    _, (gx, *_rest) = _grads(dyt, z, one, one, None, torch.ones_like(z))
    exact = 1 / torch.cosh(z.double()) ** 2
    assert ((gx.double() - exact).abs() / exact).max() < 1e-5


def test_nan_and_inf_propagate():
    x = torch.tensor([[float("nan"), float("inf"), -float("inf"), 0.0]], dtype=torch.bfloat16)
    weight = torch.tensor([1.0, 2.0, 3.0, 4.0])
    y = dyt(x, torch.ones(1), weight)
    assert torch.isnan(y[0, 0])
    assert y[0, 1:].tolist() == [2.0, -3.0, 0.0]


def test_shapes_strides_and_empty():
    x, alpha, weight, b, _ = _inputs((6, 8, 10), torch.float32, True)
    transposed = x.transpose(0, 1)  # not contiguous
    assert torch.allclose(dyt(transposed, alpha, weight, b), dyt(transposed.contiguous(), alpha, weight, b))
    assert dyt(x[0, 0], alpha, weight, b).shape == (10,)
    empty = torch.empty(0, 10, requires_grad=True)
    out = dyt(empty, alpha, weight, b)
    out.sum().backward()
    assert out.shape == (0, 10) and empty.grad.shape == (0, 10)


def test_thread_count_does_not_change_results_beyond_rounding():
    inputs = _inputs((257, 33), torch.float32, True)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _grads(dyt, *inputs)
        torch.set_num_threads(2)
        two = _grads(dyt, *inputs)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1][0], two[1][0])  # elementwise: identical
    for a, b in zip(one[1][1:], two[1][1:]):  # reductions: summation order differs
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)


def test_fallback_without_compiler(monkeypatch, tmp_path):
    monkeypatch.setattr(ops, "_kernel_state", {})
    monkeypatch.setenv("FMS_DYT_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    inputs = _inputs((40, 12), torch.float32, True)
    with pytest.warns(UserWarning, match="compiling the DyT CPU kernel with false failed"):
        y, grads = _grads(dyt, *inputs)
    assert ops.cpu_kernel() is None
    y_ref, grads_ref = _reference(*inputs)
    assert _rel_err(y, y_ref) < 1e-6
    for g, g_ref in zip(grads, grads_ref):
        assert _rel_err(g, g_ref) < 1e-5


def test_traced_by_torch_compile_without_graph_breaks():
    # aot_eager: dynamo + AOT autograd see the op through its fake implementation, as inductor would,
    # without the C++ build of inductor kernels (slow on CI machines).
    x, alpha, weight, _, dy = _inputs((16, 24), torch.float32, False)

    def block(x, alpha, weight):
        return torch.nn.functional.silu(dyt(x, alpha, weight) * 2)

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    y_eager, g_eager = _grads(lambda x, a, w, b: block(x, a, w), x, alpha, weight, None, dy)
    y_comp, g_comp = _grads(lambda x, a, w, b: compiled(x, a, w), x, alpha, weight, None, dy)
    assert torch.allclose(y_eager, y_comp)
    for a, b in zip(g_eager, g_comp):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)


def _fsdp_worker(rank, world, port, x, out_path):
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = _fsdp_model()
        mesh = init_device_mesh("cpu", (world,))
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in model:
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        y = model(x.chunk(world)[rank])
        y.float().pow(2).mean().backward()
        grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
        if rank == 0:
            torch.save({"y_dtype": y.dtype, "grads": grads}, out_path)
    finally:
        dist.destroy_process_group()


def _fsdp_model():
    from fms_dyt.norms import DyT

    torch.manual_seed(0)
    model = torch.nn.Sequential(DyT(16, 0.5, beta=True), torch.nn.Linear(16, 16), DyT(16, 0.3))
    with torch.no_grad():  # away from the initial constants, so every gradient is informative
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def test_fsdp2_bf16_mixed_precision_two_ranks(tmp_path):
    import socket

    import torch.multiprocessing as mp
    from torch.func import functional_call

    x = torch.randn(8, 5, 16) * 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_fsdp_worker, args=(2, port, x, str(tmp_path / "out.pt")), nprocs=2, join=True)
    got = torch.load(tmp_path / "out.pt")
    assert got["y_dtype"] == torch.bfloat16
    # Reference: fp32 parameters cast to bf16 for compute, each rank's loss averaged, as FSDP2 does.
    model = _fsdp_model()
    params = dict(model.named_parameters())
    loss = sum(
        functional_call(model, {n: p.to(torch.bfloat16) for n, p in params.items()}, (part.to(torch.bfloat16),))
        .float().pow(2).mean()
        for part in x.chunk(2)
    ) / 2
    loss.backward()
    for name, p in params.items():
        g = got["grads"][name]
        assert g.dtype == torch.float32
        assert _rel_err(g, p.grad.double()) < 1e-5, name


# ---- cross-entropy ----------------------------------------------------------------------------

from fms_dyt.ops import cross_entropy  # noqa: E402


def _ce_inputs(dtype, rows=300, vocab=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 4).to(dtype)
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[::7] = -100  # ignored rows, as Hugging Face pads
    return logits, targets


@needs_cc
def test_cross_entropy_gradcheck_fp64():
    logits, targets = _ce_inputs(torch.float64, rows=6, vocab=9)
    assert torch.autograd.gradcheck(lambda x: cross_entropy(x, targets), (logits.requires_grad_(),))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 8e-3)])
def test_cross_entropy_matches_torch(dtype, tol):
    logits, targets = _ce_inputs(dtype)
    x = logits.clone().requires_grad_()
    loss = cross_entropy(x, targets)
    loss.backward()
    x_ref = logits.double().requires_grad_()
    ref = F.cross_entropy(x_ref, targets)
    ref.backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == dtype
    assert abs(loss.item() - ref.item()) / ref.item() < 1e-6
    assert _rel_err(x.grad, x_ref.grad) < tol
    assert not x.grad[::7].any()  # ignored rows get no gradient


def test_cross_entropy_kernel_and_fallback_agree(monkeypatch):
    logits, targets = _ce_inputs(torch.float32, rows=40, vocab=50)
    kernel_loss = cross_entropy(logits, targets)
    monkeypatch.setattr(ops, "_kernel_state", {"lib": None})
    assert torch.allclose(cross_entropy(logits, targets), kernel_loss, rtol=1e-6)


def test_cross_entropy_rejects_bad_targets_and_shapes():
    logits, targets = _ce_inputs(torch.float32, rows=4, vocab=5)
    targets[1] = 5
    with pytest.raises(IndexError, match="target 5 is outside the vocabulary"):
        cross_entropy(logits, targets)
    with pytest.raises(ValueError, match="logits \\[rows, vocab\\]"):
        cross_entropy(logits.reshape(2, 2, 5), targets)
