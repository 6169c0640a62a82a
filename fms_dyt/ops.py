"""Fused DyT: y = weight · tanh(α·x) (+ bias) with a hand-written backward.

Autograd on the plain formula keeps three intermediates alive and reduces dα, dweight and dbias
in separate passes; this function saves only x and yields dx, dα, dweight and dbias from one
recomputation of tanh.
"""

from __future__ import annotations

from typing import Optional

import torch


class _DyTFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, alpha, weight, bias):
        ctx.save_for_backward(x, alpha, weight)
        ctx.has_bias = bias is not None
        y = weight * torch.tanh(alpha.to(x.dtype) * x)
        return y if bias is None else y + bias

    @staticmethod
    def backward(ctx, grad_y):
        x, alpha, weight = ctx.saved_tensors
        t = torch.tanh(alpha.to(x.dtype) * x)
        lead = tuple(range(grad_y.dim() - 1))
        grad_weight = (grad_y * t).sum(lead, dtype=torch.float32).to(weight.dtype)
        grad_pre = grad_y * weight * (1 - t * t)
        grad_x = grad_pre * alpha.to(x.dtype)
        grad_alpha = (grad_pre * x).sum(dtype=torch.float32).reshape(1).to(alpha.dtype)
        grad_bias = grad_y.sum(lead, dtype=torch.float32).to(weight.dtype) if ctx.has_bias else None
        return grad_x, grad_alpha, grad_weight, grad_bias


def dyt(
    x: torch.Tensor, alpha: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """DyT over the last dimension of ``x``; ``alpha`` has one element."""
    return _DyTFunction.apply(x, alpha, weight, bias)
