"""One training step (forward, loss, backward, gradient clipping, AdamW) of fms-dyt's model against
transformers' ``LlamaForCausalLM`` with the same config and weights, and DyT against RMSNorm.

Both sides get the same token batch, the same fp32 cross-entropy on their logits, the same
clipping, and AdamW with the same hyper-parameters: ours from ``fms_dyt.optim.build_optimizer``
(what the trainer runs), theirs fused, as transformers' Trainer defaults to. Our side runs the
trainer's own ``fms_dyt.trainer.train_step`` (with its non-finite check). Before timing, the
two networks must give the same loss, so they are the same network. "Compiled" is ours with each
block compiled, as ``parallel.compile=true`` trains; for transformers, ``torch.compile(model)``;
their best is the faster of eager and compiled. Models run without FSDP (one process).

``shared_kernels_over_hf_step_compiled`` is the time our compiled step spends in the kernels both
sides call on the same shapes (matrix multiplies and the attention kernel; profiled) over
transformers' best step: no step that does the same multiplies and attention can go below it.
"""

from __future__ import annotations

import copy
import itertools

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from harness import interleaved, median, medians_ms, ratio
from transformers import LlamaForCausalLM

from fms_dyt.config import load_config, model_args, norm_args
from fms_dyt.hf import llama_config, to_llama_state_dict
from fms_dyt.model import Transformer
from fms_dyt.loss import cross_entropy
from fms_dyt.optim import build_optimizer
from fms_dyt.trainer import train_step


def hf_loss(logits, targets):
    """Mean cross-entropy on fp32 logits, as transformers' ForCausalLMLoss computes it."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def fms_loss(logits, targets):
    """The loss fms_dyt.trainer.train_step computes: the same mean cross-entropy in fp32
    (fms_dyt.loss.cross_entropy)."""
    return cross_entropy(logits.flatten(0, 1), targets.flatten())


def _hf_step_fn(model: torch.nn.Module, optimizer, inputs, targets, clip: float):
    """transformers' side: a plain step with its loss."""
    def step():
        loss = hf_loss(model(input_ids=inputs).logits, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def _fms_step_fn(model: torch.nn.Module, optimizer, inputs, targets, clip: float):
    """Ours: the trainer's own step, one micro-batch."""
    batches = itertools.repeat((inputs, targets))
    return lambda: train_step(model, optimizer, batches, 1, clip, inputs.device).loss


def _ours(overrides: list[str], norm: str, compiled: bool, backend: str, seed_model=None) -> Transformer:
    cfg = load_config([*overrides, f"norm={norm}"])
    model = Transformer(model_args(cfg), norm_args(cfg))
    if seed_model is not None:
        model.load_state_dict(seed_model.state_dict())
    if compiled:
        for block in model.layers:  # as fms_dyt.parallel.apply_parallelism does
            block.forward = torch.compile(block.forward, backend=backend, fullgraph=True)
    return model


# The kernels both sides call for the same work: matrix multiplies and the attention kernel.
SHARED_KERNELS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
                  "aten::_scaled_dot_product_flash_attention_for_cpu",
                  "aten::_scaled_dot_product_flash_attention_for_cpu_backward")


def _shared_kernel_seconds(step, repeats: int) -> list[float]:
    """Seconds a step spends inside SHARED_KERNELS (their own time, from the profiler), per repeat."""
    seconds = []
    for _ in range(repeats):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        seconds.append(sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in SHARED_KERNELS) / 1e6)
    return seconds


def _loss_times(rows: int, vocab: int, repeats: int) -> dict[str, list[float]]:
    """fms_dyt.loss.cross_entropy against F.cross_entropy, forward + backward on the step's logits."""
    g = torch.Generator().manual_seed(1)
    logits, targets = torch.randn(rows, vocab, generator=g), torch.randint(0, vocab, (rows,), generator=g)

    def run(fn):
        def case():
            x = logits.detach().requires_grad_(True)
            fn(x, targets).backward()
        return case
    return interleaved({"fused": run(cross_entropy), "torch": run(lambda x, t: F.cross_entropy(x.float(), t))},
                       repeats, warmup=2)


def measure(quick: bool = False) -> tuple[dict, dict]:
    # quick: a 2-layer tiny model with a small vocabulary, compiled by dynamo alone (no codegen).
    overrides = ["model=tiny", "model.n_layers=2", "model.vocab_size=512"] if quick else ["model=small"]
    batch, seq, repeats = (2, 32, 3) if quick else (4, 256, 9)
    backend = "eager" if quick else "inductor"
    cfg = load_config([*overrides, "norm=rmsnorm"])
    args = model_args(cfg)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (batch, seq + 1), generator=g)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    reference = _ours(overrides, "rmsnorm", False, backend)
    hf_eager = LlamaForCausalLM(llama_config(args, norm_args(cfg)))
    hf_eager.load_state_dict(to_llama_state_dict(reference.state_dict()))
    hf_compiled = copy.deepcopy(hf_eager)
    models = {
        "fms_eager": (reference, reference),
        "fms_compiled": (m := _ours(overrides, "rmsnorm", True, backend, reference), m),
        "hf_eager": (hf_eager, hf_eager),
        "hf_compiled": (hf_compiled, torch.compile(hf_compiled, backend=backend)),
        "dyt_eager": (d := _ours(overrides, "dyt", False, backend), d),
        "dyt_compiled": (dc := _ours(overrides, "dyt", True, backend, d), dc),
    }
    with torch.no_grad():  # the same network, or the comparison means nothing
        loss_fms = fms_loss(reference(inputs), targets)
        loss_hf = hf_loss(hf_eager(input_ids=inputs).logits, targets)
    if not torch.allclose(loss_fms, loss_hf, rtol=1e-4):
        raise AssertionError(f"fms-dyt and transformers disagree on the loss: {loss_fms} vs {loss_hf}")

    cases = {}
    for name, (module, forward) in models.items():
        if name.startswith("hf"):
            optimizer = torch.optim.AdamW(module.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                          eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay, fused=True)
            cases[name] = _hf_step_fn(forward, optimizer, inputs, targets, cfg.optim.grad_clip)
        else:
            cases[name] = _fms_step_fn(forward, build_optimizer(module, cfg.optim), inputs, targets, cfg.optim.grad_clip)
    times = interleaved(cases, repeats, warmup=2)
    ce = _loss_times(batch * seq, args.vocab_size, repeats)
    hf_best = min(("hf_eager", "hf_compiled"), key=lambda name: median(times[name]))
    # Both sides run these kernels on the same shapes; their time alone bounds how far ahead a step can be.
    shared_s = {name: _shared_kernel_seconds(cases[name], 1 if quick else 3) for name in ("fms_compiled", hf_best)}
    step_tokens = batch * seq
    results = {
        "fms_over_hf_step_eager": ratio(times, "fms_eager", "hf_eager"),
        "fms_over_hf_step_compiled": ratio(times, "fms_compiled", hf_best),
        # The trainer's default (parallel.compile=false); compiled blocks recorded too.
        "dyt_over_rms_step": ratio(times, "dyt_eager", "fms_eager"),
        "dyt_over_rms_step_compiled": ratio(times, "dyt_compiled", "fms_compiled"),
        "ce_fused_over_torch_fwdbwd": ratio(ce, "fused", "torch"),
        "shared_kernels_over_hf_step_compiled": median(shared_s["fms_compiled"]) / median(times[hf_best]),
    }
    details = {
        "model": " ".join(overrides), "n_params": sum(p.numel() for p in reference.parameters()),
        "micro_batch": batch, "seq_len": seq, "dtype": "float32", "repeats": repeats, "compile_backend": backend,
        "hf_best": hf_best, "loss_fms": loss_fms.item(), "loss_hf": loss_hf.item(),
        "median_ms": {**medians_ms(times), **{f"cross_entropy_{k}": v for k, v in medians_ms(ce).items()}},
        "shared_kernels_ms": {name: round(median(v) * 1e3, 3) for name, v in shared_s.items()},
        "tokens_per_s": {name: round(step_tokens / median(t), 1) for name, t in times.items()},
    }
    return results, details
