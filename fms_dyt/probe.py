"""Short training runs of ``train.py`` as subprocesses, for ``fms_dyt.tune`` and ``fms_dyt.study``.

A probe is a name, Hydra overrides and a run directory; its command line is the one a user
would type (``python train.py <overrides> run_dir=... logging.wandb.mode=disabled``). Probes run
in sequence or ``jobs`` at a time; one whose run directory already holds its final checkpoint is
not run again, so an interrupted tune or study resumes where it stopped. A probe's result is one
number read from its ``metrics.jsonl`` (``Metric``), or the reason there is none.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, TypeVar

from omegaconf import OmegaConf

from fms_dyt.checkpoint import complete_checkpoints
from fms_dyt.errors import EXIT_ERROR as EXIT_FAILED, EXIT_INTERRUPTED, EXIT_PREEMPTED, ConfigError, refuse
from fms_dyt.metrics import read_metrics

TRAIN_PY = Path(__file__).resolve().parent.parent / "train.py"
T = TypeVar("T")


@dataclass(frozen=True)
class Metric:
    """What a probe is ranked by: the mean of the last ``last`` finite logged values of ``key``."""

    key: str = "val/loss"
    last: int = 1

    def describe(self) -> str:
        return f"{self.key}, " + ("last logged value" if self.last == 1 else f"mean of the last {self.last} logged values")


def default_last(key: str) -> int:
    """Validation losses are already averages over a fixed held-out set: the last one. Training
    losses are per-step and noisy: the mean of the last 10 records."""
    return 1 if key.startswith("val/") else 10


@dataclass
class Probe:
    name: str
    overrides: list[str]
    run_dir: Path

    @property
    def log(self) -> Path:
        return self.run_dir.parent / f"{self.run_dir.name}.log"

    @property
    def exit_record(self) -> Path:
        """``{"exit": code, "wall_s": seconds}`` of its latest run, so a resumed study still knows them."""
        return self.run_dir.parent / f"{self.run_dir.name}.exit.json"

    def command(self) -> list[str]:
        return [sys.executable, str(TRAIN_PY), *self.overrides, f"run_dir={self.run_dir}",
                "logging.wandb.mode=disabled"]


@dataclass
class Result:
    probe: Probe
    value: Optional[float]  # None: failed
    error: Optional[str] = None  # why it failed, with the log to read
    wall_s: Optional[float] = None  # of its latest run of train.py (None: unknown)

    @property
    def ok(self) -> bool:
        return self.value is not None


def finished(probe: Probe) -> bool:
    """Whether the probe's run directory holds a complete checkpoint of the final step of this
    same run (fms_dyt.resume's run-defining keys unchanged): only then is it not run again. A run
    of another configuration is run, and train.py refuses it, naming the differences."""
    from fms_dyt.config import ConfigError, load_config, schedule
    from fms_dyt.resume import differences, previous_config

    done = complete_checkpoints(probe.run_dir)
    if not done:
        return False
    try:
        cfg = load_config([*probe.overrides, f"run_dir={probe.run_dir}"])
    except ConfigError:  # train.py says what is wrong, in the probe's log
        return False
    previous = previous_config(probe.run_dir)
    step = json.loads((done[-1] / "meta.json").read_text()).get("step")
    return (step == schedule(cfg, 1)[0] and previous is not None
            and not differences(previous[1], OmegaConf.to_container(cfg, resolve=True)))


def read_metric(run_dir: Path, metric: Metric) -> tuple[Optional[float], Optional[str]]:
    """(value, None), or (None, why there is none) from ``run_dir/metrics.jsonl`` (a step logged
    twice, by a resumed run, counts once)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None, f"no {path}"
    values = [r[metric.key] for r in read_metrics(path).records if metric.key in r][-metric.last:]
    if not values:
        return None, f"no {metric.key!r} in {path} (is --metric a key train.py logs?)"
    bad = [v for v in values if not (isinstance(v, (int, float)) and math.isfinite(v))]
    if bad:
        return None, f"non-finite {metric.key} ({bad[0]}) in the last {len(values)} record(s) of {path}"
    return sum(values) / len(values), None


def probe_env(jobs: int) -> dict:
    """Several runs on one CPU: one OpenMP thread each (two per process made steps 20x slower on a
    busy 2-core machine, docs/quickstart.md); an explicit OMP_NUM_THREADS wins."""
    env = dict(os.environ)
    if jobs > 1:
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


class Stopped(Exception):
    """SIGTERM or SIGUSR1 reached the tune or study (a Slurm time limit, ``kill``): passed on to the
    runs in flight, which finish their step, save a checkpoint and exit."""

    def __init__(self, signum: int):
        super().__init__(f"got {signal.Signals(signum).name}")


def run_probes(probes: Sequence[Probe], metric: Metric, jobs: int = 1,
               echo: Callable[[str], None] = print) -> list[Result]:
    """Run every probe not finished before, ``jobs`` at a time; one Result per probe, in order.
    SIGTERM or SIGUSR1 to this process alone reaches the probes in flight too (``Stopped``)."""
    env = probe_env(jobs)
    stopping = False

    def pass_on(signum, frame):
        nonlocal stopping
        for _, proc, _, _ in running:
            if proc.poll() is None:
                proc.send_signal(signum)  # train.py takes the same signal twice (a whole group's) as once
        if not stopping:
            stopping = True
            raise Stopped(signum)

    pending = [p for p in probes if not finished(p)]
    for p in probes:
        if p not in pending:
            echo(f"{p.name}: finished before ({p.run_dir}), not run again")
    running: list[tuple[Probe, subprocess.Popen, float, object]] = []
    previous = {sig: signal.signal(sig, pass_on) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        while pending or running:
            while pending and len(running) < jobs:
                p = pending.pop(0)
                p.run_dir.parent.mkdir(parents=True, exist_ok=True)
                log = open(p.log, "w")
                echo(f"{p.name}: started, log {p.log}")
                proc = subprocess.Popen(p.command(), stdout=log, stderr=subprocess.STDOUT, env=env)
                running.append((p, proc, time.monotonic(), log))
            for entry in list(running):
                p, proc, started, log = entry
                if proc.poll() is not None:
                    log.close()
                    running.remove(entry)
                    wall_s = time.monotonic() - started
                    p.exit_record.write_text(json.dumps({"exit": proc.returncode, "wall_s": wall_s}))
                    echo(f"{p.name}: exit {proc.returncode} after {wall_s:.0f} s")
            time.sleep(0.2)
    finally:  # Ctrl-C reaches the children too: they checkpoint and stop; wait for them
        stopping = True  # from here a signal is only passed on
        for p, proc, _, log in running:
            proc.wait()
            log.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return [result_of(p, metric) for p in probes]


def result_of(p: Probe, metric: Metric) -> Result:
    """The probe's value from its run directory, or why it has none."""
    record = json.loads(p.exit_record.read_text()) if p.exit_record.is_file() else {}
    code, wall_s = record.get("exit"), record.get("wall_s")
    if code:
        return Result(p, None, f"train.py exited with {code}; log: {p.log}", wall_s)
    value, why = read_metric(p.run_dir, metric)
    return Result(p, value, None if why is None else f"{why}; log: {p.log}", wall_s)


def run_command(prog: str, work: Callable[[], T], failure: type[Exception]) -> tuple[Optional[T], int]:
    """``(work(), 0)``, or ``(None, exit code)`` after a one-line message: Ctrl-C (130; the runs in
    flight got it too and saved a checkpoint), SIGTERM/SIGUSR1 (75, likewise), a configuration
    error (2), ``failure`` (1)."""
    try:
        return work(), 0
    except KeyboardInterrupt:
        print(f"\n{prog}: stopped; run the same command again to resume", file=sys.stderr)
        return None, EXIT_INTERRUPTED
    except Stopped as e:
        print(f"{prog}: {e}: the runs in flight saved a checkpoint; run the same command again to resume",
              file=sys.stderr)
        return None, EXIT_PREEMPTED
    except ConfigError as e:
        return None, refuse(prog, e)
    except failure as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return None, EXIT_FAILED
