"""FP8 training (``parallel.float8``, fms_dyt/float8.py): which layers convert, every recipe trains
beside bf16, checkpoints resume across FP8 on and off, torchao missing exits 2, FP8 all-gathers on 2
ranks (counted on a fake process group, resumed after SIGKILL on gloo), compile, the static DyT
scale, and the planner's and simulator's FP8 bytes."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.device_mesh import init_device_mesh
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import RandomBatches

from fms_dyt import float8
from fms_dyt.audit import StepAudit
from fms_dyt.config import load_config, model_args, norm_args
from fms_dyt.model import Transformer
from fms_dyt.norms import NORMS
from fms_dyt.parallel import apply_parallelism, materialize
from fms_dyt.plan import plan
from fms_dyt.trainer import train
REPO = float8.__file__.rsplit("/fms_dyt/", 1)[0]
SEQ, MICRO = 32, 2
TINY = ["model=tiny", "model.n_layers=2", "norm=dyt", "norm.alpha_attn=4", "norm.alpha_ffn=4",
        "parallel.param_dtype=bfloat16", "logging.wandb.mode=disabled", f"train.seq_len={SEQ}",
        f"train.micro_batch_size={MICRO}", f"train.global_batch_tokens={SEQ * MICRO * 2}", "logging.interval=1",
        "logging.telemetry_interval=null", "optim.lr=3e-3", "optim.warmup_steps=2", "preflight.enabled=false"]


def _train(run_dir, *overrides) -> dict[int, float]:
    """Train in this process; the losses by step of what metrics.jsonl holds."""
    import json

    assert train(load_config([*TINY, f"run_dir={run_dir}", *overrides]), data=RandomBatches(MICRO, SEQ)) == 0
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def _meta_model(*overrides):
    cfg = load_config([*TINY, *overrides])
    with torch.device("meta"):
        return cfg, Transformer(model_args(cfg), norm_args(cfg))


def test_blocks_convert_but_not_the_head_nor_widths_that_are_not_multiples_of_16():
    _, model = _meta_model("model.ffn_dim=200")  # 200 = 12.5 x 16: the FFN stays
    names = [n for n, _ in model.named_parameters()]
    float8.convert(model, "rowwise")
    assert float8.converted(model) == [f"layers.{i}.attention.{w}" for i in range(2) for w in ("wq", "wk", "wv", "wo")]
    assert type(model.output) is torch.nn.Linear and type(model.layers[0].feed_forward.w1) is torch.nn.Linear
    assert [n for n, _ in model.named_parameters()] == names  # checkpoints and export rely on them


def test_without_torchao_a_float8_run_exits_2_naming_the_extra(tmp_path):
    run_dir = tmp_path / "run"
    hide = ("import runpy, sys; sys.modules['torchao'] = None; "  # as if torchao were not installed
            f"sys.argv = ['train.py', 'experiment=quickstart', 'parallel.float8=rowwise', 'run_dir={run_dir}']; "
            "runpy.run_path('train.py', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", hide], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-3000:]
    assert 'pip install -e ".[fp8]"' in done.stderr and "parallel.float8" in done.stderr
    assert not run_dir.exists()  # refused before anything is written


def test_an_unknown_recipe_and_a_static_scale_without_tensorwise_are_refused():
    from fms_dyt.config import ConfigError

    with pytest.raises(ConfigError, match="parallel.float8='fp8'"):
        load_config([*TINY, "parallel.float8=fp8"])
    with pytest.raises(ConfigError, match="parallel.float8_dyt_static_scale=true needs parallel.float8=tensorwise"):
        load_config([*TINY, "parallel.float8=rowwise", "parallel.float8_dyt_static_scale=true"])


def test_every_recipe_trains_within_a_hundredth_of_bf16_and_differs_from_it(tmp_path):
    reference = _train(tmp_path / "bf16", "train.max_steps=4")
    for recipe in float8.RECIPES:
        losses = _train(tmp_path / recipe, "train.max_steps=4", f"parallel.float8={recipe}")
        assert sorted(losses) == [1, 2, 3, 4]
        for step, loss in losses.items():
            assert abs(loss - reference[step]) < 0.01, (recipe, step, loss, reference[step])
        assert losses != reference, recipe  # the FP8 matrix multiplies did run


def _checkpoint_keys(run_dir, step):
    """Every tensor of a DCP checkpoint: name -> (dtype, shape)."""
    metadata = FileSystemReader(str(run_dir / "checkpoints" / f"step_{step}")).read_metadata()
    return {k: (str(getattr(m, "properties", None) and m.properties.dtype), tuple(getattr(m, "size", ())))
            for k, m in metadata.state_dict_metadata.items()}


def test_checkpoints_are_the_same_tensors_and_resume_across_fp8_on_and_off(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fms_dyt")
    fp8, plain = tmp_path / "fp8", tmp_path / "plain"
    _train(fp8, "train.max_steps=2", "parallel.float8=tensorwise")
    _train(plain, "train.max_steps=2")
    keys = _checkpoint_keys(fp8, 2)
    assert keys == _checkpoint_keys(plain, 2)
    assert keys["model.layers.0.attention.wq.weight"] == ("torch.float32", (64, 64))  # the fp32 master weight
    # FP8 off resumes an FP8 run, and rowwise resumes a bf16 one: two continuations of nearly the
    # same state, within FP8's rounding of each other
    continued = {}
    for run_dir, recipe in ((fp8, "off"), (plain, "rowwise")):
        continued[recipe] = _train(run_dir, "train.max_steps=4", f"parallel.float8={recipe}")
        assert f"resumed from {run_dir / 'checkpoints' / 'step_2'}" in caplog.text
    assert sorted(continued["off"]) == sorted(continued["rowwise"]) == [1, 2, 3, 4]
    for step in (3, 4):
        assert continued["off"][step] == pytest.approx(continued["rowwise"][step], abs=1e-2)


def test_compiled_blocks_train_with_fp8_and_the_static_dyt_scale(tmp_path):
    static = ["train.max_steps=2", "parallel.float8=tensorwise", "parallel.float8_dyt_static_scale=true"]
    eager = _train(tmp_path / "eager", *static)
    compiled = _train(tmp_path / "compiled", *static, "parallel.compile=true")
    for step in (1, 2):
        assert compiled[step] == pytest.approx(eager[step], abs=1e-2)


class _Reductions(TorchDispatchMode):
    """Max reductions over tensors of at least ``numel`` elements: the amax of torchao's casts."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.max.default and args[0].numel() >= self.numel:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", [kind for kind, cls in NORMS.items() if cls.bounded_by_gamma])
def test_static_scale_removes_ten_activation_reductions_per_block_of_every_bounded_kind(one_rank, kind):
    seq = 128  # activations of 2 x 128 x 64 elements, more than any weight (64 x 192)
    counts, outputs = {}, {}
    for static in (False, True):
        cfg, model = _meta_model("parallel.float8=tensorwise", f"parallel.float8_dyt_static_scale={str(static).lower()}",
                                 f"norm.name={kind}")
        apply_parallelism(model, cfg.parallel, init_device_mesh("cpu", (1,)))
        materialize(model, torch.device("cpu"), seed=0)
        tokens = torch.randint(0, 500, (MICRO, seq), generator=torch.Generator().manual_seed(0))
        with _Reductions(MICRO * seq * 64) as reductions:
            outputs[static] = model(tokens).float()
            outputs[static].square().mean().backward()
        counts[static] = reductions.count
    # per block: the casts of wq, wk, wv, w1, w3's input in forward and again for their weight
    # gradients (tensorwise casts the input in backward from its saved high-precision copy)
    assert counts[False] - counts[True] == 10 * 2
    # γ = 1 and α₀ = 4 at initialisation: the static scale is within a few percent of the measured one
    assert torch.allclose(outputs[True], outputs[False], atol=2e-3)


@pytest.fixture
def fake_world_of_two():
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    yield init_device_mesh("cpu", (2,), mesh_dim_names=("shard",))
    dist.destroy_process_group()


def test_tensorwise_all_gathers_the_fp8_weights_in_one_byte_each(fake_world_of_two):
    gathered = {}
    for recipe in ("off", "tensorwise"):
        cfg, model = _meta_model(f"parallel.float8={recipe}")
        apply_parallelism(model, cfg.parallel, fake_world_of_two)
        materialize(model, torch.device("cpu"), seed=0)
        with StepAudit() as audit:
            model(torch.zeros(MICRO, SEQ, dtype=torch.long))
        gathered[recipe] = audit.collective_bytes[("allgather", "default_pg")]
    fp8_params = 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 192)  # wq, wo; wk, wv; w1, w2, w3 of 2 blocks
    assert gathered["off"] - gathered["tensorwise"] == fp8_params  # 2 bytes (bf16) -> 1


def test_planner_and_simulator_count_the_fp8_all_gathers_alike():
    from fms_dyt.simulate import simulate

    cfg = {r: load_config([*TINY, f"train.global_batch_tokens={SEQ * MICRO * 4}", f"parallel.float8={r}"])
           for r in ("off", "tensorwise")}
    planned = {r: plan(c, nodes=1, gpus_per_node=4) for r, c in cfg.items()}
    simulated = {r: simulate(c, 1, 4) for r, c in cfg.items()}
    saved = {r: p["comm_per_step"]["allgather"]["bytes"] for r, p in planned.items()}
    assert saved["off"] - saved["tensorwise"] == pytest.approx(
        simulated["off"]["collectives_per_step"]["allgather"]["bytes"]
        - simulated["tensorwise"]["collectives_per_step"]["allgather"]["bytes"], rel=0.01)
    assert planned["tensorwise"]["float8"]["fp8_layers"] == 14
    # the scales' one all-reduce after the optimizer step
    assert simulated["tensorwise"]["collectives_per_step"]["allreduce"]["count"] == \
        simulated["off"]["collectives_per_step"]["allreduce"]["count"] + 1
    assert planned["tensorwise"]["comm_per_step"]["allreduce"]["count"] == 1


def test_7b_plan_halves_the_block_all_gathers_and_keeps_the_activations():
    off, fp8 = (plan(load_config(["experiment=llama7b_dyt", f"parallel.float8={r}"])) for r in ("off", "tensorwise"))
    static = plan(load_config(["experiment=llama7b_dyt", "parallel.float8=tensorwise",
                               "parallel.float8_dyt_static_scale=true"]))
    blocks = fp8["float8"]["fp8_params"]
    assert blocks == 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)  # every block linear of LLaMA-2 7B
    gathers = off["comm_per_step"]["allgather"]["count"] - 3  # each block twice, the embedding and head once
    assert gathers == 2 * 32
    assert off["comm_per_step"]["allgather"]["bytes"] - fp8["comm_per_step"]["allgather"]["bytes"] == 2 * blocks
    assert fp8["memory_gib"]["activations"] == off["memory_gib"]["activations"]  # torchao keeps the bf16 input
    tokens = 2 * 4096  # a micro-batch: the normed inputs of attention and FFN kept in FP8, 1 byte saved each
    assert off["memory_gib"]["activations"] - static["memory_gib"]["activations"] == pytest.approx(
        32 * 2 * 4096 * tokens / 2**30, abs=2e-3)


def test_two_gloo_ranks_with_fp8_all_gathers_resume_after_sigkill_with_the_same_losses(tmp_path, killed_runs):
    args = ["experiment=quickstart", "parallel.param_dtype=bfloat16", "parallel.float8=tensorwise",
            "train.max_steps=4", "checkpoint.interval=2", "train.seq_len=64", "train.micro_batch_size=4",
            "train.global_batch_tokens=1024", "data.num_workers=2", "validation.interval=null",
            "logging.wandb.mode=disabled"]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    out, _ = killed_runs.torchrun(ref, *args).communicate(timeout=600)
    assert sorted(killed_runs.losses(ref)) == list(range(1, 5)), out
    killed_runs.kill_and_resume(killed, args, kill_after=3, resume_step=2)
    again, expected = killed_runs.losses(killed), killed_runs.losses(ref)
    assert [again[s] for s in (3, 4)] == [expected[s] for s in (3, 4)]
