"""DyT: y = weight · tanh(α·x) (+ bias) over the last dimension, as one autograd function in plain
PyTorch.

Eager, the arithmetic is autograd's on the plain formula (the paper's implementation), op by op
in the dtype PyTorch's type promotion gives, bit for bit. What is kept for backward depends on
where it runs: on a GPU (and compiled anywhere) only x, and tanh is recomputed in backward, which
is cheaper than storing it there and keeps DyT's activations at one tensor of x's size; eager on
a CPU tanh(α·x) as well, as autograd keeps it, since there ATen's tanh costs more than the
memory traffic of storing it (see ``_keeps_tanh``). On plain tensors the ops write into the
op's own temporaries: at most two buffers of x's size in forward and two in backward, where the
plain formula allocates three and seven. The output takes x's dtype and each gradient its
parameter's dtype, so FSDP2 mixed precision (x bf16, α and weight bf16 or fp32) works unchanged;
with fp32 parameters the arithmetic is fp32.

The function reads no values on the host, so it runs unchanged on the meta device, on fake
tensors, on DTensors and under ``torch.compile`` (dynamo traces it without a graph break; under
compilation the backward is written so that inductor keeps no intermediate of x's size, see
``_backward_compiled``; inductor computes in fp32, and on a CPU evaluates tanh as a rational
function within a few ulp, see ``_tanh``). Nothing here compiles or loads native code:
``fms_dyt.export`` copies this file into exported model directories.
"""

from __future__ import annotations

from typing import Optional

import torch


# tanh(z) ≈ z·P(z²)/Q(z²) for |z| ≤ 9.02, beyond which tanh(z) rounds to ±1 in fp32: P and Q of
# degree 4 with the least largest relative error on that interval (2·10⁻⁸; fitted for fms-dyt by
# iteratively reweighted least squares, see docs/performance.md), rounded to fp32. Evaluated in
# fp32 it is within 7 ulp of tanh (ATen's tanh: 1 ulp).
_TANH_P = (1.0, 0.13379722833633423, 0.0034940396435558796, 2.0583562218234874e-05, 1.331917598434984e-08)
_TANH_Q = (1.0, 0.4671303629875183, 0.025871092453598976, 0.0003283100959379226, 7.762063773952832e-07)
_TANH_LIMIT = 9.02


def _tanh(z: torch.Tensor) -> torch.Tensor:
    """tanh(z) as the op computes it. Compiled for a CPU, a rational function in plain ops, which
    inductor fuses into the loop that needs it at ten multiplies or multiply-adds and one division
    a value: ATen's vectorised tanh costs several times that, and DyT on a CPU is bound by it.
    Elsewhere (eager, GPUs) ``torch.tanh``."""
    if not (torch.compiler.is_compiling() and z.device.type == "cpu" and torch.finfo(z.dtype).bits <= 32):
        return torch.tanh(z)
    w = z.float().clamp(-_TANH_LIMIT, _TANH_LIMIT)
    u = w * w
    t = w * _polynomial(_TANH_P, u) / _polynomial(_TANH_Q, u)
    # Rounding can take the quotient up to 3 ulp past ±1 near saturation: fp32 clamps it, so that
    # tanh saturates at exactly ±1; narrower dtypes round it to ±1 by themselves (and the clamp
    # would take the fused backward loop past inductor's size for one loop, 50 ops, on a CPU).
    return (t.clamp(-1.0, 1.0) if z.dtype == torch.float32 else t).to(z.dtype)


def _polynomial(coefficients, u):
    """c₀ + c₁·u + c₂·u² + ..., by Horner's rule."""
    value = coefficients[-1]
    for c in reversed(coefficients[:-1]):
        value = value * u + c
    return value


def _keeps_tanh(x: torch.Tensor) -> bool:
    """Whether the forward keeps tanh(α·x) for backward beside x: eager on a CPU, where ATen's
    tanh costs more than storing its result (a DyT layer then keeps two tensors of x's size, as
    autograd on the plain formula does). Compiled, or on a GPU, only x."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


def dyt_reference(x, alpha, weight, bias=None):
    """The plain formula, in x's dtype op by op (what autograd would differentiate)."""
    y = weight * torch.tanh(alpha * x)
    return y if bias is None else y + bias


def _one_dim(alpha: torch.Tensor) -> torch.Tensor:
    # One dimension, not zero: a 0-dim fp32 α would not promote a bf16 x, as a parameter must.
    return alpha.reshape(1)


def _reuse_buffers(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether the op may write into its own temporaries: plain tensors, outside ``torch.compile``."""
    return not torch.compiler.is_compiling() and all(t is None or type(t) is torch.Tensor for t in tensors)


def _fits(buffer: Optional[torch.Tensor], shape, dtype) -> bool:
    return buffer is not None and buffer.shape == shape and buffer.dtype == dtype


class _DyTFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, alpha, weight, bias):
        ctx.has_bias = bias is not None
        a = _one_dim(alpha)
        reuse = _reuse_buffers(x, alpha, weight, bias)
        t = torch.mul(a, x).tanh_() if reuse else _tanh(a * x)
        keep = _keeps_tanh(x)
        ctx.save_for_backward(x, alpha, weight, *((t,) if keep else ()))
        # The plain formula's ops, written into one buffer where tanh is not kept (each fresh
        # buffer of x's size costs page faults on a CPU): the same values as the out-of-place ops.
        shape = torch.broadcast_shapes(t.shape, weight.shape)
        y = t.mul_(weight) if reuse and not keep and _fits(t, shape, torch.result_type(t, weight)) else weight * t
        if bias is not None:  # y is the op's own buffer either way
            fits = reuse and _fits(y, torch.broadcast_shapes(y.shape, bias.shape), torch.result_type(y, bias))
            y = y.add_(bias) if fits else y + bias
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        x, alpha, weight, *kept = ctx.saved_tensors
        need = ctx.needs_input_grad
        if torch.compiler.is_compiling():
            grads = _backward_compiled(x, alpha, weight, grad_y, ctx.has_bias, need)
        else:
            grads = _backward_eager(x, alpha, weight, grad_y, ctx.has_bias, need, *kept)
        return tuple(g if n else None for g, n in zip(grads, need))


def _backward_eager(x, alpha, weight, grad_y, has_bias, need, t=None):
    """Autograd's arithmetic on the plain formula, op by op (the same values, bit for bit); on plain
    tensors in two buffers of x's size instead of seven. ``t`` is tanh(α·x) where the forward kept
    it (see ``_keeps_tanh``), else it is recomputed here."""
    reuse = _reuse_buffers(x, alpha, weight, grad_y)
    a = _one_dim(alpha)
    rows = tuple(range(x.dim() - 1))
    ours = t is None  # a kept tanh stays intact: backward may run again (retain_graph)
    if ours:
        t = torch.mul(a, x)
        t = t.tanh_() if reuse else torch.tanh(t)
    grad_x = grad_alpha = grad_weight = grad_bias = spare = None
    if need[2]:
        spare = grad_y * t
        grad_weight = spare.sum(rows).to(weight.dtype)
    if has_bias and need[3]:
        grad_bias = _grad_bias(grad_y, weight, rows)
    if not (need[0] or need[1]):
        return grad_x, grad_alpha, grad_weight, grad_bias
    shape = torch.broadcast_shapes(grad_y.shape, weight.shape)
    if reuse and _fits(spare, shape, torch.result_type(grad_y, weight)):
        h = torch.mul(grad_y, weight, out=spare)
    else:
        h = grad_y * weight
    if reuse and _fits(h, torch.broadcast_shapes(h.shape, t.shape), torch.result_type(h, t)):
        h = torch.ops.aten.tanh_backward.grad_input(h, t, grad_input=h)  # dy · γ · (1 − t²)
    else:
        h = torch.ops.aten.tanh_backward(h, t)
    if need[1]:
        if reuse and ours and _fits(t, torch.broadcast_shapes(h.shape, x.shape), torch.result_type(h, x)):
            hx = torch.mul(h, x, out=t)
        else:
            hx = h * x
        grad_alpha = hx.sum().reshape(alpha.shape).to(alpha.dtype)
    if need[0]:
        if reuse and _fits(h, h.shape, torch.result_type(h, a)):
            grad_x = h.mul_(a).to(x.dtype)
        else:
            grad_x = (h * a).to(x.dtype)
    return grad_x, grad_alpha, grad_weight, grad_bias


def _backward_compiled(x, alpha, weight, grad_y, has_bias, need):
    """The backward as inductor fuses it best: no intermediate of x's size, x and dy read twice.

    Inductor's CPU code generator fuses an elementwise loop over [rows, width] with a reduction
    over the width or over everything, never with a sum over the rows (a loop nest of another
    order), and it stores a costly elementwise value that two results use (tanh, or ``_tanh``'s
    thirty ops). So dx = dy·γ·α·(1 − t²) and dα = Σ dy·γ·(1 − t²)·x are one row-parallel loop,
    dγ = Σ_rows dy·t a column-parallel loop, and each result computes t = tanh(α·x) itself (three
    spellings of the same value, which common-subexpression elimination does not merge): two reads
    of x and dy and one write of dx, like compiled RMSNorm's backward, where storing t costs a
    write and a read of x's size.
    """
    a = _one_dim(alpha)
    rows = tuple(range(x.dim() - 1))
    grad_x = (torch.ops.aten.tanh_backward(grad_y * weight, _tanh(a * x)) * a).to(x.dtype)
    h = torch.ops.aten.tanh_backward(weight * grad_y, _tanh(x * a))
    grad_alpha = (h * x).sum().reshape(alpha.shape).to(alpha.dtype)
    t = -_tanh(x * -a)  # tanh is odd: the same value
    grad_weight = (grad_y * t).sum(rows).to(weight.dtype)
    grad_bias = _grad_bias(grad_y, weight, rows) if has_bias and need[3] else None
    return grad_x, grad_alpha, grad_weight, grad_bias


def _grad_bias(grad_y, weight, rows):
    # Summed in the bias's dtype when wider, as autograd would.
    return grad_y.sum(rows, dtype=torch.promote_types(grad_y.dtype, weight.dtype)).to(weight.dtype)


def dyt(
    x: torch.Tensor, alpha: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """DyT over the last dimension of ``x``; ``alpha`` has one element. Output in x's dtype."""
    return _DyTFunction.apply(x, alpha, weight, bias)
