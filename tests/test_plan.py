"""The planner: the paper's eight runs fit, FLOPs and activation memory agree with measurements."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from fms_dyt.config import load_config
from fms_dyt.metrics import flops_per_token
from fms_dyt.model import ModelArgs, Transformer
from fms_dyt.norms import NORMS, NormArgs
from fms_dyt.parallel import checkpointed_blocks
from fms_dyt.plan import GPUS, Network, activation_bytes, measure_activation_bytes, plan

PAPER_RUNS = {  # experiment: (nodes, GPUs per node) of Table 4
    "llama7b_dyt": (64, 8), "llama7b_rmsnorm": (64, 8), "llama13b_dyt": (64, 8), "llama13b_rmsnorm": (64, 8),
    "llama34b_dyt": (128, 8), "llama34b_rmsnorm": (128, 8), "llama70b_dyt": (128, 8), "llama70b_rmsnorm": (128, 8),
}


def _norm(kind):
    return NormArgs(kind=kind, alpha_attn=0.8, alpha_ffn=0.2, alpha_final=0.2, embedding_scale=kind != "rmsnorm")


@pytest.mark.parametrize("experiment", sorted(PAPER_RUNS))
def test_paper_runs_fit_in_80_gib_on_their_own_layout(experiment):
    p = plan(load_config([f"experiment={experiment}"]))
    assert (p["layout"]["nodes"], p["layout"]["gpus_per_node"]) == PAPER_RUNS[experiment]
    assert p["layout"]["grad_accum_steps"] == 1
    assert 5 <= p["memory_per_gpu_gib"] <= 80 and p["fits"]
    parts = p["memory_gib"]
    assert set(parts) == {"params", "grads", "optimizer", "activations", "comm", "overhead"}
    assert sum(parts.values()) == pytest.approx(p["memory_per_gpu_gib"], abs=0.01)
    assert p["flops_per_token"] > 6 * p["n_params"] * 0.9
    assert p["days"] == pytest.approx(200e9 / p["tokens_per_s"] / 86400, rel=1e-3)


def test_cli_json_keeps_the_foundation_keys():
    out = subprocess.run(
        [sys.executable, "-m", "fms_dyt.plan", "experiment=llama13b_dyt", "--json", "--gpu", "a100"],
        capture_output=True, text=True, check=True, timeout=300,
    )
    p = json.loads(out.stdout)
    assert p["n_params"] == 13_015_864_320 + 2 * 40 + 1 + 1
    assert p["alpha"] == {"attn": 0.6, "ffn": 0.15, "final": 0.15} and p["embedding_scale"] is True
    assert {"memory_per_gpu_gib", "flops_per_token", "tokens_per_s", "days"} <= set(p)
    assert p["layout"]["gpu"] == "a100" and p["gpu_memory_gib"] == 80.0


def test_cli_measure_compares_plan_and_cpu_memory():
    out = subprocess.run(
        [sys.executable, "-m", "fms_dyt.plan", "model=tiny", "train.seq_len=64", "train.micro_batch_size=2",
         "parallel.param_dtype=float32", "--nodes", "1", "--gpus-per-node", "1", "--measure", "--json"],
        capture_output=True, text=True, check=True, timeout=300,
    )
    m = json.loads(out.stdout)["activations_measured_cpu"]
    assert m["plan_bytes"] == pytest.approx(m["measured_bytes"], rel=0.2)


def test_cli_rejects_a_cluster_that_does_not_divide_the_batch():
    out = subprocess.run(
        [sys.executable, "-m", "fms_dyt.plan", "experiment=llama7b_dyt", "--nodes", "3"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 2 and "train.global_batch_tokens" in out.stderr


def test_sharding_and_checkpointing_move_memory_where_expected():
    base = ["experiment=llama7b_rmsnorm"]
    hybrid = plan(load_config(base))
    full = plan(load_config(base + ["parallel.sharding=full"]))
    # 512-way instead of 8-way shards of the fp32 optimizer state.
    assert full["memory_gib"]["optimizer"] == pytest.approx(hybrid["memory_gib"]["optimizer"] / 64, rel=1e-2)
    assert full["memory_gib"]["activations"] == hybrid["memory_gib"]["activations"]
    ckpt = plan(load_config(base + ["parallel.activation_checkpointing=full"]))
    assert ckpt["memory_gib"]["activations"] < hybrid["memory_gib"]["activations"] / 4
    assert ckpt["layout"]["checkpointed_blocks"] == 32
    twice = plan(load_config(base + ["parallel.sharding=full", "train.micro_batch_size=1"]), nodes=128)
    assert twice["layout"]["world_size"] == 1024 and twice["layout"]["grad_accum_steps"] == 1
    assert twice["memory_gib"]["optimizer"] == pytest.approx(full["memory_gib"]["optimizer"] / 2, rel=1e-2)
    # Compute alone scales with the GPUs; half the tokens a GPU hide less of the same all-gathers.
    assert twice["compute_tokens_per_s_per_gpu"] == pytest.approx(full["compute_tokens_per_s_per_gpu"], rel=1e-4)
    assert twice["exposed_comm_s_per_step"] / twice["step_s"] > full["exposed_comm_s_per_step"] / full["step_s"]
    h200 = plan(load_config(base), gpu="h200")
    a100 = plan(load_config(base), gpu="a100")
    assert h200["compute_tokens_per_s_per_gpu"] / a100["compute_tokens_per_s_per_gpu"] == pytest.approx(
        GPUS["h200"].peak_flops / GPUS["a100"].peak_flops, rel=1e-4
    )


@pytest.mark.parametrize(
    "shape,seq_len",
    [
        (dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=352, vocab_size=1000), 64),
        (dict(dim=96, n_layers=3, n_heads=6, n_kv_heads=None, ffn_dim=256, vocab_size=512), 256),
        (dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=1, ffn_dim=160, vocab_size=2000), 32),
    ],
)
def test_flops_per_token_matches_flop_counter(shape, seq_len):
    args = ModelArgs(max_seq_len=seq_len, **shape)
    model = Transformer(args, _norm("dyt"))
    tokens = torch.randint(0, args.vocab_size, (2, seq_len))
    # The math backend runs attention as explicit matmuls, which FlopCounterMode counts on CPU.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(tokens).float().logsumexp(-1).mean().backward()
    measured = counter.get_total_flops() / tokens.numel()
    assert flops_per_token(args, seq_len) == pytest.approx(measured, rel=0.02)


ACTIVATION_CASES = [
    # (model shape, micro-batch, seq, dtype, activation checkpointing)
    (dict(dim=128, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=352, vocab_size=512), 2, 128, torch.float32, "off"),
    (dict(dim=128, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=352, vocab_size=512), 2, 128, torch.bfloat16, "off"),
    (dict(dim=96, n_layers=4, n_heads=6, n_kv_heads=None, ffn_dim=256, vocab_size=300), 1, 256, torch.bfloat16, "selective"),
    (dict(dim=96, n_layers=4, n_heads=6, n_kv_heads=3, ffn_dim=256, vocab_size=300), 4, 64, torch.float32, "full"),
    (dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192, vocab_size=8000), 2, 64, torch.float32, "off"),
]


@pytest.mark.parametrize("kind", sorted(NORMS))  # every registered kind's saved_bytes
@pytest.mark.parametrize("shape,batch,seq,dtype,ac", ACTIVATION_CASES)
def test_activation_model_within_20_percent_of_measured_cpu_memory(kind, shape, batch, seq, dtype, ac):
    args = ModelArgs(max_seq_len=seq, **shape)
    ckpt = checkpointed_blocks(args.n_layers, ac, 0.5)
    norm = _norm(kind)
    estimate = activation_bytes(args, norm, batch, seq, torch.empty((), dtype=dtype).element_size(), ckpt, cpu=True)
    measured = measure_activation_bytes(args, norm, batch, seq, dtype, ckpt)
    assert estimate["saved"] == pytest.approx(measured["saved"], rel=0.05)
    assert estimate["peak"] == pytest.approx(measured["peak"], rel=0.2)


def test_accumulation_keeps_shard_sized_gradients_unless_deferred():
    base = ["experiment=llama7b_dyt"]
    n = plan(load_config(base))["n_params"]
    default = plan(load_config(base), nodes=8)
    deferred = plan(load_config(base + ["parallel.defer_grad_sync=true"]), nodes=8)
    assert default["layout"]["grad_accum_steps"] == 8 and default["layout"]["shard_size"] == 8
    # Reduce-scattered every micro-batch: the fp32 shards; deferred: fp32 gradients of every
    # parameter. Both plus one block's unsharded gradients when the peak falls in a block's backward.
    assert default["memory_gib"]["grads"] == pytest.approx(4 * n / 8 / 2**30, rel=0.15)
    assert deferred["memory_gib"]["grads"] == pytest.approx(4 * n / 2**30, rel=0.02)
    assert deferred["memory_per_gpu_gib"] - default["memory_per_gpu_gib"] > 20


def test_param_count_and_alpha0_per_site_with_a_final_rmsnorm():
    """DyT blocks with an RMSNorm final norm: one α fewer than all-DyT, and no final α₀ printed."""
    p = plan(load_config(["experiment=llama7b_dyt", "norm.final=rmsnorm"]))
    assert p["n_params"] == 6_738_415_616 + 2 * 32 + 1  # LLaMA-2 7B, one α per block norm, the scalar
    assert p["n_params"] == plan(load_config(["experiment=llama7b_dyt"]))["n_params"] - 1
    assert p["alpha"] == {"attn": 0.8, "ffn": 0.2} and p["norm"] == "dyt, final rmsnorm"
    out = subprocess.run([sys.executable, "-m", "fms_dyt.plan", "norm=dyt", "norm.final=rmsnorm"],
                         capture_output=True, text=True, check=True, timeout=300).stdout
    assert "norm dyt, final rmsnorm: 4,293,193 parameters" in out  # the tiny model
    assert "alpha0: attention 1, ffn 1\n" in out


def test_link_time_of_a_collective_is_ring_bytes_over_the_stated_bandwidth():
    h100 = Network.of(GPUS["h100"])
    assert (h100.intra_node, h100.inter_node) == (450e9, 50e9)  # NVLink4 per direction; 400 Gb/s per GPU
    gb = 1e9
    assert h100.seconds("allgather", gb, 8, 1) == pytest.approx(7 / 8 * gb / 450e9)
    assert h100.seconds("reduce_scatter", gb, 8, 1) == pytest.approx(7 / 8 * gb / 450e9)
    assert h100.seconds("allreduce", gb, 64, 64) == pytest.approx(2 * 63 / 64 * gb / 50e9)
    assert h100.seconds("allgather", gb, 1024, 128) == pytest.approx(1023 / 1024 * gb / 50e9)
    assert h100.seconds("allreduce", gb, 1, 1) == 0.0
    assert Network.of(GPUS["a100"]).inter_node == 25e9
    assert Network.of(GPUS["h100"], nvlink_gb_s=100, network_gbit_s=800).inter_node == 100e9


@pytest.mark.parametrize("experiment", sorted(PAPER_RUNS))
def test_paper_runs_tokens_per_s_is_compute_plus_exposed_communication(experiment):
    p = plan(load_config([f"experiment={experiment}"]))
    tokens = p["layout"]["micro_batch_size"] * p["layout"]["seq_len"] * p["layout"]["grad_accum_steps"]
    assert p["step_s"] == pytest.approx(p["compute_s_per_step"] + p["exposed_comm_s_per_step"], abs=1e-3)
    assert 0 <= p["exposed_comm_s_per_step"] <= p["comm_s_per_step"]
    assert p["tokens_per_s_per_gpu"] == pytest.approx(tokens / p["step_s"], rel=1e-3)
    assert p["tokens_per_s_per_gpu"] <= p["compute_tokens_per_s_per_gpu"]
    assert p["mfu_effective"] == pytest.approx(p["tokens_per_s_per_gpu"] * p["flops_per_token"] / 989e12, rel=1e-3)
    shard, replicas = p["layout"]["shard_size"], p["layout"]["replicas"]
    comm = p["comm_per_step"]
    # bf16 all-gathers of every parameter, twice but for the head's (kept after forward) and the
    # embedding's (no gather for its backward); fp32 reduce-scatters of every gradient; hybrid: an
    # fp32 all-reduce of this rank's shard.
    once = p["params_by_part"]["embedding"] + p["params_by_part"]["output"]
    assert comm["allgather"]["bytes"] == pytest.approx(2 * (2 * p["n_params"] - once), rel=1e-3)
    assert comm["reduce_scatter"]["bytes"] == pytest.approx(4 * p["n_params"], rel=1e-6)
    if replicas > 1:
        assert comm["allreduce"]["bytes"] == pytest.approx(4 * p["n_params"] / shard, rel=1e-6)
    else:
        assert "allreduce" not in comm


def test_one_gpu_without_checkpointing_runs_at_the_assumed_mfu_and_a_slow_network_shows():
    cfg = load_config(["experiment=llama7b_dyt"])
    alone = plan(cfg, nodes=1, gpus_per_node=1)
    assert alone["comm_s_per_step"] == alone["exposed_comm_s_per_step"] == 0
    assert alone["tokens_per_s_per_gpu"] == pytest.approx(0.40 * 989e12 / alone["flops_per_token"], rel=1e-3)
    full = load_config(["experiment=llama7b_dyt", "parallel.sharding=full"])
    fast, slow = plan(full), plan(full, network_gbit_s=25)
    assert slow["comm_s_per_step"] == pytest.approx(16 * fast["comm_s_per_step"], rel=1e-4)
    assert slow["exposed_comm_s_per_step"] > fast["exposed_comm_s_per_step"]
    assert slow["tokens_per_s_per_gpu"] < fast["tokens_per_s_per_gpu"]
    # Activation checkpointing: the recomputed forward is compute, a third more for the blocks.
    ckpt = plan(load_config(["experiment=llama7b_dyt", "parallel.activation_checkpointing=full"]))
    assert 1.25 < ckpt["compute_s_per_step"] / fast["compute_s_per_step"] < 1.34
