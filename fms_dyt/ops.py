"""DyT: y = weight · tanh(α·x) (+ bias) over the last dimension, as one autograd function in plain
PyTorch.

The arithmetic is autograd's on the plain formula (the paper's implementation), op by op in the
dtype PyTorch's type promotion gives, but autograd keeps tanh(α·x) alive for backward beside x,
where this keeps only x: tanh is recomputed, which is cheaper than storing it. The output takes
x's dtype and each gradient its parameter's dtype, so FSDP2 mixed precision (x bf16, α and
weight bf16 or fp32) works unchanged; with fp32 parameters the arithmetic is fp32.

The function reads no values on the host, so it runs unchanged on the meta device, on fake
tensors, on DTensors and under ``torch.compile`` (dynamo traces it without a graph break and
inductor fuses each direction into one kernel, keeping the intermediates in fp32). Nothing here
compiles or loads native code: ``fms_dyt.export`` copies this file into exported model directories.
"""

from __future__ import annotations

from typing import Optional

import torch


def dyt_reference(x, alpha, weight, bias=None):
    """The plain formula, in x's dtype op by op (what autograd would differentiate)."""
    y = weight * torch.tanh(alpha * x)
    return y if bias is None else y + bias


def _one_dim(alpha: torch.Tensor) -> torch.Tensor:
    # One dimension, not zero: a 0-dim fp32 α would not promote a bf16 x, as a parameter must.
    return alpha.reshape(1)


class _DyTFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, alpha, weight, bias):
        ctx.save_for_backward(x, alpha, weight)
        ctx.has_bias = bias is not None
        y = weight * torch.tanh(_one_dim(alpha) * x)
        return (y if bias is None else y + bias).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        x, alpha, weight = ctx.saved_tensors
        need_x, need_alpha, need_weight, need_bias = ctx.needs_input_grad
        a = _one_dim(alpha)
        lead = tuple(range(x.dim() - 1))
        t = torch.tanh(a * x)  # recomputed: cheaper than keeping it from the forward
        grad_weight = (grad_y * t).sum(lead).to(weight.dtype) if need_weight else None
        if ctx.has_bias and need_bias:  # summed in the bias's dtype when wider, as autograd would
            grad_bias = grad_y.sum(lead, dtype=torch.promote_types(grad_y.dtype, weight.dtype)).to(weight.dtype)
        else:
            grad_bias = None
        h = torch.ops.aten.tanh_backward(grad_y * weight, t)  # dy · w · (1 − tanh²)
        grad_alpha = (h * x).sum().reshape(alpha.shape).to(alpha.dtype) if need_alpha else None
        grad_x = (h * a).to(x.dtype) if need_x else None
        return grad_x, grad_alpha, grad_weight, grad_bias


def dyt(
    x: torch.Tensor, alpha: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """DyT over the last dimension of ``x``; ``alpha`` has one element. Output in x's dtype."""
    return _DyTFunction.apply(x, alpha, weight, bias)
