"""The trainer's loss: mean cross-entropy in fp32 that keeps nothing of its own for backward.

``F.cross_entropy(logits.float(), targets)`` writes an fp32 copy of the logits and their
log-softmax ([tokens, vocab] each) and keeps the log-softmax for backward. This autograd function
keeps only the logits (the caller holds them anyway) and the targets. The forward works through
the rows in chunks, so its fp32 transients are a sixteenth of the logits at most; the backward
writes the softmax (computed in fp32) straight into the gradient. Plain PyTorch, every device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The forward's chunks: a sixteenth of the logits, at least this many elements (4 MiB of fp32),
# so a chunk's transient is small beside the logits and there are never more than 16 calls.
_CHUNK_ELEMENTS = 1 << 20
_MAX_CHUNKS = 16


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 logits, fp64 for fp64."""
    return torch.promote_types(x.dtype, torch.float32)


def _chunk_rows(logits: torch.Tensor) -> int:
    rows, vocab = logits.shape
    if torch.compiler.is_compiling():
        return max(rows, 1)
    return max(1, _CHUNK_ELEMENTS // max(vocab, 1), -(-rows // _MAX_CHUNKS))


class _CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index: int):
        ct = _compute_dtype(logits)
        rows = _chunk_rows(logits)
        total = sum(
            F.cross_entropy(x.to(ct), t, ignore_index=ignore_index, reduction="sum")
            for x, t in zip(logits.split(rows), targets.split(rows))
        )
        n_valid = (targets != ignore_index).sum()
        ctx.save_for_backward(logits, targets, n_valid)
        ctx.ignore_index = ignore_index
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        logits, targets, n_valid = ctx.saved_tensors
        # d loss / d logits = (softmax - onehot) / n_valid on valid rows, 0 on ignored ones; the
        # softmax kernels accumulate in fp32 for bf16 logits and round once into the gradient.
        grad = torch.softmax(logits, dim=1, out=torch.empty_like(logits))
        valid = targets != ctx.ignore_index
        grad.scatter_add_(1, torch.where(valid, targets, 0).unsqueeze(1), -valid.to(grad.dtype).unsqueeze(1))
        scale = torch.where(valid, grad_loss.to(_compute_dtype(logits)) / n_valid, 0)
        return grad.mul_(scale.unsqueeze(1)), None, None  # multiplied in fp32, rounded once


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` [rows, vocab] against ``targets`` [rows], computed in fp32
    (fp64 stays fp64) whatever the logits' dtype: ``F.cross_entropy(logits.float(), targets)``,
    rows whose target is ``ignore_index`` left out of the mean.

    Targets are not range-checked here: a check reads a device value back on every micro-batch.
    fms-dyt's batches are in range by construction (every id comes from the tokenizer, and the
    trainer refuses a tokenizer larger than ``model.vocab_size`` at start-up); an id outside
    [0, vocab) is an IndexError on the CPU and a device-side assert on a GPU."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy wants logits [rows, vocab] and targets [rows]; got "
                         f"{tuple(logits.shape)} and {tuple(targets.shape)}")
    return _CrossEntropyFunction.apply(logits, targets, ignore_index)
