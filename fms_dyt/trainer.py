"""The fms-dyt training loop: build, resume, step, log, checkpoint, stop cleanly.

Exit codes: 0 when ``train.max_steps`` is reached; 75 (EX_TEMPFAIL) after SIGTERM or SIGUSR1,
once the current step is done and a checkpoint is saved (run the same command again to resume);
1 on errors.
"""

from __future__ import annotations

import logging
import math
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from fms_dyt.checkpoint import Checkpointer, complete_checkpoints
from fms_dyt.config import ConfigError, model_args, norm_args, validate
from fms_dyt.metrics import Eta, MetricsLogger, Throughput, flops_per_token, norm_scalars, peak_flops, peak_memory_gib
from fms_dyt.model import Transformer, count_parameters
from fms_dyt.ops import cross_entropy
from fms_dyt.optim import build_optimizer, lr_at
from fms_dyt.parallel import apply_parallelism, build_mesh, init_distributed, materialize

EXIT_PREEMPTED = 75
log = logging.getLogger("fms_dyt")


class NonFiniteError(RuntimeError):
    pass


def schedule(cfg, world_size: int) -> tuple[int, int]:
    """(total steps, gradient-accumulation steps), checked before anything is allocated."""
    t = cfg.train
    per_micro = t.seq_len * t.micro_batch_size * world_size
    if t.global_batch_tokens % per_micro:
        raise ConfigError(
            f"train.global_batch_tokens={t.global_batch_tokens} is not a multiple of train.seq_len "
            f"x train.micro_batch_size x world size = {t.seq_len} x {t.micro_batch_size} x {world_size} "
            f"= {per_micro}; change one of them"
        )
    if t.max_steps is None and t.tokens is None:
        raise ConfigError("set train.max_steps or train.tokens (total training tokens)")
    steps = t.max_steps if t.max_steps is not None else math.ceil(t.tokens / t.global_batch_tokens)
    return steps, t.global_batch_tokens // per_micro


class StopRequest:
    """SIGTERM/SIGUSR1 set a flag; the loop checkpoints and exits after the current step."""

    def __init__(self):
        self.signum = None
        for s in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        self.signum = signum

    def agreed(self, device) -> bool:
        """True on every rank once any rank was signalled (ranks may see the signal at different steps)."""
        flag = torch.tensor([1.0 if self.signum else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def train(cfg, data=None) -> int:
    """Train to ``train.max_steps``; ``data`` replaces the configured loader (same interface)."""
    validate(cfg)
    d = init_distributed(cfg.train.device, cfg.parallel.timeout_s)
    total_steps, accum = schedule(cfg, d.world_size)
    run_dir = Path(cfg.run_dir)
    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    torch.manual_seed(cfg.seed)
    if data is None:
        from fms_dyt.data.tokenizer import TextEncoder

        vocab = TextEncoder(cfg.tokenizer).vocab_size
        if vocab > cfg.model.vocab_size:
            raise ConfigError(f"the tokenizer (tokenizer.path={cfg.tokenizer.path}) has {vocab} tokens but "
                              f"model.vocab_size={cfg.model.vocab_size}; raise model.vocab_size to at least {vocab}")

    args, norm = model_args(cfg), norm_args(cfg)
    with torch.device("meta"):
        model = Transformer(args, norm)
    if d.is_main:
        log.info("run directory: %s", run_dir.resolve())
        alphas = "" if norm.kind != "dyt" else (
            f"; alpha0 attn {norm.alpha_attn:.4g}, ffn {norm.alpha_ffn:.4g}, final {norm.alpha_final:.4g}"
        )
        log.info("model %s, norm %s: %s parameters%s; embedding scalar %s; %d steps, %d micro-batches a step on %d ranks",
                 cfg.model.name, norm.kind, f"{count_parameters(model)['total']:,}", alphas,
                 "on" if norm.embedding_scale else "off", total_steps, accum, d.world_size)
    mesh = build_mesh(cfg.parallel, d)
    apply_parallelism(model, cfg.parallel, mesh)
    materialize(model, d.device, cfg.seed)
    optimizer = build_optimizer(model, cfg.optim)
    if data is None:
        from fms_dyt.data import build_dataloader

        data = build_dataloader(cfg.data, cfg.tokenizer, seq_len=cfg.train.seq_len,
                                micro_batch_size=cfg.train.micro_batch_size, seed=cfg.seed,
                                rank=d.rank, world_size=d.world_size)

    ckpt = Checkpointer(str(run_dir), cfg, d.rank, d.world_size)
    ckpt.clean_partial()
    step, tokens_seen = 0, 0
    existing = complete_checkpoints(run_dir)
    if existing:
        meta = ckpt.load(existing[-1], model, optimizer)
        step, tokens_seen = meta["step"], meta["tokens_seen"]
        data.load_state_dict(meta["data_state"])
        if d.is_main:
            log.info("resumed from %s (step %d, %s tokens, saved on %d ranks)",
                     existing[-1], step, f"{tokens_seen:,}", meta["world_size"])

    metrics = MetricsLogger(str(run_dir), cfg, enabled=d.is_main, resumed_step=step)
    meter = Throughput(flops_per_token(args, cfg.train.seq_len), peak_flops(d.device, cfg.parallel.peak_tflops), d.world_size)
    eta = Eta(step, total_steps)
    stop = StopRequest()
    batches = iter(data)
    bad_steps, data_wait = 0, 0.0
    if d.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(d.device)

    while step < total_steps:
        step += 1
        t_step = time.perf_counter()
        lr = lr_at(step, total_steps, cfg.optim)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=d.device)
        for micro in range(accum):
            t_data = time.perf_counter()
            inputs, targets = next(batches)
            data_wait += time.perf_counter() - t_data
            inputs, targets = inputs.to(d.device, non_blocking=True), targets.to(d.device, non_blocking=True)
            model.set_requires_gradient_sync(micro == accum - 1)
            logits = model(inputs)
            loss = cross_entropy(logits.flatten(0, 1), targets.flatten()) / accum
            loss.backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        dist.all_reduce(loss_sum)  # SUM: gloo has no AVG
        loss_value = loss_sum.item() / d.world_size
        if math.isfinite(loss_value) and math.isfinite(grad_norm.item()):
            optimizer.step()
            bad_steps = 0
        else:  # skip the update; a few in a row mean the run has diverged
            bad_steps += 1
            if d.is_main:
                log.warning("step %d: non-finite loss %s or grad norm %s; update skipped (%d in a row)",
                            step, loss_value, grad_norm.item(), bad_steps)
            if bad_steps >= cfg.train.max_bad_steps:
                raise NonFiniteError(
                    f"{bad_steps} steps in a row with a non-finite loss or gradient (train.max_bad_steps="
                    f"{cfg.train.max_bad_steps}); lower optim.lr or resume from an earlier checkpoint"
                )
        optimizer.zero_grad(set_to_none=True)
        tokens_seen += cfg.train.global_batch_tokens
        meter.add(cfg.train.global_batch_tokens)

        if step % cfg.logging.interval == 0 or step == total_steps:
            values = {"loss": loss_value, "lr": lr, "grad_norm": grad_norm.item(), "tokens_seen": tokens_seen,
                      **meter.read(), "step_time_s": time.perf_counter() - t_step,
                      "data_wait_s": data_wait, "skipped_updates": bad_steps,
                      **{f"data/{k}": v for k, v in data.stats().items()}, **norm_scalars(model)}
            data_wait = 0.0
            values["peak_memory_gib"] = peak_memory_gib(d.device)
            metrics.log(step, values)
            if d.is_main and (step % cfg.logging.console_interval == 0 or step == total_steps):
                mfu = f"{values['mfu']:.1%}" if values["mfu"] is not None else "n/a"
                print(f"step {step:>6}/{total_steps}  loss {loss_value:.4f}  lr {lr:.2e}  "
                      f"grad {values['grad_norm']:.3f}  {values['tokens_per_s']:,.0f} tok/s  mfu {mfu}  ETA {eta.left(step)}",
                      flush=True)

        stopping = stop.agreed(d.device)
        if step % cfg.checkpoint.interval == 0 or step == total_steps or stopping:
            where = ckpt.save(step, tokens_seen, model, optimizer, data.state_dict(), blocking=stopping)
            if d.is_main:
                log.info("checkpoint saved: %s", where)
        if stopping:
            ckpt.wait()
            if d.is_main:
                log.info("stopped by signal %s after step %d; exit %d: run the same command to resume",
                         stop.signum, step, EXIT_PREEMPTED)
            metrics.finish()
            dist.destroy_process_group()
            return EXIT_PREEMPTED

    ckpt.wait()
    wandb_dir = metrics.finish()
    if d.is_main:
        last = complete_checkpoints(run_dir)[-1]
        print(f"\ndone: {step} steps, {tokens_seen:,} tokens\n"
              f"  checkpoint: {last}\n  metrics:    {run_dir / 'metrics.jsonl'}\n"
              + (f"  W&B run:    {wandb_dir} (offline: `wandb sync {Path(wandb_dir).parent}`)\n" if wandb_dir else "")
              + f"next: python eval/zero_shot.py {run_dir}   |   python -m fms_dyt.analyze {run_dir} --out {run_dir}/report",
              flush=True)
    dist.destroy_process_group()
    return 0


def main(cfg) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        code = train(cfg)
    except ConfigError as e:
        print(f"fms-dyt: configuration error: {e}", file=sys.stderr)
        code = 2
    if code:  # returning on success lets Hydra multirun launchers (submitit) record the job's result
        sys.exit(code)
