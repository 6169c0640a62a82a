"""What ended a training attempt, and whether the Slurm job should run it again.

fms-dyt's exit codes (``fms_dyt.errors``): 0 done, 75 stopped on a signal after a checkpoint,
130 Ctrl-C, and for failures 1 (anything else: a rank killed, a collective timed out, a CUDA
error), 2 a configuration error, 3 a diverged run (``train.max_bad_steps`` non-finite steps in a
row), 4 a hung rank found by the watchdog (``fms_dyt.watchdog``), 5 a node that failed the
preflight check (``fms_dyt.preflight``), 6 a checkpoint that could not be written for lack of space.
Codes 2, 3 and 6 would fail the same way again: the launcher never retries them.

Each training process writes its own account of an attempt to
``<run_dir>/failures/<attempt>/rank_<r>.json`` (``<attempt>`` is ``<job id>.<restart>`` under
``slurm/launch.sh``): ``running`` when it starts, its exit code and reason when it ends. A rank
killed outright (SIGKILL, the OOM killer, a segfault, a lost node) leaves ``running`` behind.

After a failed attempt ``slurm/launch.sh`` runs ``python -m fms_dyt.failures decide``, which reads
those files and torchrun's report of its workers in the job log, names the node that failed first
and why, appends one line to ``<run_dir>/failures.jsonl`` (time, attempt, step of the newest
complete checkpoint, node, exit code, signal, reason, decision) and requeues the job without that
node (``scontrol requeue`` then ``ExcNodeList``) unless the failure is not worth retrying, the run
has failed ``FMS_DYT_MAX_FAILURES`` times already, or excluding the node leaves too few nodes.
Imports only the standard library and ``fms_dyt.errors``: it runs on the batch node, outside the training processes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from fms_dyt.errors import (EXIT_CONFIG, EXIT_DIVERGED, EXIT_ERROR, EXIT_HUNG, EXIT_NO_SPACE, EXIT_PREEMPTED,
                            EXIT_PREFLIGHT)

NOT_RETRIED = {EXIT_CONFIG: "a configuration error", EXIT_DIVERGED: "the run diverged",
               EXIT_NO_SPACE: "a checkpoint could not be written for lack of space"}
REASONS = {EXIT_ERROR: "error", EXIT_CONFIG: "config", EXIT_DIVERGED: "diverged", EXIT_HUNG: "hang",
           EXIT_PREFLIGHT: "preflight", EXIT_NO_SPACE: "no_space"}
DEFAULT_MAX_FAILURES = 3
RECORD = "failures.jsonl"
# A watchdog thread that could not run for longer than this (its ``stalled_s``): that rank was
# stopped, or its main thread held the interpreter; it, not the ranks waiting for it, is the hung one.
STALLED_S = 10.0


def node_name() -> str:
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def attempt_id() -> str:
    """This attempt's name, the same on every rank: ``FMS_DYT_ATTEMPT`` (set by slurm/launch.sh to
    ``<job id>.<restart>``), else torchrun's run id, else ``local``."""
    return os.environ.get("FMS_DYT_ATTEMPT") or os.environ.get("TORCHELASTIC_RUN_ID") or "local"


def attempt_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "failures" / attempt_id()


def write_rank_record(run_dir: str | Path, rank: int, **fields) -> Path | None:
    """This rank's account of the attempt (``rank_<r>.json``), replaced whole; never raises (a full
    disk must not hide the error being reported)."""
    try:
        folder = attempt_dir(run_dir)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"rank_{rank}.json"
        record = {"rank": rank, "node": node_name(), "pid": os.getpid(), "time": time.time(), **fields}
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)
        return path
    except OSError:
        return None


def _under_launcher() -> bool:
    return bool(os.environ.get("FMS_DYT_ATTEMPT"))


def note_start(run_dir: str | Path, rank: int) -> None:
    """Under slurm/launch.sh: this rank is running (a rank that never replaces this was killed)."""
    if _under_launcher():
        write_rank_record(run_dir, rank, status="running")


def note_exit(run_dir: str | Path, code: int, error: BaseException | None = None) -> int:
    """How this rank ends (under slurm/launch.sh), and ``code`` back. A rank leaving with an error
    after its watchdog's bound ran out was hung (e.g. stopped, then failed by its peers' exit as
    soon as it ran again): its stacks are dumped and it is recorded as hung."""
    from fms_dyt import watchdog

    dog, watchdog.current = watchdog.current, None
    if dog is not None:
        dog.stop()
        if error is not None and dog.overdue():
            dog.fire(f"the main thread failed after the watchdog's bound ran out ({type(error).__name__})", error,
                     exit_now=False)
            return code
    if _under_launcher():
        rank = int(os.environ.get("RANK", "0"))
        message = (str(error).strip() or type(error).__name__) if error is not None else ""
        reason = REASONS.get(code, "ok" if code in (0, 75, 130) else "error")
        write_rank_record(run_dir, rank, status="exited", exit_code=code, reason=reason,
                          message=message[:2000], bad_node=getattr(error, "bad_node", None),
                          bad_rank=getattr(error, "bad_rank", None))
    return code


def newest_checkpoint_step(run_dir: str | Path) -> int | None:
    root = Path(run_dir) / "checkpoints"
    steps = [int(m.group(1)) for d in (root.iterdir() if root.is_dir() else [])
             if (m := re.fullmatch(r"step_(\d+)", d.name)) and (d / "meta.json").is_file()]
    return max(steps) if steps else None


def failure_count(run_dir: str | Path) -> int:
    path = Path(run_dir) / RECORD
    if not path.is_file():
        return 0
    return sum(1 for line in path.read_text().splitlines() if line.strip())


# torchrun's summary of a failed worker ("Root Cause" / "Failures" blocks of ChildFailedError)
_FIELD = re.compile(r"^\s*(time|host|rank|exitcode|traceback)\s*:\s*(.*)$")


def torchrun_failures(log_text: str) -> list[dict]:
    """Every worker failure torchrun reported in ``log_text``: host, rank, exitcode, signal."""
    found, current = [], {}
    for line in log_text.splitlines():
        m = _FIELD.match(line)
        if not m:
            continue
        key, value = m.groups()
        if key == "time" and current:
            found.append(current)
            current = {}
        current[key] = value.strip()
    if current:
        found.append(current)
    out = []
    for f in found:
        code = re.match(r"-?\d+", f.get("exitcode", ""))
        if not code or "host" not in f:
            continue
        code = int(code.group())
        rank = re.match(r"\d+", f.get("rank", ""))
        sig = None
        if code < 0:
            try:
                sig = signal.Signals(-code).name
            except ValueError:
                sig = f"signal {-code}"
        out.append({"node": f["host"], "rank": int(rank.group()) if rank else None, "exit_code": code, "signal": sig})
    return out


def read_rank_records(folder: Path) -> list[dict]:
    records = []
    for path in sorted(folder.glob("rank_*.json")) if folder.is_dir() else []:
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return records


def diagnose(records: list[dict], torchrun: list[dict], step_rc: int) -> dict:
    """The failure of an attempt: ``{node, rank, exit_code, signal, reason, message, exclude}``;
    ``exclude`` says whether ``node`` is to blame (and may be left out of the next attempt)."""
    ended = [r for r in records if r.get("status") == "exited"]
    # A failure that would happen again decides first, wherever it happened.
    for r in sorted(ended, key=lambda r: r["time"]):
        if r.get("exit_code") in NOT_RETRIED:
            return dict(node=r["node"], rank=r["rank"], exit_code=r["exit_code"], signal=None,
                        reason=REASONS[r["exit_code"]], message=r.get("message", ""), exclude=False)
    # A worker killed by a signal: what torchrun saw on its node.
    # torchrun names the host as the machine calls itself, which need not be Slurm's node name: the
    # rank's own record (written when it started) says which node it ran on
    node_of = {r.get("rank"): r.get("node") for r in records}
    killed = [f for f in torchrun if f["signal"] and f["signal"] != "SIGTERM"]  # SIGTERM: the step's teardown
    if killed:
        f = killed[0]
        return dict(node=node_of.get(f["rank"]) or f["node"], rank=f["rank"], exit_code=f["exit_code"],
                    signal=f["signal"], reason="killed",
                    message=f"rank {f['rank']} was killed by {f['signal']}", exclude=True)
    # A rank that never said how it ended: killed with its node, or never got as far as exiting.
    silent = [r for r in records if r.get("status") == "running"]
    if silent:
        r = silent[0]
        return dict(node=r["node"], rank=r["rank"], exit_code=None, signal=None, reason="killed",
                    message=f"rank {r['rank']} (pid {r['pid']}) ended without a word: killed, or its node was lost",
                    exclude=True)
    preflight = [r for r in ended if r.get("exit_code") == EXIT_PREFLIGHT and r.get("bad_node")]
    if preflight:
        r = preflight[0]
        return dict(node=r["bad_node"], rank=r.get("bad_rank"), exit_code=EXIT_PREFLIGHT, signal=None,
                    reason="preflight", message=r.get("message", ""), exclude=True)
    hung = sorted((r for r in ended if r.get("exit_code") == EXIT_HUNG), key=lambda r: r["time"])
    if hung:
        late = sorted((r for r in hung if r.get("stalled_s", 0) > STALLED_S), key=lambda r: -r["stalled_s"])
        blamed = late[0] if late else hung[0]
        message = blamed.get("message", "")
        if late:
            message = (f"rank {blamed['rank']} on {blamed['node']} could not even run its watchdog for "
                       f"{blamed['stalled_s']:.0f} s (stopped, or stuck holding the interpreter); {message}")
        else:
            message += "; every rank's watchdog ran, so no node is to blame alone (see the stacks)"
        return dict(node=blamed["node"], rank=blamed["rank"], exit_code=EXIT_HUNG, signal=None, reason="hang",
                    message=message, exclude=bool(late))
    if ended:
        r = min((r for r in ended if r.get("exit_code")), key=lambda r: r["time"], default=None)
        if r is not None:
            return dict(node=r["node"], rank=r["rank"], exit_code=r["exit_code"], signal=None,
                        reason=REASONS.get(r["exit_code"], "error"), message=r.get("message", ""), exclude=True)
    if torchrun:
        f = torchrun[0]
        return dict(node=f["node"], rank=f["rank"], exit_code=f["exit_code"], signal=None, reason="error",
                    message=f"rank {f['rank']} exited with {f['exit_code']}", exclude=True)
    return dict(node=None, rank=None, exit_code=step_rc, signal=None, reason="error",
                message=f"the training step ended with status {step_rc} and no rank left a record", exclude=False)


def _scontrol_job(job_id: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def _hostnames(nodelist: str) -> list[str]:
    if not nodelist or nodelist == "(null)":
        return []
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True).stdout
    return out.split()


def _partition_nodes(partition: str) -> list[str]:
    nodes = []
    for p in partition.split(","):
        out = subprocess.run(["sinfo", "-h", "-N", "-p", p, "-o", "%N"], capture_output=True, text=True).stdout
        nodes += out.split()
    return sorted(set(nodes))


def say(text: str) -> None:
    """One line of the job's log, in slurm/launch.sh's format."""
    print(f"[fms-dyt slurm {time.strftime('%H:%M:%S')} {node_name()}] {text}", file=sys.stderr, flush=True)


def decide(run_dir: Path, job_id: str, restart: str, step_rc: int, log_text: str, max_failures: int) -> int:
    """Record the failed attempt and requeue the job when that is worth it; the exit code for the
    batch script (75 when requeued, the failure's own otherwise)."""
    attempt = f"{job_id}.{restart}"
    failure = diagnose(read_rank_records(run_dir / "failures" / attempt), torchrun_failures(log_text), step_rc)
    where = f"node {failure['node']}" if failure["node"] else "no node named"
    code = failure["signal"] or f"exit {failure['exit_code']}"
    previous = failure_count(run_dir)
    number = previous + 1
    say(f"attempt {attempt} failed on {where} ({code}, {failure['reason']}): {failure['message']}")
    excluded, action, why = [], "requeue", ""
    if failure["exit_code"] in NOT_RETRIED:
        action, why = "stop", f"{NOT_RETRIED[failure['exit_code']]} would fail again; fix it and submit again"
    elif number > max_failures:
        action = "stop"
        why = (f"this is failure {number} of this run and FMS_DYT_MAX_FAILURES={max_failures} "
               f"(see {run_dir / RECORD}); raise it to retry more")
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "attempt": attempt, "failure": number,
              "step": newest_checkpoint_step(run_dir), **{k: failure[k] for k in
                                                          ("node", "rank", "exit_code", "signal", "reason", "message")}}
    fields = _scontrol_job(job_id) if action == "requeue" else {}
    if action == "requeue" and failure["exclude"] and failure["node"]:
        already = _hostnames(fields.get("ExcNodeList", ""))
        candidates = [n for n in _partition_nodes(fields.get("Partition", "")) if n not in already]
        need = int(fields.get("NumNodes", "1").split("-")[0] or 1)
        if failure["node"] not in candidates:
            say(f"not excluding {failure['node']}: it is not among the nodes this job may still use")
        elif len(candidates) - 1 < need:
            say(f"not excluding {failure['node']}: partition {fields.get('Partition')} would have "
                f"{len(candidates) - 1} node(s) left for this {need}-node job")
        else:
            excluded = sorted(set(already) | {failure["node"]})
    record.update(action=action, excluded=excluded)
    try:
        with open(run_dir / RECORD, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        say(f"cannot append to {run_dir / RECORD}: {e}")
    if action == "stop":
        say(f"not requeueing job {job_id}: {why}")
        if failure["reason"] == "config" and failure["message"]:
            say(f"configuration error: {failure['message']}")
        return failure["exit_code"] if isinstance(failure["exit_code"], int) and failure["exit_code"] > 0 else EXIT_ERROR
    step = record["step"]
    say(f"requeueing job {job_id} (failure {number} of this run; FMS_DYT_MAX_FAILURES={max_failures} are "
        f"requeued) to resume from " + (f"step {step}" if step is not None else "the start")
        + (f", without node {failure['node']} (ExcNodeList={','.join(excluded)})" if excluded else ""))
    # The requeue ends this batch script within KillWait: slurm/launch.sh ignores SIGTERM from here on.
    # The list of excluded nodes can only change once the job is pending again.
    if subprocess.run(["scontrol", "requeue", job_id]).returncode != 0:
        say(f"scontrol requeue failed (job submitted with --no-requeue, or requeue disabled here): "
            f"submit the same command again with run_dir={run_dir} to resume")
        return EXIT_ERROR
    if excluded and subprocess.run(["scontrol", "update", f"JobId={job_id}",
                                    f"ExcNodeList={','.join(excluded)}"]).returncode != 0:
        say(f"could not exclude {failure['node']} from the requeued job")
    return EXIT_PREEMPTED


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fms_dyt.failures",
                                     description="Record a failed training attempt and requeue its Slurm job.")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("decide")
    d.add_argument("--run-dir", required=True, type=Path)
    d.add_argument("--job", required=True)
    d.add_argument("--restart", default="0")
    d.add_argument("--rc", type=int, required=True, help="the training step's exit status")
    d.add_argument("--log", help="the job's log file, for torchrun's report of its workers")
    d.add_argument("--log-offset", type=int, default=0, help="where this attempt's part of the log starts")
    args = parser.parse_args(argv)
    raw = os.environ.get("FMS_DYT_MAX_FAILURES", str(DEFAULT_MAX_FAILURES))
    if not re.fullmatch(r"\d+", raw):
        say(f"FMS_DYT_MAX_FAILURES={raw!r}: expected a whole number >= 0; not requeueing")
        return EXIT_ERROR
    text = ""
    if args.log:
        try:
            with open(args.log, errors="replace") as f:
                f.seek(args.log_offset)
                text = f.read()
        except OSError:
            pass
    return decide(args.run_dir, args.job, args.restart, args.rc, text, int(raw))


if __name__ == "__main__":
    sys.exit(main())
