"""Stopping a run cleanly on the signals a cluster or a user sends.

SIGTERM and SIGUSR1 (Slurm's preemption and time limit, ``timeout``, ``kill``, ``scancel``) and
SIGINT (Ctrl-C) only set a flag: the trainer finishes the current step, every rank saves a
checkpoint, and the process exits 75 (130 after Ctrl-C). A second Ctrl-C stops at once.

Under Hydra's submitit launcher (``SUBMITIT_EXECUTOR=slurm``) submitit warns with its own signal
(SIGUSR2 unless ``SUBMITIT_PREEMPT_SIGNAL`` says otherwise) and its handler would requeue the job
and exit rank 0 on the spot, leaving the other ranks in their next collective. fms-dyt takes that
signal over like SIGTERM and calls submitit's handler itself on rank 0, once every rank has
saved: submitit then records the job's timeout count, rewrites its job file and runs
``scontrol requeue``, as it would for any checkpointable job.

DataLoader workers do not act on these signals (``ignore_in_worker``): the main process decides
when to stop, and a worker that died would take the step down with it.

Ranks agree on stopping over a CPU (gloo) group, one step late: after step k each rank starts an
all-reduce of its flag in the background and reads the result of step k-1's. Nothing waits for
the GPU or for the other ranks, and every rank takes the same decision: a signal that arrives
during step k stops the run after step k+1.
"""

from __future__ import annotations

import os
import signal
import threading

import numpy as np
import torch
import torch.distributed as dist

from fms_dyt.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED

# Why a run stops; ranks agree on the largest reason any of them saw.
RUNNING, INTERRUPTED, STOPPED, REQUEUE = 0, 1, 2, 3


def submitit_signal() -> signal.Signals | None:
    """The signal submitit warns with when this process is a submitit Slurm job, else None."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        return None
    return signal.Signals["SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")]


PASSED_ON = {signal.SIGTERM, signal.SIGUSR1}


def ignore_in_worker(parent: int, worker_id: int) -> None:
    """DataLoader ``worker_init_fn`` (as ``partial(ignore_in_worker, os.getpid())``): the job's stop
    signals are for the training process ``parent``, which finishes its step before it stops.

    SIGTERM and SIGUSR1 sent to a worker are passed on to ``parent`` (a worker signalled alone
    still stops the run), except SIGTERM from ``parent`` itself, which ends the worker as torch and
    multiprocessing expect at exit. Python handlers do not see the sender, so both signals are
    blocked and a thread reads them with ``sigwaitinfo``. Ctrl-C (SIGINT) reaches the whole
    terminal's process group, the training process included, so workers ignore it, and SIGUSR2.
    """
    for s in (signal.SIGINT, signal.SIGUSR2):
        signal.signal(s, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, PASSED_ON)  # threads started later inherit the mask
    threading.Thread(target=_pass_on, args=(parent,), daemon=True, name="fms-dyt-worker-signals").start()


def _pass_on(parent: int) -> None:
    while True:
        info = signal.sigwaitinfo(PASSED_ON)
        if info.si_signo == signal.SIGTERM and info.si_pid == parent:
            os._exit(0)
        os.kill(parent, info.si_signo)


def _say(text: str) -> None:
    """Print from a signal handler (os.write is safe where print may re-enter a buffered stream)."""
    if os.environ.get("RANK", "0") == "0":
        os.write(2, f"fms-dyt: {text}\n".encode())


class StopRequest:
    """Installed at start-up; ``agreed`` is asked after every step, on every rank."""

    def __init__(self):
        self.signum = None
        self.reason = RUNNING
        self.interrupted = False
        self.requeue_signal = submitit_signal()
        # submitit's handler, called on rank 0 after the checkpoint (see the module docstring)
        self.requeue_handler = signal.getsignal(self.requeue_signal) if self.requeue_signal else None
        self.reasons = {signal.SIGINT: INTERRUPTED, signal.SIGTERM: STOPPED, signal.SIGUSR1: STOPPED}
        if self.requeue_signal:
            self.reasons[self.requeue_signal] = REQUEUE
        self.previous = {s: signal.signal(s, self._handle) for s in self.reasons}
        # The flag's buffer is host memory by design (gloo reduces into it): read as NumPy, it
        # costs no tensor read, on any device.
        self._flag = np.zeros(1, dtype=np.int64)
        self._pending = None  # the all-reduce started after the previous step

    def restore(self) -> None:
        """Put back the handlers that were there before (train() called from a script or a test)."""
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            if self.interrupted:
                raise KeyboardInterrupt  # the second Ctrl-C
            self.interrupted = True
        if self.reasons[signum] <= self.reason:
            return  # the same news again, e.g. passed on by a DataLoader worker
        self.signum = signal.Signals(signum).name
        self.reason = self.reasons[signum]
        if signum == signal.SIGINT:
            _say("Ctrl-C: finishing this step and saving a checkpoint; press Ctrl-C again to stop at once")
        else:
            _say(f"got {self.signum}: finishing this step and saving a checkpoint")

    def agreed(self, group) -> int:
        """The reason to stop (RUNNING: none), the same on every rank, one step late: the flags
        of the previous step, reduced (MAX) over ``group``, a CPU process group, while this step
        ran. This step's flag starts on its way unless the ranks have just agreed to stop."""
        decided = self.settle()
        if decided == RUNNING:
            self._flag[0] = self.reason
            self._pending = dist.all_reduce(torch.from_numpy(self._flag), op=dist.ReduceOp.MAX, group=group,
                                            async_op=True)
        return decided

    def settle(self) -> int:
        """Wait for the agreement in flight (RUNNING if none): before the process group goes."""
        if self._pending is None:
            return RUNNING
        self._pending.wait()
        self._pending = None
        return int(self._flag[0])

    def after_checkpoint(self, reason: int, rank: int) -> int:
        """Requeue through submitit where it asked (rank 0, while the other ranks wait), then the
        exit code of a stopped run."""
        error = None
        if reason == REQUEUE and rank == 0 and callable(self.requeue_handler):
            try:
                self.requeue_handler(self.requeue_signal, None)
            except SystemExit:  # submitit exits once the job is requeued; we exit with every rank below
                pass
            except Exception as e:  # e.g. timed out too often: submitit records why it did not requeue
                error = e
        dist.barrier()  # nobody leaves (and lets srun end the step) before the requeue
        if error is not None:
            raise error
        return EXIT_INTERRUPTED if reason == INTERRUPTED else EXIT_PREEMPTED
