"""A lean step: between log steps a rank reads nothing back from the device and issues no
collective but FSDP's, the gradient norm's one reduction and the stop agreement on the CPU group;
a log step adds one bookkeeping collective. Counted with fms_dyt.audit.StepAudit on 2 gloo ranks
under torchrun, gradient accumulation 4, DyT, validation and telemetry on."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from fms_dyt.trainer import train_step

ROOT = Path(__file__).resolve().parents[1]
HOST_GROUP = "host_bookkeeping"  # the trainer's gloo group: stop agreement, log steps' gather
STEPS, LOG, EVAL = 8, 2, 4  # log steps 2, 4, 6, 8; validation and telemetry at 4 and 8
RUN = ["experiment=quickstart", "model.n_layers=2", "train.seq_len=32", "train.micro_batch_size=2",
       "train.global_batch_tokens=512", f"train.max_steps={STEPS}", "data.num_workers=0", f"logging.interval={LOG}",
       "logging.console_interval=100", f"validation.interval={EVAL}", "validation.tokens=132",
       f"logging.telemetry_interval={EVAL}", "checkpoint.interval=100", "logging.wandb.mode=disabled"]

# Each rank trains under StepAudit and writes what every step issued: the counts between two
# calls of lr_at (the top of the loop) are one step's; [0] is start-up, [-1] the last step and exit.
WORKER = """
import json, os, sys
import torch
import fms_dyt.trainer as trainer
from fms_dyt.audit import StepAudit
from fms_dyt.config import load_config

out = sys.argv[1]
torch.set_num_threads(1)
audit, steps, mesh_groups = StepAudit(), [], {}

def snapshot():
    steps.append({"host_reads": audit.total_host_reads(),
                  "collectives": [[kind, group, n] for (kind, group), n in audit.collectives.items()]})
    audit.reset()

lr_at, build_mesh = trainer.lr_at, trainer.build_mesh
def step_begins(*args):
    snapshot()
    return lr_at(*args)
def mesh_of_the_run(*args):
    mesh = build_mesh(*args)
    mesh_groups.update({name: mesh.get_group(name).group_desc for name in mesh.mesh_dim_names})
    return mesh
trainer.lr_at, trainer.build_mesh = step_begins, mesh_of_the_run
with audit:
    code = trainer.train(load_config(sys.argv[2:]))
snapshot()
with open(f"{out}/rank{os.environ['RANK']}.json", "w") as f:
    json.dump({"code": code, "steps": steps, "mesh_groups": mesh_groups}, f)
"""


def _train_two_ranks(tmp_path) -> list[dict]:
    (tmp_path / "worker.py").write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(tmp_path / "worker.py"), str(tmp_path), *RUN, f"run_dir={tmp_path / 'run'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def extra_collectives(collectives, mesh_groups: dict) -> list:
    """A step's collectives other than FSDP's (all-gathers and reduce-scatters on the mesh's
    groups, all-reduces across replicas), the gradient norm's one all-reduce on the shard group and
    the stop agreement's one all-reduce on the CPU group; each is allowed once."""
    *replicate, shard = mesh_groups.values()
    allowed = {("allreduce", shard): 1, ("allreduce", HOST_GROUP): 1}
    extra = []
    for kind, group, n in collectives:
        fsdp = group in mesh_groups.values() and kind in ("allgather", "reduce_scatter")
        if fsdp or (kind == "allreduce" and group in replicate):
            continue
        n -= allowed.get((kind, group), 0)
        if n:
            extra.append((kind, group, n))
    return extra


def test_non_log_steps_read_nothing_and_log_steps_add_one_collective(tmp_path):
    ranks = _train_two_ranks(tmp_path)
    for rank, report in enumerate(ranks):
        assert report["code"] == 0
        steps, groups = report["steps"], report["mesh_groups"]
        assert len(steps) == STEPS + 1, len(steps)
        for step in range(2, STEPS):
            counted = steps[step]
            extra = extra_collectives(counted["collectives"], groups)
            if step % LOG:  # not a log step
                assert counted["host_reads"] == 0, (rank, step, counted)
                assert extra == [], (rank, step, counted)
                # the grad norm's reduction (issued inside DTensor, seen by the audit) and the agreement
                once = {(kind, group) for kind, group, n in counted["collectives"] if n == 1}
                assert {("allreduce", list(groups.values())[-1]), ("allreduce", HOST_GROUP)} <= once, counted
                continue
            # the log step's gather; validation's all-reduce of its sums when it is due
            allowed = [("gather", HOST_GROUP, 1)]
            if step % EVAL == 0:
                allowed.append(("allreduce", "default_pg", 1))
            assert sorted(extra) == sorted(allowed), (rank, step, counted)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6, 8]
    assert all(r["skipped_updates"] == 0 and r["alpha/attn/1"] > 0 for r in records)
    assert [r["step"] for r in records if "val/loss" in r] == [4, 8]


def test_a_skipped_step_leaves_adamw_exactly_as_it_was():
    # fused AdamW's found_inf: no change to the weights, the moments or the step count
    from fms_dyt.config import load_config
    from fms_dyt.optim import build_optimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Linear(16, 50))
    optimizer = build_optimizer(model, load_config(["model=tiny"]).optim)
    tokens = torch.randint(0, 50, (2, 9))
    good = iter([(tokens[:, :-1], tokens[:, 1:])] * 4)
    assert bool(train_step(model, optimizer, good, 2, 1.0, torch.device("cpu")).updated)
    before = ({k: v.clone() for k, v in model.state_dict().items()},
              {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()})
    row = tokens[0, 0]
    with torch.no_grad():
        model[0].weight[row] = float("nan")  # the loss and the gradients go NaN
    result = train_step(model, optimizer, iter([(tokens[:, :-1], tokens[:, 1:])] * 2), 2, 1.0, torch.device("cpu"))
    assert not bool(result.updated) and torch.isnan(result.grad_norm)
    with torch.no_grad():
        model[0].weight[row] = before[0]["0.weight"][row]
    assert all(torch.equal(v, before[0][k]) for k, v in model.state_dict().items())
    for p, state in optimizer.state.items():
        assert all(torch.equal(v, before[1][id(p)][k]) for k, v in state.items())
        assert state["step"].item() == 1
