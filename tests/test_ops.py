"""The DyT op: exact against the plain formula in every dtype mix FSDP2 produces, and plain PyTorch
wherever a tensor can be (meta, fake, compiled, DTensor)."""

from __future__ import annotations

import ast
import math
import re
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fms_dyt.export import _MODEL_CODE
from fms_dyt.ops import dyt, dyt_reference


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


@pytest.mark.parametrize("bias", [False, True])
def test_gradcheck_fp64(bias):
    x, alpha, weight, b, _ = _inputs((2, 3, 5), torch.float64, bias)
    args = [t.requires_grad_() for t in (x, alpha, weight)] + [None if b is None else b.requires_grad_()]
    assert torch.autograd.gradcheck(dyt, tuple(args))


@pytest.mark.parametrize("bias", [False, True])
def test_fp32_matches_fp64_formula(bias):
    inputs = _inputs((300, 2, 67), torch.float32, bias)
    y, grads = _grads(dyt, *inputs)
    y_ref, grads_ref = _reference(*inputs)
    assert y.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    assert _rel_err(y, y_ref) < 5e-6
    for g, g_ref in zip(grads, grads_ref):
        assert _rel_err(g, g_ref) < 5e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bias", [False, True])
def test_same_bits_as_autograd_on_the_plain_formula(dtype, bias):
    # The op changes what is kept for backward, not the arithmetic of the paper's formula.
    inputs = _inputs((300, 2, 67), dtype, bias)
    y, grads = _grads(dyt, *inputs)
    y_ref, grads_ref = _grads(dyt_reference, *inputs)
    assert torch.equal(y, y_ref)
    for g, g_ref in zip(grads, grads_ref):
        assert torch.equal(g, g_ref)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_keeps_tanh_eager_on_a_cpu_and_only_its_input_elsewhere(device):
    # Eager on a CPU, ATen's tanh costs more than storing it, so the op keeps it as autograd does;
    # elsewhere (GPUs; meta stands in for them here) only x, and backward recomputes tanh.
    x, alpha, weight, bias, _ = _inputs((64, 32), torch.bfloat16, True)
    leaves = [t.to(device).requires_grad_() for t in (x, alpha, weight, bias)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        dyt(*leaves)
    kept = [t for t in saved if t.shape == x.shape]
    if device == "meta":
        assert len(kept) == 1
    else:
        assert len(kept) == 2 and kept[0].data_ptr() == leaves[0].data_ptr()
        assert torch.equal(kept[1], torch.tanh(alpha * x))


def test_backward_twice_with_the_graph_retained():
    # The kept tanh is read, never overwritten, by backward: a second backward gives the same grads.
    x, alpha, weight, bias, dy = _inputs((32, 16), torch.float32, True)
    leaves = [t.requires_grad_() for t in (x, alpha, weight, bias)]
    y = dyt(*leaves)
    first = torch.autograd.grad(y, leaves, dy, retain_graph=True)
    second = torch.autograd.grad(y, leaves, dy)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_mixed_precision_params_fp32_input_bf16():
    # FSDP2 with param_dtype=bf16 keeps fp32 norm params when they are wrapped apart: x bf16, params fp32.
    x, alpha, weight, b, dy = _inputs((64, 48), torch.bfloat16, True)
    y, (gx, ga, gw, gb) = _grads(dyt, x, alpha.float(), weight.float(), b.float(), dy)
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


@pytest.mark.parametrize("where", ["meta", "fake"])
def test_forward_and_backward_without_data(where):
    # Meta-device init and FakeTensorMode tracing (torch.compile, memory planning) see shapes only.
    with FakeTensorMode() if where == "fake" else torch.device("meta"):
        x = torch.randn(4, 3, 8, dtype=torch.bfloat16, requires_grad=True)
        alpha, weight, bias = (torch.full((1,), 0.5), torch.ones(8), torch.zeros(8))
        leaves = [t.requires_grad_() for t in (alpha, weight, bias)]
        y = dyt(x, *leaves)
        y.float().sum().backward()
    assert y.shape == x.shape and y.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
    assert [t.grad.shape for t in leaves] == [(1,), (8,), (8,)]
    assert all(t.grad.dtype == torch.float32 for t in leaves)


def test_model_code_is_plain_pytorch():
    # `fms_dyt.export` copies these files next to the weights; loading them with
    # trust_remote_code=True must not build or load native code.
    forbidden_modules = {"ctypes", "cffi", "subprocess", "torch.utils.cpp_extension", "distutils", "setuptools"}
    forbidden_names = {"load_inline", "cpp_extension", "CDLL", "custom_op", "torch.library"}
    package = Path(dyt.__code__.co_filename).parent
    for name in _MODEL_CODE:
        tree = ast.parse((package / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                modules = {node.module or ""}
            else:
                modules = set()
            assert not modules & forbidden_modules, (name, modules)
            if isinstance(node, ast.Attribute):
                assert node.attr not in forbidden_names, (name, node.attr)
            if isinstance(node, ast.Name):
                assert node.id not in forbidden_names, (name, node.id)


def test_traced_by_torch_compile_without_graph_breaks():
    # aot_eager: dynamo + AOT autograd trace the autograd function on fake tensors, as inductor
    # would, without the C++ build of inductor kernels (slow on CI machines).
    x, alpha, weight, _, dy = _inputs((16, 24), torch.float32, False)

    def block(x, alpha, weight):
        return torch.nn.functional.silu(dyt(x, alpha, weight) * 2)

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    y_eager, g_eager = _grads(lambda x, a, w, b: block(x, a, w), x, alpha, weight, None, dy)
    y_comp, g_comp = _grads(lambda x, a, w, b: compiled(x, a, w), x, alpha, weight, None, dy)
    # Compiled for a CPU, tanh is the op's rational function (within 8 ulp of ATen's tanh, see
    # test_compiled_tanh_on_a_cpu_within_8_ulp): dα sums its error over every element.
    assert torch.allclose(y_eager, y_comp, rtol=1e-6, atol=1e-6)
    for a, b in zip(g_eager, g_comp):
        assert _rel_err(b, a.double()) < 2e-5


def test_compiled_tanh_on_a_cpu_within_8_ulp():
    # Compiled for a CPU the op evaluates tanh as a rational function (fms_dyt.ops._tanh); it must
    # stay within a few ulp of tanh everywhere, saturate to exactly ±1, and keep NaN.
    z = torch.cat([torch.linspace(-12, 12, 200_001), torch.logspace(-30, 1.2, 20_001), -torch.logspace(-30, 1.2, 20_001)])
    special = torch.tensor([float("inf"), -float("inf"), float("nan"), 1e30, -1e30, 9.02, -9.5, 0.0])
    one = torch.ones(1)
    y = torch.compile(lambda z: dyt(z.reshape(-1, 1), one, one).reshape(-1), fullgraph=True)(torch.cat([z, special]))
    y, y_special = y[: len(z)], y[len(z):]
    ref = torch.tanh(z.double())
    ulp = torch.nextafter(ref.float().abs(), torch.tensor(float("inf"))).double() - ref.float().abs().double()
    assert ((y.double() - ref).abs() / ulp).max() <= 8
    assert y_special[:2].tolist() == [1.0, -1.0] and torch.isnan(y_special[2])
    assert y_special[3:].tolist() == [1.0, -1.0, 1.0, -1.0, 0.0]
    assert (y[z.abs() >= 9.02].abs() == 1).all()


@pytest.mark.parametrize("dtype,bias,tol", [(torch.float32, True, 2e-5), (torch.bfloat16, False, 1e-2)])
def test_inductor_matches_the_fp64_formula(dtype, bias, tol):
    # What parallel.compile=true runs on a CPU (the rational tanh, the fused backward), against
    # the formula in fp64. fp32: dα, a sum over every element, carries the rational's few ulp.
    inputs = _inputs((96, 80), dtype, bias)
    y, grads = _grads(torch.compile(dyt, fullgraph=True), *inputs)
    y_ref, grads_ref = _reference(*inputs)
    assert y.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert _rel_err(y, y_ref) < (1e-6 if dtype == torch.float32 else tol)
    for g, g_ref in zip(grads, grads_ref):
        assert _rel_err(g, g_ref) < tol


def _inductor_code(fn, *inputs):
    """The Python wrappers inductor writes for ``fn``'s forward and backward (CPU), generated
    without compiling or running any kernel."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    from torch._inductor.utils import get_code

    # Generated afresh: a graph cached by an earlier compilation would be loaded, not generated.
    with functorch_config.patch(force_non_lazy_backward_lowering=True, enable_autograd_cache=False), \
            inductor_config.patch(fx_graph_cache=False):
        return [c for c in get_code(torch.compile(fn, fullgraph=True), *inputs) if "def call" in c]


@pytest.mark.parametrize("dtype,beta,shape", [(torch.bfloat16, False, (48, 64)), (torch.float32, True, (3, 16, 64))])
def test_inductor_backward_keeps_no_intermediate(dtype, beta, shape):
    # Compiled (parallel.compile=true), the backward is one C++ kernel of two loop nests that read
    # x and dy and write dx and the parameter gradients: no buffer of x's size besides dx (storing
    # tanh(α·x) for the second loop costs a write and a read of that size; it did until 2026-12).
    from fms_dyt.norms import DyT

    layer = DyT(shape[-1], alpha0=0.5, beta=beta).to(dtype)
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    forward, backward = _inductor_code(layer, x)
    assert "tangents_1" in backward and "tangents_1" not in forward
    rows = math.prod(shape[:-1])
    sizes = re.findall(r"empty_strided_cpu\(\(([\d, ]+)\)", backward)
    big = [s for s in sizes if math.prod(int(n) for n in s.split(",") if n.strip()) == rows * shape[-1]]
    assert len(big) == 1, sizes  # dx only
    assert backward.count("async_compile.cpp_pybinding") == 1  # one kernel
    assert backward.count("#pragma omp for") == 2, backward  # a row loop (dx, dα) and a column loop (dγ, dβ)


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
        dtensor = _dtensor_dyt(mesh, x)
        if rank == 0:
            torch.save({"y_dtype": y.dtype, "grads": grads, "dtensor": dtensor}, out_path)
    finally:
        dist.destroy_process_group()


def _dtensor_inputs(x):
    return x, torch.tensor([0.7]), torch.linspace(0.5, 1.5, x.shape[-1])


def _dtensor_dyt(mesh, x):
    """DyT on DTensors (x sharded over rows, parameters replicated, as tensor parallelism has them):
    output and gradients, gathered."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    x, alpha, weight = _dtensor_inputs(x)
    leaves = [
        distribute_tensor(t, mesh, [placement]).requires_grad_()
        for t, placement in ((x, Shard(0)), (alpha, Replicate()), (weight, Replicate()))
    ]
    y = dyt(*leaves)
    y.pow(2).sum().backward()
    return [y.full_tensor()] + [t.grad.full_tensor() for t in leaves]


def _fsdp_model():
    from fms_dyt.norms import DyT

    torch.manual_seed(0)
    model = torch.nn.Sequential(DyT(16, 0.5, beta=True), torch.nn.Linear(16, 16), DyT(16, 0.3))
    with torch.no_grad():  # away from the initial constants, so every gradient is informative
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def test_fsdp2_bf16_mixed_precision_two_ranks(tmp_path):
    import torch.multiprocessing as mp
    from torch.func import functional_call

    x = torch.randn(8, 5, 16) * 2
    from fms_dyt.parallel import free_port

    mp.spawn(_fsdp_worker, args=(2, free_port(), x, str(tmp_path / "out.pt")), nprocs=2, join=True)
    got = torch.load(tmp_path / "out.pt")
    leaves = [t.clone().requires_grad_() for t in _dtensor_inputs(x)]
    y = dyt(*leaves)
    y.pow(2).sum().backward()
    for got_t, want in zip(got["dtensor"], [y] + [t.grad for t in leaves]):
        assert torch.allclose(got_t, want, rtol=1e-5, atol=1e-6)
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
