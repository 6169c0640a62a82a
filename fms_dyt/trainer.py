"""The fms-dyt training loop: build, resume, step, log, checkpoint, stop cleanly.

Exit codes: 0 when ``train.max_steps`` is reached; 75 (EX_TEMPFAIL) after SIGTERM or SIGUSR1,
once the step after the signal is done and a checkpoint is saved (run the same command again to resume);
130 after Ctrl-C, likewise (a second Ctrl-C stops at once); 2 for a configuration that cannot
work or that would change the run already in ``run_dir``; 3 for a diverged run; 4 for a hung rank
(fms_dyt/watchdog.py); 5 for a node that failed the preflight check; 6 for a checkpoint that did
not fit on its file system; 1 on other errors. See fms_dyt/stop.py and fms_dyt/failures.py.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

from fms_dyt import failures, float8, watchdog
from fms_dyt.checkpoint import CheckpointError, Checkpointer, complete_checkpoints
from fms_dyt.config import model_args, norm_args, schedule, validate
from fms_dyt.errors import EXIT_DIVERGED, EXIT_ERROR, EXIT_INTERRUPTED, ConfigError, counted, refuse
from fms_dyt.metrics import Eta, MetricsLogger, Throughput, flops_per_token, norm_scalars, peak_flops, peak_memory_gib
from fms_dyt.model import Transformer, count_parameters
from fms_dyt.loss import cross_entropy
from fms_dyt.optim import build_optimizer, lr_at
from fms_dyt.parallel import Dist, apply_parallelism, build_mesh, init_distributed, materialize, use_step_timeout
from fms_dyt.preflight import PreflightError, preflight
from fms_dyt.resume import check_same_run
from fms_dyt.stop import StopRequest
from fms_dyt.validation import build_validation
from fms_dyt.telemetry import Telemetry
from fms_dyt.watchdog import Watchdog

log = logging.getLogger("fms_dyt")


class NonFiniteError(RuntimeError):
    pass


@dataclass
class StepResult:
    loss: torch.Tensor  # this rank's mean loss over its micro-batches (not averaged over ranks)
    grad_norm: torch.Tensor  # of the whole model, before clipping; NaN on every rank after a non-finite loss
    updated: torch.Tensor | bool  # on the device: False where the update was skipped (True without check_finite)
    data_wait_s: float  # time spent waiting for batches


def _set_gradient_sync(model: torch.nn.Module, last: bool, defer_grad_sync: bool, hybrid: bool) -> None:
    """What FSDP communicates after a micro-batch's backward.

    By default every micro-batch reduce-scatters, so a rank only ever holds its shard of the
    gradients; with a replicate dimension (hybrid, none) the all-reduce across replicas waits for
    the last micro-batch, which costs no memory. ``defer_grad_sync`` keeps whole unsharded
    gradients until the last micro-batch: less communication, only for models whose gradients fit.
    """
    if defer_grad_sync:
        model.set_requires_gradient_sync(last)
    elif hybrid:
        model.set_requires_all_reduce(last)


def train_step(model, optimizer, batches, accum: int, grad_clip: float, device, *, defer_grad_sync: bool = False,
               hybrid: bool = False, check_finite: bool = True) -> StepResult:
    """One optimizer step over ``accum`` micro-batches ``(inputs, targets)`` taken from ``batches``.

    Nothing here waits for the device. With ``check_finite`` a non-finite loss on any rank or a
    non-finite gradient skips the update on every rank, decided on the device: the loss's verdict
    rides in the gradient norm's one reduction, and fused AdamW's ``found_inf`` leaves parameters,
    moments and step counts as they were. Without it the optimizer always steps. The caller sets
    the learning rate.
    """
    loss_sum = torch.zeros((), device=device)
    data_wait = 0.0
    for micro in range(accum):
        t_data = time.perf_counter()
        inputs, targets = next(batches)
        data_wait += time.perf_counter() - t_data
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if isinstance(model, FSDPModule):
            _set_gradient_sync(model, micro == accum - 1, defer_grad_sync, hybrid)
        loss = cross_entropy(model(inputs).flatten(0, 1), targets.flatten()) / accum
        loss.backward()
        loss_sum += loss.detach()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    grad_norm = clip_grad_norm(grads, grad_clip, poison=~torch.isfinite(loss_sum) if check_finite else None)
    updated = torch.isfinite(grad_norm) if check_finite else True
    if check_finite:
        optimizer.found_inf = (~updated).float()  # read by fused AdamW (torch.optim.Adam.step)
    optimizer.step()
    optimizer.found_inf = None
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_sum, grad_norm, updated, data_wait)


@torch.no_grad()
def clip_grad_norm(grads: list[torch.Tensor], max_norm: float, poison: torch.Tensor | None = None) -> torch.Tensor:
    """Scale ``grads`` in place to a total 2-norm of at most ``max_norm``; returns the norm before
    clipping, the same on every rank, from ONE all-reduce of one number per rank (each rank's
    shards' sum of squares). ``poison`` (a device bool) makes the norm NaN on every rank: how a
    non-finite loss on one rank reaches the others without a collective of its own. (With HSDP
    replicas it reaches its own replica's ranks; the NaN gradients such a loss brings reach the
    others through FSDP's all-reduce across replicas.)"""
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(local)))
    if poison is not None:
        norm = torch.where(poison, torch.full_like(norm, math.nan), norm)
    if isinstance(grads[0], DTensor):  # FSDP2: sum the squares over the mesh dimensions that shard
        mesh, placements = grads[0].device_mesh, grads[0].placements
        partial = [Partial() if isinstance(p, Shard) else Replicate() for p in placements]
        norm = DTensor.from_local(norm.square(), mesh, partial).full_tensor().sqrt()
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)  # as torch.nn.utils.clip_grad_norm_
    torch._foreach_mul_(local, coef)
    return norm


class SkipCounter:
    """Skipped updates, counted on the device so that no step reads them: since the last log step,
    and in a row (now, and the longest run since the last log step)."""

    def __init__(self, device):
        self.skipped, self.run, self.longest = (torch.zeros((), device=device) for _ in range(3))

    def add(self, updated: torch.Tensor) -> None:
        bad = (~updated).float()
        self.skipped += bad
        self.run.add_(1).mul_(bad)
        torch.maximum(self.longest, self.run, out=self.longest)

    def values(self) -> list[torch.Tensor]:
        return [self.skipped, self.longest]

    def check(self, stats: dict, step: int, max_bad_steps: int, is_main: bool) -> None:
        """At a log step, with the counts ``log_stats`` read: warn, and stop a run that skipped
        ``train.max_bad_steps`` updates in a row (found here, up to ``logging.interval`` steps
        after the fact: the skipped steps changed nothing)."""
        skipped, in_a_row = stats["skipped_updates"], stats["skipped_in_a_row"]
        if skipped and is_main:
            log.warning("step %d: %d update(s) skipped since the last record for a non-finite loss or gradient "
                        "(%d in a row)", step, skipped, in_a_row)
        if in_a_row >= max_bad_steps:
            raise NonFiniteError(
                f"{in_a_row} steps in a row with a non-finite loss or gradient (train.max_bad_steps="
                f"{max_bad_steps}); lower optim.lr or resume from an earlier checkpoint"
            )
        self.skipped.zero_()
        self.longest.copy_(self.run)  # a run goes on across log steps


def log_stats(result: StepResult, skips: SkipCounter, model, data_stats: dict, host, is_main: bool) -> dict:
    """The numbers a log step records: the loss averaged over ranks, the grad norm, skipped updates,
    every norm scalar (``metrics.norm_scalars``) and the data counters summed over ranks
    (``epoch``: the slowest rank's), from ONE read of a stacked device tensor on each rank and ONE
    gather of those rows to rank 0 over the CPU group ``host``. The other ranks get their own
    row's numbers (the grad norm and the skip counts are the same on every rank)."""
    scalars = norm_scalars(model)
    on_device = torch.stack([t.double() for t in (result.loss, result.grad_norm, *skips.values(), *scalars.values())])
    row = torch.cat([on_device.cpu(), torch.tensor([float(v) for v in data_stats.values()], dtype=torch.float64)])
    rows = [torch.empty_like(row) for _ in range(dist.get_world_size(host))] if is_main else None
    dist.gather(row, rows, dst=0, group=host)
    columns = list(zip(*(torch.stack(rows) if is_main else row[None]).tolist()))
    loss, grad_norm, skipped, in_a_row, *rest = columns
    held = [next((v for v in c if not math.isnan(v)), math.nan) for c in rest[:len(scalars)]]  # the rank that holds it
    counters = {f"data/{k}": (min(c) if k == "epoch" else math.fsum(c)) for k, c in zip(data_stats, rest[len(scalars):])}
    counters = {k: int(v) if isinstance(data_stats[k[5:]], int) else v for k, v in counters.items()}
    return {"loss": math.fsum(loss) / len(loss), "grad_norm": grad_norm[0], "skipped_updates": int(skipped[0]),
            "skipped_in_a_row": int(in_a_row[0]), **counters, **dict(zip(scalars, held))}


def build_model(cfg, d: Dist, mesh) -> Transformer:
    """The model as every rank trains it: built on the meta device, parallelised, then allocated
    and initialised on ``d.device`` (``fms_dyt.simulate`` builds it the same way)."""
    with torch.device("meta"):
        model = Transformer(model_args(cfg), norm_args(cfg))
    apply_parallelism(model, cfg.parallel, mesh)
    materialize(model, d.device, cfg.seed)
    return model


def train(cfg, data=None) -> int:
    """Train to ``train.max_steps``; ``data`` replaces the configured loader (same interface)."""
    watchdog.current = None  # an earlier train()'s in this process (tests) is not this run's
    validate(cfg)
    stop = StopRequest()  # from here on a signal ends the run after a step and a checkpoint
    try:
        return _train(cfg, data, stop)
    finally:
        stop.restore()
        if watchdog.current is not None:  # a failed run's: its thread must not outlive train()
            watchdog.current.stop()
        if dist.is_initialized() and dist.get_backend() == "gloo":
            # A failed run's (a finished one's is gone already): a live gloo group can abort the
            # interpreter's exit (SIGABRT) in place of our exit code. NCCL's destroy waits for the
            # peers' collectives, which a failed rank's peers may never finish: left to exit.
            dist.destroy_process_group()


def _train(cfg, data, stop: StopRequest) -> int:
    d = init_distributed(cfg.train.device, cfg.parallel.init_timeout_s)
    failures.note_start(cfg.run_dir, d.rank)  # under slurm/launch.sh: this rank's account of the attempt
    if cfg.preflight.enabled:
        preflight(d, cfg.preflight.timeout_s, cfg.parallel.init_timeout_s, failures.attempt_id())
    dog = Watchdog.for_run(cfg, cfg.run_dir, d.rank)  # None: watchdog.enabled=false
    total_steps, accum = schedule(cfg, d.world_size)
    run_dir = Path(cfg.run_dir)
    if data is None:
        from fms_dyt.data.tokenizer import TextEncoder

        vocab = TextEncoder(cfg.tokenizer).vocab_size
        if vocab > cfg.model.vocab_size:
            raise ConfigError(f"the tokenizer (tokenizer.path={cfg.tokenizer.path}) has {vocab} tokens but "
                              f"model.vocab_size={cfg.model.vocab_size}; raise model.vocab_size to at least {vocab}")
    validation = build_validation(cfg, d.rank, d.world_size, d.device)  # its data errors refuse here too
    check_same_run(cfg, run_dir)  # before anything is written: a refused run changes no file
    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        log.info("run directory: %s", run_dir.resolve())
    torch.manual_seed(cfg.seed)

    args, norm = model_args(cfg), norm_args(cfg)
    mesh = build_mesh(cfg.parallel, d)
    model = build_model(cfg, d, mesh)
    if d.is_main:
        alpha0 = norm.alpha0()
        alphas = "; alpha0 " + ", ".join(f"{site} {a:.4g}" for site, a in alpha0.items()) if alpha0 else ""
        log.info("model %s, norm %s: %s parameters%s; embedding scalar %s; %s, %s a step on %s",
                 cfg.model.name, norm.description(), f"{count_parameters(model)['total']:,}", alphas,
                 "on" if norm.embedding_scale else "off", counted(total_steps, "step"),
                 counted(accum, "micro-batch", "micro-batches"), counted(d.world_size, "rank"))
    optimizer = build_optimizer(model, cfg.optim)
    if data is None:
        from fms_dyt.data import build_dataloader

        data = build_dataloader(cfg.data, cfg.tokenizer, seq_len=cfg.train.seq_len,
                                micro_batch_size=cfg.train.micro_batch_size, seed=cfg.seed,
                                rank=d.rank, world_size=d.world_size, pin_memory=d.device.type == "cuda")

    ckpt = Checkpointer(str(run_dir), cfg, d.rank, d.world_size)
    ckpt.clean_partial()
    step, tokens_seen = 0, 0
    resumed = ckpt.load_newest(model, optimizer)
    if resumed:
        float8.precompute_scales(model)  # of the loaded weights (fms_dyt.float8.watch_optimizer)
        path, meta, skipped = resumed
        step, tokens_seen = meta["step"], meta["tokens_seen"]
        data.load_state_dict(meta["data_state"])
        if d.is_main:
            log.info("resumed from %s (step %d, %s, saved on %s)%s", path, step, counted(tokens_seen, "token"),
                     counted(meta["world_size"], "rank"), f"; skipped {counted(len(skipped), 'newer checkpoint')} that "
                     "cannot be loaded" if skipped else "")
    elif d.is_main:
        log.info("starting fresh at step 1: no checkpoint in %s", run_dir / "checkpoints")

    metrics = MetricsLogger(str(run_dir), cfg, enabled=d.is_main, resumed_step=step)
    meter = Throughput(flops_per_token(args, cfg.train.seq_len), peak_flops(d.device, cfg.parallel.peak_tflops), d.world_size)
    eta = Eta(step, total_steps)
    telemetry = Telemetry.for_run(cfg, total_steps, d.is_main, resumed=step > 0)  # None: logging.telemetry_interval null
    batches = iter(data)
    # A CPU group for the host's bookkeeping: the stop agreement and the log steps' gather.
    host = dist.new_group(backend="gloo", group_desc="host_bookkeeping")
    skips = SkipCounter(d.device)
    data_wait = 0.0
    if d.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(d.device)

    while step < total_steps:
        step += 1
        t_step = time.perf_counter()
        lr = lr_at(step, total_steps, cfg.optim)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]  # optim.alpha_and_shift_lr_scale (fms_dyt.optim)
        result = train_step(model, optimizer, batches, accum, cfg.optim.grad_clip, d.device,
                            defer_grad_sync=cfg.parallel.defer_grad_sync, hybrid=cfg.parallel.sharding != "full")
        skips.add(result.updated)
        if step == eta.start_step + 1:  # start-up is over (loading, the first compiled step): shorter timeouts
            use_step_timeout(cfg.parallel.timeout_s)
        data_wait += result.data_wait_s
        tokens_seen += cfg.train.global_batch_tokens
        meter.add(cfg.train.global_batch_tokens)

        val_loss = validation.loss(model) if validation is not None and validation.due(step, total_steps) else None
        probe = telemetry is not None and telemetry.due(step)
        if step % cfg.logging.interval == 0 or step == total_steps or val_loss is not None or probe:
            # The step's one read of the device and one collective (a gather to rank 0, on the CPU).
            stats = log_stats(result, skips, model, data.stats(), host, d.is_main)
            skips.check(stats, step, cfg.train.max_bad_steps, d.is_main)
            values = {"loss": stats["loss"], "lr": lr, "grad_norm": stats["grad_norm"], "tokens_seen": tokens_seen,
                      **meter.read(), "step_time_s": time.perf_counter() - t_step, "data_wait_s": data_wait, **stats}
            data_wait = 0.0
            if probe:  # every rank: the pass gathers parameters
                values.update(telemetry(model, step))
            values["peak_memory_gib"] = peak_memory_gib(d.device)
            if val_loss is not None:
                values["val/loss"] = val_loss
            metrics.log(step, values)
            if d.is_main and (step % cfg.logging.console_interval == 0 or step == total_steps or val_loss is not None):
                mfu = f"{values['mfu']:.1%}" if values["mfu"] is not None else "n/a"
                val = f"  val {val_loss:.4f}" if val_loss is not None else ""
                print(f"step {step:>6}/{total_steps}  loss {values['loss']:.4f}{val}  lr {lr:.2e}  "
                      f"grad {values['grad_norm']:.3f}  {values['tokens_per_s']:,.0f} tok/s  mfu {mfu}  ETA {eta.left(step)}",
                      flush=True)

        stopping = stop.agreed(host)  # the previous step's flags: every rank stops after the same step
        if dog is not None:
            dog.step_done(step)
        if step % cfg.checkpoint.interval == 0 or step == total_steps or stopping:
            if dog is not None:
                dog.saving()
            where = ckpt.save(step, tokens_seen, model, optimizer, data.state_dict(), blocking=bool(stopping))
            if d.is_main:
                log.info("checkpoint saved: %s", where)
        if stopping:
            ckpt.wait()
            metrics.finish()
            code = stop.after_checkpoint(stopping, d.rank)
            if d.is_main:
                log.info("stopped by %s after step %d; exit %d: run the same command to resume",
                         stop.signum or "a signal to another rank", step, code)
            if dog is not None:
                dog.stop()
            dist.destroy_process_group()
            return code

    stop.settle()
    ckpt.wait()
    if dog is not None:
        dog.stop()
    wandb_dir = metrics.finish()
    if d.is_main:
        last = complete_checkpoints(run_dir)[-1]
        print(f"\ndone: {step} steps, {tokens_seen:,} tokens\n"
              f"  checkpoint: {last}\n  metrics:    {run_dir / 'metrics.jsonl'}\n"
              + (f"  W&B run:    {wandb_dir} (offline: `wandb sync {Path(wandb_dir).parent}`)\n" if wandb_dir else "")
              + f"next: python eval/zero_shot.py {run_dir}   |   python -m fms_dyt.analyze {run_dir} --out {run_dir}/report",
              flush=True)
        from fms_dyt.generate import print_final_sample

        print_final_sample(last, count_parameters(model)["total"])
    dist.destroy_process_group()
    return 0


def main(cfg) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        code = train(cfg)
    except ConfigError as e:
        code = failures.note_exit(cfg.run_dir, refuse("fms-dyt", e), e)
    except NonFiniteError as e:
        print(f"fms-dyt: the run diverged: {e}", file=sys.stderr)
        code = failures.note_exit(cfg.run_dir, EXIT_DIVERGED, e)
    except (CheckpointError, PreflightError) as e:
        print(f"fms-dyt: {e}", file=sys.stderr)
        code = failures.note_exit(cfg.run_dir, getattr(e, "exit_code", EXIT_ERROR), e)
    except KeyboardInterrupt:
        print(f"\nfms-dyt: stopped at once by a second Ctrl-C; the newest checkpoint in {cfg.run_dir}/checkpoints "
              "is where the same command resumes", file=sys.stderr)
        code = failures.note_exit(cfg.run_dir, EXIT_INTERRUPTED)
    except Exception as e:  # recorded (a hung rank's stacks dumped first), then raised as before
        failures.note_exit(cfg.run_dir, EXIT_ERROR, e)
        raise
    else:
        failures.note_exit(cfg.run_dir, code)
    if code:  # returning on success lets Hydra multirun launchers (submitit) record the job's result
        sys.exit(code)
