"""fms_dyt.parallel and the trainer's step at scale: backend choice, FSDP layout and materialisation
on a fake process group; gradient accumulation memory and global data counters on 2 gloo ranks."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor.debug import CommDebugMode
from torch.testing._internal.distributed.fake_pg import FakeStore

from fms_dyt.config import load_config, model_args, norm_args
from fms_dyt.model import Transformer
from fms_dyt.optim import build_optimizer
from fms_dyt.audit import StepAudit
from fms_dyt.parallel import apply_parallelism, materialize, mesh_layout, process_group_backend
from fms_dyt.trainer import train, train_step

SEQ, MICRO, ACCUM = 16, 2, 4
TINY = ["model=tiny", "model.n_layers=2", "norm=dyt", "parallel.param_dtype=float32", f"train.seq_len={SEQ}",
        f"train.micro_batch_size={MICRO}", "logging.wandb.mode=disabled"]


def _model(cfg, device="meta"):
    with torch.device(device):
        return Transformer(model_args(cfg), norm_args(cfg))


def _mesh(world, replicas=1):
    """The trainer's mesh: full sharding (1-D) with one replica, else (replicas, world / replicas)."""
    shape, names = mesh_layout("full" if replicas == 1 else "hybrid", world, world, replicas)
    return init_device_mesh("cpu", shape, mesh_dim_names=names)


def test_process_group_backend_gives_async_checkpoints_a_cpu_backend_on_gpus():
    assert process_group_backend(torch.device("cuda", 3)) == "cpu:gloo,cuda:nccl"
    assert process_group_backend(torch.device("cpu")) == "gloo"


# ---- one rank of a 2-rank world, on a fake process group (no communication) ---------------------

@pytest.fixture
def fake_world_of_two():
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    yield _mesh(2)
    dist.destroy_process_group()


ONE_PROCESS_GROUP = """
import torch, torch.distributed as dist
from fms_dyt.parallel import init_distributed
init_distributed("cpu")
t = torch.ones(1)
dist.all_reduce(t)
store = dist.distributed_c10d._get_default_store()
print(type(getattr(store, "underlying_store", store)).__name__, t.item())
dist.destroy_process_group()  # as the trainer ends: a live gloo group can abort the exit
"""


def test_one_process_runs_started_together_share_no_port():
    """``python train.py`` twice at once (tune's probes): each group lives in an in-memory store;
    with a TCP port picked as "free" before listening, two runs took the same one (EADDRINUSE)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    procs = [subprocess.Popen([sys.executable, "-c", ONE_PROCESS_GROUP], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and out.split() == ["HashStore", "1.0"], out + err[-2000:]


def test_layout_embedding_and_head_units_names_unchanged(fake_world_of_two):
    cfg = load_config(TINY)
    model = _model(cfg)
    names = [n for n, _ in model.named_parameters()]
    apply_parallelism(model, cfg.parallel, fake_world_of_two)
    assert [n for n, _ in model.named_parameters()] == names  # checkpoints and export rely on them
    assert isinstance(model.tok_embeddings, FSDPModule)
    head = fully_shard.state(model.norm)
    assert fully_shard.state(model.output) is head  # one unit for the final norm and the output head
    head_params = {id(fp.sharded_param) for fp in head._fsdp_param_group.fsdp_params}
    assert head_params == {id(p) for p in [*model.norm.parameters(), *model.output.parameters()]}
    assert head._fsdp_param_group.post_forward_mesh_info is None  # not resharded after forward
    root = {id(fp.sharded_param) for fp in fully_shard.state(model)._fsdp_param_group.fsdp_params}
    assert root == {id(model.embedding_scale)}  # the root unit holds only what no other unit does


def test_full_sharding_is_1d_and_hybrid_2d_with_the_same_dimension_names():
    assert mesh_layout("full", 1024, 8, None) == ((1024,), ("shard",))
    assert mesh_layout("hybrid", 1024, 8, None) == ((128, 8), ("replicate", "shard"))  # one replica a node
    assert mesh_layout("hybrid", 1024, 8, 4) == ((4, 256), ("replicate", "shard"))
    assert mesh_layout("none", 1024, 8, None) == ((1024, 1), ("replicate", "shard"))


def test_full_sharding_takes_fsdps_plain_path_and_skips_the_embeddings_gather_in_backward(fake_world_of_two):
    from torch.distributed.fsdp._fully_shard._fsdp_common import FSDPMeshInfo, HSDPMeshInfo

    cfg = load_config(TINY)
    model = _model(cfg)
    apply_parallelism(model, cfg.parallel, fake_world_of_two)
    materialize(model, torch.device("cpu"), seed=0)
    mesh_info = fully_shard.state(model.layers[0])._fsdp_param_group.mesh_info
    assert type(mesh_info) is FSDPMeshInfo and not isinstance(mesh_info, HSDPMeshInfo)  # no replicate group of one
    tokens = torch.zeros(MICRO, SEQ, dtype=torch.long)

    def gathered_in_backward() -> tuple[int, int]:
        loss = model(tokens).float().mean()
        with StepAudit() as audit:
            loss.backward()
        return audit.collectives[("allgather", "default_pg")], audit.collective_bytes[("allgather", "default_pg")]
    count, size = gathered_in_backward()
    assert count == len(model.layers)  # each block again (resharded after forward); not the embedding, not the head
    model.tok_embeddings.set_unshard_in_backward(True)  # what FSDP2 does by default
    count_default, size_default = gathered_in_backward()
    assert count_default == count + 1
    assert size_default - size == model.tok_embeddings.weight.numel() * 4  # the whole fp32 table


def test_compiled_blocks_fail_on_a_graph_break_instead_of_slowing_down(fake_world_of_two, monkeypatch):
    cfg = load_config([*TINY, "parallel.compile=true", "parallel.activation_checkpointing=selective"])
    model = _model(cfg)
    ffn = type(model.layers[0].feed_forward)
    plain_forward = ffn.forward

    def forward_with_a_break(self, x):
        torch._dynamo.graph_break()
        return plain_forward(self, x)
    monkeypatch.setattr(ffn, "forward", forward_with_a_break)
    apply_parallelism(model, cfg.parallel, fake_world_of_two)
    materialize(model, torch.device("cpu"), seed=0)
    with pytest.raises(torch._dynamo.exc.Unsupported, match="graph_break"):
        model(torch.zeros(MICRO, SEQ, dtype=torch.long))


def test_materialize_fills_local_shards_without_collectives(fake_world_of_two):
    cfg = load_config(TINY)
    model = _model(cfg)
    apply_parallelism(model, cfg.parallel, fake_world_of_two)
    with CommDebugMode() as comm:
        materialize(model, torch.device("cpu"), seed=0)
    assert comm.get_total_counts() == 0, comm.get_comm_counts()
    reference = dict(_model(cfg, "cpu").named_parameters())  # single process, seed 0
    for name, p in model.named_parameters():  # rank 0 holds the first chunk along dim 0
        assert torch.equal(p.to_local(), reference[name].detach().chunk(2, dim=0)[0]), name


@pytest.mark.parametrize("norm", ["rmsnorm", "dyt"])
def test_train_step_runs_on_fake_tensors_without_reading_them(fake_world_of_two, norm):
    # What the full-size simulator relies on: check_finite=False never asks a tensor for its value,
    # through the trainer's own loss and the DyT op.
    cfg = load_config([*TINY, f"norm={norm}"])
    model = _model(cfg)
    apply_parallelism(model, cfg.parallel, fake_world_of_two)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device="cpu")
        model.init_buffers("cpu")
        optimizer = build_optimizer(model, cfg.optim)
        tokens = torch.zeros(MICRO, SEQ, dtype=torch.long)
        result = train_step(model, optimizer, iter([(tokens, tokens)] * ACCUM), ACCUM, 1.0, torch.device("cpu"),
                            check_finite=False)
    assert isinstance(result.loss, FakeTensor) and isinstance(result.grad_norm, FakeTensor)
    assert result.updated and all(optimizer.state[p] for p in model.parameters())  # AdamW stepped


# ---- 2 gloo ranks -------------------------------------------------------------------------------

def _spawn(fn, world, *args):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.start_processes(fn, args=(world, port, out, *args), nprocs=world, start_method="spawn")
    return dict(out)


def _join(rank, world, port):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)


def _held_gradient_numel(model) -> int:
    """Elements of gradient storage this rank holds: sharded .grad plus FSDP's unsharded gradients."""
    held, seen = 0, set()
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        group = fully_shard.state(module)._fsdp_param_group
        if group is None or id(group) in seen:
            continue
        seen.add(id(group))
        for fp in group.fsdp_params:
            if fp.sharded_param.grad is not None:
                held += fp.sharded_param.grad.to_local().numel()
            unsharded = getattr(fp, "_unsharded_param", None)
            for grad in (getattr(unsharded, "grad", None), fp.unsharded_accumulated_grad):
                held += 0 if grad is None else grad.numel()
    return held


def _accumulation_worker(rank, world, port, out):
    _join(rank, world, port)
    dist.init_process_group("gloo")
    cfg = load_config(TINY)
    reference = dict(_model(cfg, "cpu").named_parameters())
    # (replicas, defer_grad_sync, hybrid): sharded; sharded and deferred; replicated (all-reduce deferred)
    modes = {"default": (1, False, False), "deferred": (1, True, False), "replicated": (world, False, True)}
    for mode, (replicas, defer, hybrid) in modes.items():
        model = _model(cfg)
        apply_parallelism(model, cfg.parallel, _mesh(world, replicas))
        materialize(model, torch.device("cpu"), seed=0)
        if mode == "default":  # the same weights as a single-process model built with seed 0
            out[f"weights_equal_{rank}"] = all(torch.equal(p.full_tensor(), reference[n]) for n, p in model.named_parameters())
        optimizer = build_optimizer(model, cfg.optim)
        held, losses = [], []

        def batches(step):
            for micro in range(ACCUM):
                if micro == 1:  # micro-batch 0's backward is done, micro-batch 1's forward not begun
                    held.append(_held_gradient_numel(model))
                g = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
                tokens = torch.randint(0, 500, (MICRO, SEQ + 1), generator=g)
                yield tokens[:, :-1], tokens[:, 1:]
        for step in range(2):
            result = train_step(model, optimizer, batches(step), ACCUM, cfg.optim.grad_clip, torch.device("cpu"),
                                defer_grad_sync=defer, hybrid=hybrid)
            losses.append((result.loss.item(), result.grad_norm.item(), result.updated))
        out[(rank, mode)] = {"held": held, "losses": losses,
                              "shard": sum(p.to_local().numel() for p in model.parameters()),
                              "full": sum(p.numel() for p in model.parameters())}
    dist.destroy_process_group()


def test_accumulation_holds_only_the_shard_of_gradients_by_default():
    out = _spawn(_accumulation_worker, 2)
    for rank in range(2):
        assert out[f"weights_equal_{rank}"]
        default, deferred = out[(rank, "default")], out[(rank, "deferred")]
        assert default["shard"] < default["full"] * 0.6
        assert default["held"] == [default["shard"]] * 2  # reduce-scattered after every micro-batch
        assert deferred["held"] == [deferred["full"]] * 2  # parallel.defer_grad_sync=true: unsharded
        for other in ("deferred", "replicated"):  # the same training, whatever is communicated when
            for (loss_a, norm_a, up_a), (loss_b, norm_b, up_b) in zip(default["losses"], out[(rank, other)]["losses"]):
                assert up_a and up_b
                assert loss_a == pytest.approx(loss_b, rel=1e-5) and norm_a == pytest.approx(norm_b, rel=1e-5)


class SkipsOnRankOne:
    """Random batches; rank 1 reports bad rows skipped, rank 0 none (as if its shards were clean)."""

    def __init__(self, rank):
        self.rank = rank

    def __iter__(self):
        g = torch.Generator().manual_seed(self.rank)
        while True:
            tokens = torch.randint(0, 500, (MICRO, SEQ + 1), generator=g)
            yield tokens[:, :-1], tokens[:, 1:]

    def state_dict(self):
        return {}

    def load_state_dict(self, states):
        pass

    def stats(self):
        return {"documents": 10 + self.rank, "skipped_rows": 7 * self.rank, "epoch": 2 + self.rank}


def _counters_worker(rank, world, port, out, run_dir):
    _join(rank, world, port)
    cfg = load_config([*TINY, f"train.global_batch_tokens={SEQ * MICRO * world}", "train.max_steps=1",
                       f"run_dir={run_dir}"])
    out[rank] = train(cfg, data=SkipsOnRankOne(rank))


def test_data_counters_are_summed_over_ranks(tmp_path):
    assert _spawn(_counters_worker, 2, str(tmp_path)) == {0: 0, 1: 0}
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["data/skipped_rows"] == 7  # rank 1's, logged by rank 0
    assert record["data/documents"] == 21
    assert record["data/epoch"] == 2  # the slowest rank's epoch
