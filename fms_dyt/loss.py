"""The trainer's loss: mean cross-entropy in fp32 that keeps one log-sum-exp per token.

``F.cross_entropy(logits.float(), targets)`` writes an fp32 copy of the logits and their
log-softmax ([tokens, vocab] each) and keeps the log-softmax for backward. This autograd function
keeps only the logits (the caller holds them anyway) and one fp32 log-sum-exp per row, and works
through the rows in chunks, so the fp32 transients are bounded by the chunk, not by the batch.
Plain PyTorch, the same on every device.
"""

from __future__ import annotations

import torch

# fp32 elements of the transient per chunk: cache-sized on CPU, a few hundred MiB elsewhere.
_CHUNK_ELEMENTS = {"cpu": 1 << 18}
_DEFAULT_CHUNK_ELEMENTS = 1 << 26


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 logits, fp64 for fp64."""
    return torch.promote_types(x.dtype, torch.float32)


def _chunk_rows(logits: torch.Tensor) -> int:
    if torch.compiler.is_compiling():
        return max(logits.shape[0], 1)
    elements = _CHUNK_ELEMENTS.get(logits.device.type, _DEFAULT_CHUNK_ELEMENTS)
    return max(1, elements // max(logits.shape[1], 1))


class _CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index: int):
        ct = _compute_dtype(logits)
        rows = _chunk_rows(logits)
        lse = torch.cat([torch.logsumexp(chunk.to(ct), dim=1) for chunk in logits.split(rows)])
        valid = targets != ignore_index
        picked = logits.gather(1, torch.where(valid, targets, 0).unsqueeze(1)).squeeze(1).to(ct)
        n_valid = valid.sum()
        ctx.save_for_backward(logits, targets, lse, n_valid)
        ctx.ignore_index = ignore_index
        return torch.where(valid, lse - picked, 0).sum() / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        logits, targets, lse, n_valid = ctx.saved_tensors
        ct = lse.dtype
        rows = _chunk_rows(logits)
        grad = torch.empty_like(logits)
        scale = grad_loss.to(ct) / n_valid
        for x, t, l, g in zip(logits.split(rows), targets.split(rows), lse.split(rows), grad.split(rows)):
            valid = t != ctx.ignore_index
            p = torch.sub(x, l.unsqueeze(1)).exp_()  # softmax, in the compute dtype (l's)
            p.scatter_add_(1, torch.where(valid, t, 0).unsqueeze(1), -valid.to(ct).unsqueeze(1))
            g.copy_(p.mul_(torch.where(valid, scale, 0).unsqueeze(1)))
        return grad, None, None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` [rows, vocab] against ``targets`` [rows], computed in fp32
    (fp64 stays fp64) whatever the logits' dtype: ``F.cross_entropy(logits.float(), targets)``,
    rows whose target is ``ignore_index`` left out of the mean."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy wants logits [rows, vocab] and targets [rows]; got "
                         f"{tuple(logits.shape)} and {tuple(targets.shape)}")
    if type(logits) is torch.Tensor and logits.device.type != "meta" and not torch.compiler.is_compiling():
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= logits.shape[1]))
        if bad.any():
            raise IndexError(f"cross_entropy: target {int(targets[bad][0])} is outside the vocabulary "
                             f"[0, {logits.shape[1]})")
    return _CrossEntropyFunction.apply(logits, targets, ignore_index)
