"""Training metrics: FLOPs per token, MFU, ``metrics.jsonl`` (written and read back), Weights & Biases
and the console line.

FLOPs follow PaLM's convention: 6·N + 12·L·d·T per token, N the weights that take part in matrix
multiplies (attention, FFN and the output head; not the embedding lookup, norms or scalars),
L layers, d width, T sequence length (the attention scores and their use).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fms_dyt.model import ModelArgs
from fms_dyt.norms import norm_sites

log = logging.getLogger("fms_dyt")

# Dense bf16 peak per device, FLOP/s. Other devices: set parallel.peak_tflops.
PEAK_FLOPS = {"A100": 312e12, "H100": 989e12, "H200": 989e12, "B200": 2250e12}

# Keys of a metrics.jsonl record: alpha/<site>/<layer> (norm_scalars), and
# telemetry/<quantity>/<site> (fms_dyt/telemetry.py); site: attn/<layer>, ffn/<layer> or final
ALPHA_KEY = re.compile(r"^alpha/(attn|ffn)/(\d+)$")
TELEMETRY_KEY = re.compile(r"^telemetry/(\w+)/(attn/\d+|ffn/\d+|final)$")


def matmul_params(args: ModelArgs) -> int:
    hd = args.head_dim
    attention = args.dim * hd * (2 * args.n_heads + 2 * args.kv_heads)
    ffn = 3 * args.dim * args.ffn_dim
    return args.n_layers * (attention + ffn) + args.dim * args.vocab_size


def flops_per_token(args: ModelArgs, seq_len: int) -> int:
    """Training FLOPs (forward + backward) per token."""
    return 6 * matmul_params(args) + 12 * args.n_layers * args.dim * seq_len


def peak_flops(device: torch.device, configured_tflops: float | None) -> float | None:
    if configured_tflops:
        return configured_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_FLOPS.items():
            if key in name:
                return value
    return None


class MetricsLogger:
    """Rank 0 writes ``<run_dir>/metrics.jsonl`` and W&B; W&B trouble never stops training."""

    def __init__(self, run_dir: str, cfg, enabled: bool, resumed_step: int = 0):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.wandb = None
        if enabled:
            self._drop_after(resumed_step)
            self.wandb = _start_wandb(Path(run_dir), cfg)

    def _drop_after(self, step: int) -> None:
        """Records past the checkpoint a run resumes from are logged again: keep one copy."""
        if self.path.exists():
            lines = self.path.read_text().splitlines(keepends=True)
            kept = [line for line in lines if _step_of(line) is not None and _step_of(line) <= step]
            if len(kept) != len(lines):
                self.path.write_text("".join(kept))

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **values}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            try:
                self.wandb.log(values, step=step)
            except Exception as e:  # a W&B hiccup must not cost a training run
                log.warning("W&B logging failed (%s); continuing without W&B", e)
                self.wandb = None
                _close_broken_wandb()

    def finish(self) -> str | None:
        """Close the W&B run; returns where it was written."""
        if self.wandb is None:
            return None
        where = self.wandb.dir
        try:
            self.wandb.finish()
        except Exception as e:
            log.warning("W&B finish failed: %s", e)
            _close_broken_wandb()
        return where


def _close_broken_wandb() -> None:
    """Close W&B's connection now (its service process died, e.g. signalled with the job), so that
    its exit hook does not print a traceback when the run ends."""
    try:
        import wandb

        wandb.teardown()
    except Exception:
        pass


def _step_of(line: str) -> int | None:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError):  # a line cut short when the job was killed
        return None


@dataclass
class Metrics:
    """``metrics.jsonl`` as records sorted by step, and what had to be left out."""

    records: list[dict] = field(default_factory=list)
    unreadable: int = 0  # lines that are not JSON objects with an integer "step"
    duplicates: int = 0  # records of a step that appears again later (the later one is kept)

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """(tokens seen, value) of every record that has a finite ``key``."""
        xs, ys = [], []
        for r in self.records:
            v = r.get(key)
            if isinstance(v, (int, float)) and math.isfinite(v) and "tokens_seen" in r:
                xs.append(r["tokens_seen"])
                ys.append(v)
        return xs, ys

    def telemetry(self) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
        """quantity -> site -> (steps, values) of every ``telemetry/<quantity>/<site>`` key logged."""
        out: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
        for r in self.records:
            for key, v in r.items():
                m = TELEMETRY_KEY.match(key)
                if m and isinstance(v, (int, float)) and math.isfinite(v):
                    steps, values = out.setdefault(m.group(1), {}).setdefault(m.group(2), ([], []))
                    steps.append(r["step"])
                    values.append(v)
        return out

    def alpha_layers(self, site: str) -> list[int]:
        """Layer indices with an ``alpha/<site>/<layer>`` series, in depth order."""
        found = {int(m.group(2)) for r in self.records for k in r if (m := ALPHA_KEY.match(k)) and m.group(1) == site}
        return sorted(found)


def read_metrics(path: Path) -> Metrics:
    """Records of ``metrics.jsonl`` by step; unreadable lines are skipped, counted and logged."""
    out = Metrics()
    if not path.is_file():
        log.warning("%s does not exist: no training curves for this run", path)
        return out
    by_step: dict[int, dict] = {}
    first_bad = None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = record["step"] if isinstance(record, dict) else None
        except (ValueError, KeyError):
            step = None
        if not isinstance(step, int):
            out.unreadable += 1
            first_bad = first_bad or number
            continue
        if step in by_step:
            out.duplicates += 1
        by_step[step] = record
    out.records = [by_step[s] for s in sorted(by_step)]
    if out.unreadable:
        log.warning("%s: skipped %d unreadable line(s), the first at line %d (a write cut short by a kill?)",
                    path, out.unreadable, first_bad)
    if out.duplicates:
        log.warning("%s: %d step(s) logged more than once; the last record of each is used", path, out.duplicates)
    return out


def _start_wandb(run_dir: Path, cfg):
    mode = cfg.logging.wandb.mode
    if mode == "disabled":
        return None
    if mode == "auto":
        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    id_file = run_dir / "wandb_id"
    try:
        import wandb
        from omegaconf import OmegaConf

        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
        return wandb.init(
            project=cfg.logging.wandb.project, entity=cfg.logging.wandb.entity,
            name=cfg.logging.wandb.name or cfg.name, id=run_id, resume="allow", mode=mode,
            dir=str(run_dir), config=OmegaConf.to_container(cfg, resolve=True),
            settings=wandb.Settings(init_timeout=90, console="off", silent=True),
        )
    except Exception as e:
        log.warning("W&B could not start in %s mode (%s); metrics go to metrics.jsonl only", mode, e)
        return None


def norm_scalars(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every norm layer's scalars (its class's ``scalars``) by name and site: α of every point-wise
    norm (``alpha/attn/<layer>``, ``alpha/ffn/<layer>``, ``alpha/final``), Derf's s alike
    (``shift/<site>``), and the embedding scalar (empty for RMSNorm):
    this rank's value of each, a 0-dim tensor on the device, NaN where its FSDP2 shard holds none
    (a one-element parameter lives on one rank of each replica). Nothing is read back or gathered
    here: the trainer's log step sends them with its other numbers (``trainer.log_stats``)."""
    params = {}
    for site, m in norm_sites(model).items():
        params.update({f"{name}/{site}": getattr(m, name) for name in m.scalars})
    if getattr(model, "embedding_scale", None) is not None:
        params["embedding_scale"] = model.embedding_scale
    values = {}
    for key, p in params.items():
        local = (p.to_local() if hasattr(p, "to_local") else p).detach().reshape(-1)
        values[key] = local[0] if local.numel() else torch.full((), float("nan"), device=local.device)
    return values


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this rank: allocated GPU memory, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class Eta:
    """Time left to ``total`` steps, from the mean step time since this process started training."""

    def __init__(self, start_step: int, total: int):
        self.start_step, self.total, self.t0 = start_step, total, time.perf_counter()

    def left(self, step: int) -> str:
        done = step - self.start_step
        if done <= 0:
            return "?"
        return format_duration((time.perf_counter() - self.t0) / done * (self.total - step))


def format_duration(seconds: float) -> str:
    """``45s``, ``3m07s`` or ``2h05m``: short enough for a progress line."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Throughput:
    """Tokens per second and MFU over the steps since the last call."""

    def __init__(self, flops_per_token: int, peak: float | None, world_size: int):
        self.flops_per_token, self.peak, self.world = flops_per_token, peak, world_size
        self.t0, self.tokens = time.perf_counter(), 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def read(self) -> dict:
        dt = time.perf_counter() - self.t0
        tps = self.tokens / dt if dt > 0 else 0.0
        mfu = tps * self.flops_per_token / (self.peak * self.world) if self.peak else None
        self.t0, self.tokens = time.perf_counter(), 0
        return {"tokens_per_s": tps, "tokens_per_s_per_device": tps / self.world, "mfu": mfu}
