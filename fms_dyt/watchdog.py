"""A watchdog on the training loop: a rank that finishes no step for too long dumps every thread's
Python stack to the run directory and exits 4, so that a hung job ends (and ``slurm/launch.sh``
requeues it) in minutes instead of at its time limit.

The bound (``watchdog.*`` in the config): until the first step of this start has finished, and
in an iteration that saves a checkpoint, ``watchdog.startup_s`` (null: ``parallel.init_timeout_s``:
rendezvous, loading, compiling, writing); otherwise ``max(watchdog.step_factor x the median step
time, watchdog.min_s)``. ``min_s`` covers the other iterations that take longer than a step
(validation, telemetry); its default, 240 s, is below ``parallel.timeout_s``'s 300 s so that the
stacks are dumped before a collective's timeout ends the process (NCCL aborts it). That timeout
ends a collective that waits too long; the watchdog also catches what no collective sees: a rank
stuck on I/O or in a deadlock of its own, and a process stopped outright.

"A step finished" is the host's loop iteration. On a GPU the host runs ahead of the device and
most steps never wait for it, so a step "finishes" on the host before the GPU has run it. A hang
is still seen: the host can only run ahead by as much as the device's queue and the caching
allocator allow, and every step's collectives (FSDP's all-gathers, the gradient norm's
all-reduce, the host group's stop agreement on the CPU) wait for the other ranks, so a rank or GPU
that stops makes every host loop stop within a step or two; the bound then runs out.

Stacks go to ``<run_dir>/failures/<attempt>/stacks_rank_<r>.txt`` (``fms_dyt.failures``). A rank
that was stopped (SIGSTOP) dumps its own as soon as it runs again: Slurm sends SIGCONT before it
ends a job step. Its report then says how long its own watchdog thread could not run
(``stalled_s``), which is how ``fms_dyt.failures`` tells the hung rank from the ones waiting for it.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import statistics
import sys
import threading
import time
import traceback
from collections import deque

from fms_dyt.errors import EXIT_HUNG
from fms_dyt.failures import attempt_dir, node_name, write_rank_record

log = logging.getLogger("fms_dyt")
current: "Watchdog | None" = None  # this process's, for fms_dyt.failures.note_exit
REPORT_WAIT_S = 30.0  # how long a second ``fire`` waits for the first's report (a file system can hang)


class Watchdog:
    """Started once the process group is up; ``step_done`` after every loop iteration (a clock
    read and an append: nothing that waits)."""

    def __init__(self, run_dir: str, rank: int, step_factor: float, min_s: float, startup_s: float):
        self.run_dir, self.rank = run_dir, rank
        self.step_factor, self.min_s, self.startup_s = step_factor, min_s, startup_s
        self.times: deque[float] = deque(maxlen=101)  # recent iteration times, for the median
        self.last = time.monotonic()
        self.steps = 0
        self.step = None  # the trainer's step number, for the report
        self.slow = False  # this iteration saves a checkpoint: the start-up bound applies
        self.poll_s = max(0.2, min(5.0, min(min_s, startup_s) / 10))
        self.last_poll = self.last
        self.stalled_s = 0.0  # the longest time this thread could not run
        self._fired = threading.Lock()
        self._reported = threading.Event()  # the stacks and the record of the first ``fire`` are written
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fms-dyt-watchdog", daemon=True)

    @classmethod
    def for_run(cls, cfg, run_dir: str, rank: int) -> "Watchdog | None":
        w = cfg.watchdog
        if not w.enabled:
            return None
        startup = w.startup_s if w.startup_s is not None else cfg.parallel.init_timeout_s
        global current
        dog = current = cls(run_dir, rank, w.step_factor, w.min_s, startup)
        dog._thread.start()
        return dog

    def step_done(self, step: int) -> None:
        now = time.monotonic()
        if self.steps:  # the first iteration of a start includes loading and compiling
            self.times.append(now - self.last)
        self.last, self.step, self.slow = now, step, False
        self.steps += 1

    def saving(self) -> None:
        """This iteration writes a checkpoint, which may take longer than ``min_s`` on a slow file
        system: until the next ``step_done`` the bound is ``startup_s``."""
        self.slow = True

    def bound(self) -> float:
        if not self.steps or self.slow:
            return self.startup_s
        median = statistics.median(self.times) if self.times else 0.0
        return max(self.step_factor * median, self.min_s)

    def stop(self) -> None:
        """End the thread (``current`` stays, for ``fms_dyt.failures.note_exit``)."""
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            if self._stop.is_set():
                return
            now = time.monotonic()
            self.stalled_s = max(self.stalled_s, now - self.last_poll - self.poll_s)
            self.last_poll = now
            waited = now - self.last
            if waited > self.bound() and not self._stop.is_set():
                self.fire(f"no step finished for {waited:.0f} s (bound {self.bound():.0f} s: watchdog.*)")

    def overdue(self) -> bool:
        """The bound ran out (asked on the way out of an exception: a rank that was stopped, then
        got its peers' errors as soon as it ran again, is a hung rank all the same)."""
        now = time.monotonic()
        self.stalled_s = max(self.stalled_s, now - self.last_poll - self.poll_s)
        return now - self.last > self.bound()

    def fire(self, why: str, error: BaseException | None = None, exit_now: bool = True) -> None:
        """Dump every thread's stack, record the hang, and (``exit_now``) end the process with 4."""
        if not self._fired.acquire(blocking=False):
            # another thread is writing this rank's report: the process must not end before it has
            # (a main thread leaving as its watchdog fires would leave an empty stacks file behind)
            self._reported.wait(REPORT_WAIT_S)
            return
        try:
            self._report(why, error)
        finally:
            self._reported.set()
        if exit_now:
            os._exit(EXIT_HUNG)  # the main thread is stuck: nothing else would end the process

    def _report(self, why: str, error: BaseException | None) -> None:
        """The stacks file, the rank's record and a line on stderr."""
        folder = attempt_dir(self.run_dir)
        path = folder / f"stacks_rank_{self.rank}.txt"
        message = (f"rank {self.rank} on {node_name()} hung after step {self.step or 0}: {why}; "
                   f"stacks of every thread in {path}")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with open(path, "w") as f:
                f.write(f"fms-dyt watchdog: {message}\n\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
                if error is not None:
                    f.write("\nthe exception the main thread was leaving with:\n")
                    f.write("".join(traceback.format_exception(error)))
        except OSError as e:
            message += f" (could not write them: {e})"
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        write_rank_record(self.run_dir, self.rank, status="exited", exit_code=EXIT_HUNG, reason="hang",
                          message=message, step=self.step, stalled_s=round(self.stalled_s, 1))
        os.write(2, f"fms-dyt: {message}\n".encode())
