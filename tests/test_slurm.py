"""fms-dyt's Slurm scripts on a real Slurm: a local cluster of two emulated nodes with fake GPUs.

The tests use a cluster that is already running and never install, configure or start one:
`.ci/run` starts it (`bash .ci/slurm_cluster.sh up`, as root: it installs Slurm and munge and
writes /etc/slurm and /etc/hosts), or you do, explicitly. The unmodified `slurm/llama7b_dyt.sh`
runs a tiny model on the `sample` data across both nodes, and a second job stopped with
`scancel --signal=USR1 --batch` requeues and resumes from its checkpoint. Without a cluster they
skip and say why, unless FMS_DYT_REQUIRE_SLURM=1 (CI), where that fails.
"""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import fms_dyt.config  # noqa: F401  (registers the config schema train.yaml builds on)
from helpers import losses

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "slurm/llama7b_dyt.sh"
PARTITION, NODES = "debug", 2  # what the jobs below ask for (.ci/slurm_cluster.sh's defaults)

# A tiny CPU run inside the 7B experiment: later overrides win over the experiment's values.
TINY = [
    "model=tiny",
    "data=sample",
    "train.tokens=null",
    "train.seq_len=64",
    "train.micro_batch_size=2",
    "train.global_batch_tokens=256",  # 2 ranks x 2 sequences x 64 tokens: no accumulation
    "parallel.compile=false",
    "parallel.param_dtype=float32",
    "logging.interval=1",
    "validation.tokens=1040",  # 16 windows: the 7B run's 4M tokens exceed the sample's held-out slice
]
# how the tests submit: the options of the command, a log file outside the checkout
SBATCH = ["sbatch", "--parsable", "--nodes=2", "--gres=gpu:1", "--ntasks-per-node=1", "-p", "debug"]


# The paper's runs (Table 4): nodes of 8 GPUs per model size.
PAPER_NODES = {"7b": 64, "13b": 64, "34b": 128, "70b": 128}
RUNS = [f"llama{size}_{norm}" for size in PAPER_NODES for norm in ("dyt", "rmsnorm")]


def sbatch_options(script: Path) -> dict:
    """The '#SBATCH --key[=value]' lines of a script as {key: value or True}."""
    options = {}
    for line in script.read_text().splitlines():
        if line.startswith("#SBATCH --"):
            key, _, value = line.removeprefix("#SBATCH --").partition("=")
            options[key.strip()] = value.strip() or True
    return options


@pytest.mark.parametrize("run", RUNS)
def test_sbatch_lines_match_the_paper(run):
    script = ROOT / "slurm" / f"{run}.sh"
    options = sbatch_options(script)
    size = run.split("_")[0].removeprefix("llama")
    assert options["job-name"] == run
    assert options["nodes"] == str(PAPER_NODES[size])
    assert options["gres"] == "gpu:8"
    assert options["ntasks-per-node"] == "1"
    for flag in ("exclusive", "requeue"):
        assert options[flag] is True, flag
    assert options["open-mode"] == "append"
    assert re.fullmatch(r"\d+:\d\d:\d\d", options["time"])
    assert re.fullmatch(r"B:USR1@\d+", options["signal"])
    # the logic lives in the shared launcher; each script only names its experiment
    body = [line for line in script.read_text().splitlines() if line and not line.startswith("#")]
    assert len(body) <= 3, body
    assert f"launch.sh\" experiment={run} \"$@\"" in body[-1]
    assert (ROOT / "configs" / "experiment" / f"{run}.yaml").exists()


def test_alpha0_sweep_launcher_composes(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    overrides = ["hydra/launcher=submitit_slurm", "+hydra/slurm=alpha0",
                 "experiment=llama7b_dyt", "norm.alpha_attn=0.4"]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (1, 8, 8)
    assert launcher.additional_parameters.requeue is True
    assert launcher.max_num_timeout > 0 and launcher.signal_delay_s >= 300
    assert cfg.norm.alpha_attn == 0.4 and cfg.model.dim == 4096
    # each swept value trains in a run directory of its own, the same after a requeue
    HydraConfig.instance().set_config(cfg)
    assert cfg.run_dir == "runs/sweeps/llama7b_dyt/experiment=llama7b_dyt,norm.alpha_attn=0.4"


def cluster_problem() -> str | None:
    """Why the jobs below cannot run on this machine's Slurm, or None when they can. Only asks."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "sinfo/sbatch are not installed"
    try:
        proc = subprocess.run(["sinfo", "-h", "-N", "-p", PARTITION, "-o", "%N %T"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"sinfo does not answer: {exc}"
    if proc.returncode != 0:
        return f"sinfo fails: {proc.stderr.strip()[-500:]}"
    idle = {line.split()[0] for line in proc.stdout.splitlines() if line.split()[1:] == ["idle"]}
    if len(idle) < NODES:
        return f"partition {PARTITION!r} has {len(idle)} idle nodes, the tests need {NODES}"
    return None


@pytest.fixture(scope="module")
def slurm():
    """A running cluster (this fixture never starts one: that installs packages and writes /etc)."""
    problem = cluster_problem()
    if problem is None:
        return
    message = (f"no usable Slurm cluster: {problem}. Start one with `bash .ci/slurm_cluster.sh up` "
               "(root; installs Slurm and munge, writes /etc/slurm and /etc/hosts), then rerun")
    if os.environ.get("FMS_DYT_REQUIRE_SLURM") == "1":
        pytest.fail(f"FMS_DYT_REQUIRE_SLURM=1: {message}")
    pytest.skip(message)


def job_fields(job_id: str) -> dict:
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=True
    ).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_for(predicate, what: str, timeout: float, job_id: str, log: Path):
    """Poll predicate() until it returns something truthy; fail with the job's state and log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    subprocess.run(["scancel", job_id])
    text = log.read_text() if log.exists() else "(no log)"
    pytest.fail(f"timed out waiting for {what}; job {job_id}: {job_fields(job_id)}\n{text[-6000:]}")


FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


def finished(job_id: str):
    fields = job_fields(job_id)
    return fields if fields["JobState"] in FINAL_STATES else None


def submit(tmp_path: Path, overrides: list) -> tuple:
    log = tmp_path / "job.out"
    cmd = SBATCH + [f"--output={log}", SCRIPT] + overrides
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{shlex.join(cmd)} failed:\n{proc.stderr}"
    return proc.stdout.strip().split(";")[0], log


def logged_steps(run_dir: Path) -> list:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    # complete lines only: rank 0 may be appending while a test polls
    lines = path.read_text().split("\n")[:-1]
    return [json.loads(line)["step"] for line in lines if line.strip()]


def complete_checkpoints(run_dir: Path) -> dict:
    """step -> meta.json of every complete checkpoint."""
    ckpt = run_dir / "checkpoints"
    return {
        int(d.name.removeprefix("step_")): json.loads((d / "meta.json").read_text())
        for d in ckpt.glob("step_*")
        if (d / "meta.json").exists()
    }


def test_sbatch_accepts_all_eight_scripts(slurm):
    # the node count is the only line this 2-node cluster cannot grant
    for run in RUNS:
        proc = subprocess.run(["sbatch", "--test-only", "--nodes=2", "-p", "debug", f"slurm/{run}.sh"],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and "to start at" in proc.stderr, (run, proc.stderr)


# Six steps with a checkpoint every two: the uninterrupted run, and the runs that fail (issue 22).
RUN = TINY + ["train.max_steps=6", "checkpoint.interval=2", "logging.wandb.mode=disabled"]


@pytest.fixture(scope="module")
def uninterrupted(slurm, tmp_path_factory):
    """``(job id, log, run_dir, fields)`` of RUN on both nodes, not interrupted; shared: the
    failure tests compare their losses with its."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    job_id, log = submit(tmp, RUN + [f"run_dir={tmp / 'run'}"])
    fields = wait_for(lambda: finished(job_id), "the job to finish", 240, job_id, log)
    return job_id, log, tmp / "run", fields


def test_two_node_job_completes(uninterrupted):
    job_id, log, run_dir, fields = uninterrupted
    text = log.read_text()
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", text[-6000:]
    # one torchrun per emulated node, both in the same rendezvous
    assert "node1] torchrun: node 0/2, 1 workers" in text, text[-6000:]
    assert "node2] torchrun: node 1/2, 1 workers" in text, text[-6000:]
    assert fields["Restarts"] == "0"
    assert logged_steps(run_dir) == [1, 2, 3, 4, 5, 6]
    checkpoints = complete_checkpoints(run_dir)
    assert 6 in checkpoints, sorted(checkpoints)
    assert checkpoints[6]["world_size"] == 2
    assert checkpoints[6]["step"] == 6


def test_usr1_checkpoints_requeues_and_resumes(slurm, tmp_path):
    run_dir = tmp_path / "run"
    max_steps = 12
    # no periodic checkpoint before the end: the one resumed from is the one the signal caused
    overrides = TINY + [f"train.max_steps={max_steps}", "checkpoint.interval=1000",
                        "logging.wandb.mode=offline", f"run_dir={run_dir}"]
    job_id, log = submit(tmp_path, overrides)
    wait_for(lambda: len(logged_steps(run_dir)) >= 2, "the first steps", 240, job_id, log)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)

    # the job checkpoints, requeues itself, and Slurm holds it: let it start again now
    def requeued():
        fields = job_fields(job_id)
        return fields["Restarts"] == "1" and fields["JobState"] == "PENDING"

    wait_for(requeued, "the requeue", 180, job_id, log)
    stopped_at = sorted(complete_checkpoints(run_dir))
    assert len(stopped_at) == 1 and 2 <= stopped_at[0] < max_steps, stopped_at
    stop_step = stopped_at[0]
    assert max(logged_steps(run_dir)) == stop_step
    wandb_id = (run_dir / "wandb_id").read_text()
    # slurmd refuses a start within the second its old credential was revoked ("Job credential
    # revoked"), which is why Slurm holds requeued jobs; two seconds are enough
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)

    fields = wait_for(lambda: finished(job_id), "the requeued job to finish", 240, job_id, log)
    text = log.read_text()
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", text[-6000:]
    assert fields["Restarts"] == "1"
    assert "got SIGUSR1" in text and "requeueing job" in text, text[-6000:]
    assert "restart 1 on" in text, text[-6000:]
    # the second run went on from the checkpoint: every step logged exactly once, none lost
    assert logged_steps(run_dir) == list(range(1, max_steps + 1))
    assert max_steps in complete_checkpoints(run_dir)
    assert (run_dir / "wandb_id").read_text() == wandb_id


def test_alpha0_sweep_runs_on_slurm(slurm, tmp_path):
    sweep = tmp_path / "sweep"
    fixed = ["run_dir", "train.max_steps", "logging.wandb.mode", *(o.split("=")[0] for o in TINY)]
    # each job: one CPU task on each of the two nodes, ranks from submitit's Slurm environment;
    # the time limit must exceed signal_delay_s (600 s)
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=submitit_slurm",
           "+hydra/slurm=alpha0", "norm.alpha_attn=0.4,0.8", *TINY, "train.max_steps=2",
           "logging.wandb.mode=disabled", "hydra.launcher.nodes=2", "hydra.launcher.tasks_per_node=1",
           "hydra.launcher.gpus_per_node=1", "hydra.launcher.cpus_per_task=1",
           "hydra.launcher.timeout_min=30", f"hydra.sweep.dir={sweep}",
           # the fixed keys out of the run directories' names, which must stay under 255 bytes
           f"hydra.job.config.override_dirname.exclude_keys=[{','.join(fixed)}]"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for alpha in (0.4, 0.8):
        run_dirs = [d for d in sweep.iterdir() if d.name == f"norm.alpha_attn={alpha}"]
        assert len(run_dirs) == 1, sorted(p.name for p in sweep.iterdir())
        assert logged_steps(run_dirs[0]) == [1, 2]
        assert complete_checkpoints(run_dirs[0])[2]["world_size"] == 2
        assert OmegaConf.load(run_dirs[0] / "config.yaml").norm.alpha_attn == alpha


# ---- issue 22: failures nobody warned about -----------------------------------------------------
# A trainer killed on the second node requeues the job, which resumes and matches an uninterrupted
# run; a stopped trainer is found by the watchdog, every rank's stacks are in the run directory and
# the requeued job finishes; a configuration error fails once; FMS_DYT_MAX_FAILURES ends the retries.

STEPS = 6  # RUN's
FAILURES_RECORD = "failures.jsonl"  # fms_dyt.failures.RECORD


def trainer_pid(job_id: str, node: str) -> int | None:
    """The training process (torchrun's child, not a DataLoader worker) of ``job_id`` on ``node``."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = dict(kv.split("=", 1) for kv in (proc / "environ").read_text().split("\0") if "=" in kv)
            cmd = (proc / "cmdline").read_text().split("\0")
            parent = (Path("/proc") / (proc / "stat").read_text().rsplit(")", 1)[1].split()[1] / "cmdline").read_text()
        except (OSError, IndexError):
            continue
        if (env.get("SLURM_JOB_ID") == job_id and env.get("SLURMD_NODENAME") == node
                and any(c.endswith("train.py") for c in cmd) and "torch.distributed.run" in parent):
            return int(proc.name)
    return None


def requeue_now(job_id: str, restarts: int, log: Path) -> None:
    """Wait until the job is pending after its requeue, then let it start without Slurm's hold."""
    def pending():
        fields = job_fields(job_id)
        return fields["Restarts"] == str(restarts) and fields["JobState"] == "PENDING"

    wait_for(pending, f"requeue {restarts}", 180, job_id, log)
    time.sleep(2)  # slurmd refuses a start within the second its old credential was revoked
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)


def records(run_dir: Path) -> list[dict]:
    path = run_dir / FAILURES_RECORD
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def reference(uninterrupted):
    """Losses of the uninterrupted run, on the same two nodes."""
    job_id, log, run_dir, fields = uninterrupted
    assert fields["JobState"] == "COMPLETED", log.read_text()[-6000:]
    assert sorted(losses(run_dir)) == list(range(1, STEPS + 1))
    return losses(run_dir)


def test_sigkill_on_the_second_node_requeues_resumes_and_matches(slurm, reference, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    monkeypatch.setenv("FMS_DYT_MAX_FAILURES", "1")
    job_id, log = submit(tmp_path, RUN + [f"run_dir={run_dir}"])
    wait_for(lambda: 3 in losses(run_dir), "the checkpoint of step 2 and a step after it", 300, job_id, log)
    pid = wait_for(lambda: trainer_pid(job_id, "node2"), "the trainer on node2", 30, job_id, log)
    os.kill(pid, signal.SIGKILL)
    killed_after = max(losses(run_dir))
    requeue_now(job_id, 1, log)
    fields = wait_for(lambda: finished(job_id), "the requeued job to finish", 300, job_id, log)
    text = log.read_text()
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", text[-6000:]
    [record] = records(run_dir)
    assert record["node"] == "node2" and record["signal"] == "SIGKILL" and record["action"] == "requeue", record
    assert 2 <= record["step"] <= killed_after, record
    assert "failed on node node2 (SIGKILL, killed)" in text, text[-6000:]
    # two nodes, a two-node job: leaving node2 out would leave too few, and the log says so
    assert "not excluding node2: partition debug would have 1 node(s) left for this 2-node job" in text
    step = record["step"]
    resumed = f"resumed from {run_dir / 'checkpoints' / f'step_{step}'}"
    assert resumed in text, text[-6000:]
    after = {s: v for s, v in losses(run_dir).items() if s > record["step"]}
    assert after and after == {s: reference[s] for s in after}


def test_sigstop_is_found_by_the_watchdog_and_every_rank_dumps_its_stacks(slurm, tmp_path):
    run_dir = tmp_path / "run"
    bound = 20  # seconds without a step; the process group's own timeout is longer
    # no checkpoint before the end: the stop never lands in a save, whose bound is watchdog.startup_s
    job_id, log = submit(tmp_path, RUN + [f"run_dir={run_dir}", f"watchdog.min_s={bound}", "parallel.timeout_s=100",
                                          "checkpoint.interval=100"])
    wait_for(lambda: 3 in losses(run_dir), "step 3", 300, job_id, log)
    pid = wait_for(lambda: trainer_pid(job_id, "node2"), "the trainer on node2", 30, job_id, log)
    os.kill(pid, signal.SIGSTOP)
    stopped, stopped_at = time.monotonic(), time.time()
    try:
        requeue_now(job_id, 1, log)
    finally:
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGCONT)
    assert time.monotonic() - stopped < 120  # failed, recorded and requeued
    attempt = run_dir / "failures" / f"{job_id}.0"
    dumps = sorted(p.name for p in attempt.glob("stacks_rank_*.txt"))
    assert dumps == ["stacks_rank_0.txt", "stacks_rank_1.txt"], (dumps, log.read_text()[-6000:])
    for name in dumps:
        text = (attempt / name).read_text()
        assert "fms-dyt watchdog" in text and 'File "' in text, text[:3000]
    # the rank on node1, waiting for the stopped one, was ended by its watchdog's bound, long before
    # the process group's timeout (100 s) would have; torchrun numbers the ranks in rendezvous
    # order, so node1's is rank 0 or 1
    ranks = {r["node"]: r for r in map(json.loads, map(Path.read_text, attempt.glob("rank_*.json")))}
    node1 = ranks["node1"]
    assert node1["exit_code"] == 4 and f"(bound {bound} s: watchdog.*)" in node1["message"], ranks
    assert node1["time"] - stopped_at < 60, ranks
    [record] = records(run_dir)
    # the stopped rank is the one to blame: its own watchdog could not run while it was stopped
    assert record["reason"] == "hang" and record["node"] == "node2" and record["action"] == "requeue", record
    fields = wait_for(lambda: finished(job_id), "the requeued job to finish", 300, job_id, log)
    assert fields["JobState"] == "COMPLETED", log.read_text()[-6000:]
    assert sorted(losses(run_dir)) == list(range(1, STEPS + 1))


def test_a_config_error_is_not_requeued_and_the_log_ends_with_the_key(slurm, tmp_path):
    run_dir = tmp_path / "run"
    job_id, log = submit(tmp_path, RUN + [f"run_dir={run_dir}", "optim.lr=-1"])
    fields = wait_for(lambda: finished(job_id), "the job to fail", 240, job_id, log)
    text = log.read_text()
    assert fields["JobState"] == "FAILED" and fields["Restarts"] == "0", text[-6000:]
    last = "\n".join(text.strip().splitlines()[-3:])
    assert "optim.lr=-1" in last and "not requeueing" in text and "Traceback" not in last, text[-6000:]
    [record] = records(run_dir)
    assert record["reason"] == "config" and record["exit_code"] == 2 and record["action"] == "stop", record


def test_max_failures_stops_the_requeues_and_says_why(slurm, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    monkeypatch.setenv("FMS_DYT_MAX_FAILURES", "1")
    job_id, log = submit(tmp_path, RUN + [f"run_dir={run_dir}"])
    for attempt in (0, 1):
        def first_step():
            ranks = run_dir / "failures" / f"{job_id}.{attempt}"
            return len(list(ranks.glob("rank_*.json"))) == 2 and trainer_pid(job_id, "node2")

        pid = wait_for(first_step, f"attempt {attempt}'s trainers", 300, job_id, log)
        os.kill(pid, signal.SIGKILL)
        if attempt == 0:
            requeue_now(job_id, 1, log)
    fields = wait_for(lambda: finished(job_id), "the job to fail", 240, job_id, log)
    text = log.read_text()
    assert fields["JobState"] == "FAILED" and fields["Restarts"] == "1", text[-6000:]
    assert [r["action"] for r in records(run_dir)] == ["requeue", "stop"]
    assert "not requeueing job" in text and "this is failure 2 of this run and FMS_DYT_MAX_FAILURES=1" in text, text[-6000:]


def test_a_one_node_job_is_requeued_without_the_node_that_failed(slurm, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    monkeypatch.setenv("FMS_DYT_NPROC_PER_NODE", "1")
    log = tmp_path / "job.out"
    # one node of the two: the other is left for the requeued job
    cmd = SBATCH + ["--nodes=1", f"--output={log}", SCRIPT] + RUN + [f"run_dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip().split(";")[0]
    wait_for(lambda: 1 in losses(run_dir), "the first step", 300, job_id, log)
    first = job_fields(job_id)["NodeList"]
    pid = wait_for(lambda: trainer_pid(job_id, first), f"the trainer on {first}", 30, job_id, log)
    os.kill(pid, signal.SIGKILL)
    requeue_now(job_id, 1, log)
    assert job_fields(job_id)["ExcNodeList"] == first
    fields = wait_for(lambda: finished(job_id), "the requeued job to finish", 300, job_id, log)
    text = log.read_text()
    assert fields["JobState"] == "COMPLETED" and fields["NodeList"] not in ("", first), text[-6000:]
    [record] = records(run_dir)
    assert record["node"] == first and record["excluded"] == [first], record
    assert f"without node {first} (ExcNodeList={first})" in text, text[-6000:]
    assert sorted(losses(run_dir)) == list(range(1, STEPS + 1))
