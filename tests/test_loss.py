"""The trainer's loss: fp32 mean cross-entropy, as F.cross_entropy, keeping nothing [rows, vocab] of its own."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fms_dyt import loss as loss_module
from fms_dyt.loss import cross_entropy


def _inputs(dtype, rows=300, vocab=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 4).to(dtype)
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[::7] = -100  # ignored rows, as Hugging Face pads
    return logits, targets


def _rel_err(a, b):
    return ((a.double() - b).abs().max() / b.abs().max()).item()


def test_gradcheck_fp64():
    logits, targets = _inputs(torch.float64, rows=6, vocab=9)
    assert torch.autograd.gradcheck(lambda x: cross_entropy(x, targets), (logits.requires_grad_(),))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 8e-3)])
def test_matches_torch(dtype, tol):
    logits, targets = _inputs(dtype)
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


def test_chunks_do_not_change_the_result(monkeypatch):
    logits, targets = _inputs(torch.float32, rows=40, vocab=50)
    x = logits.clone().requires_grad_()
    cross_entropy(x, targets).backward()
    monkeypatch.setattr(loss_module, "_CHUNK_ELEMENTS", 3 * 50)  # 3 rows a chunk, the last one short
    x_chunked = logits.clone().requires_grad_()
    loss = cross_entropy(x_chunked, targets)
    loss.backward()
    assert torch.allclose(loss, F.cross_entropy(logits, targets), rtol=1e-6)
    assert torch.allclose(x_chunked.grad, x.grad, rtol=1e-6, atol=1e-9)


def test_keeps_only_logits_and_targets():
    logits, targets = _inputs(torch.bfloat16, rows=64, vocab=500)
    logits.requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        cross_entropy(logits, targets)
    extra = sum(t.numel() * t.element_size() for t in saved if t.data_ptr() != logits.data_ptr())
    assert extra <= 64 * 8 + 8  # the targets (int64) and the count of valid rows; no [rows, vocab] tensor


def test_reads_nothing_back_and_rejects_bad_shapes():
    from fms_dyt.audit import StepAudit

    logits, targets = _inputs(torch.float32, rows=4, vocab=5)
    logits.requires_grad_()
    with StepAudit() as audit:  # no range check of the targets on the hot path: nothing waits for the device
        cross_entropy(logits, targets).backward()
    assert audit.total_host_reads() == 0, audit.host_reads
    with pytest.raises(ValueError, match=r"logits \[rows, vocab\]"):
        cross_entropy(logits.reshape(2, 2, 5), targets)
