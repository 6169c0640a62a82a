"""norm=dyisru: the layer against the paper's form, its saturation threshold, and a run of it trained
in this process: resumed with the same losses, its scalars and telemetry logged, exported with the
same logits, evaluated, analysed, planned; and a variant of ``study norms``."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from fms_dyt.analyze import analyze
from fms_dyt.config import load_config, model_args, norm_args
from fms_dyt.model import Transformer
from fms_dyt.norms import SATURATED_FRACTION, DyISRU, DyT
from fms_dyt.plan import plan
from fms_dyt.study import NORM_VARIANTS
from helpers import RandomBatches, metrics_by_step, train_here

SEQ, MICRO, LAYERS, STEPS, INTERVAL = 16, 2, 2, 4, 2
SITES = [f"{kind}/{i}" for i in range(LAYERS) for kind in ("attn", "ffn")] + ["final"]
RUN = ["model=tiny", f"model.n_layers={LAYERS}", "norm=dyisru", "tokenizer=sample", "model.vocab_size=8000",
       f"train.seq_len={SEQ}", f"train.micro_batch_size={MICRO}", f"train.global_batch_tokens={SEQ * MICRO}",
       f"train.max_steps={STEPS}", f"checkpoint.interval={INTERVAL}", "checkpoint.keep=2", "logging.interval=1",
       f"logging.telemetry_interval={INTERVAL}", "parallel.param_dtype=float32", "logging.wandb.mode=disabled",
       "optim.lr=3e-3", "optim.warmup_steps=1"]


def _train(run_dir: Path) -> Path:
    train_here(load_config([*RUN, f"run_dir={run_dir}"]), RandomBatches(MICRO, SEQ, low=3, high=8000))
    return run_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp("dyisru") / "run")


def _trained_layer(dim: int = 8) -> DyISRU:
    layer = DyISRU(dim, alpha0=0.7)
    with torch.no_grad():
        layer.alpha.add_(0.2)
        layer.weight.add_(torch.randn(dim, generator=torch.Generator().manual_seed(0)))
    return layer


def test_forward_is_the_papers_form_with_beta_the_inverse_square_of_alpha():
    layer = _trained_layer()
    x = torch.randn(3, 5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 4
    layer = layer.double()
    beta = layer.alpha.detach() ** -2
    with torch.no_grad():
        paper = x / torch.sqrt(beta + x**2)  # y_i / √C of the paper: √C is in γ here
        assert torch.allclose(layer(x), layer.weight * paper, atol=1e-12, rtol=0)
        z = layer.preactivation(x)
        assert torch.allclose(layer.normalize(x), z / torch.sqrt(1 + z**2), atol=1e-12, rtol=0)
        assert layer(1e6 * x).abs().le(layer.weight.abs() + 1e-12).all()  # bounded by |γ| (the FP8 static scale)
    layer(x).sum().backward()  # every parameter learns
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())


def test_saturated_where_the_derivative_is_down_to_dyts_fraction_of_its_maximum():
    z = torch.tensor(DyISRU.saturated_above, dtype=torch.float64, requires_grad=True)
    (z / torch.sqrt(1 + z**2)).backward()  # the peak, at 0, is 1
    assert z.grad.item() == pytest.approx(SATURATED_FRACTION, rel=1e-9)
    assert SATURATED_FRACTION == pytest.approx(1 - math.tanh(DyT.saturated_above) ** 2)
    assert DyISRU.saturated_above == pytest.approx(2.2026, abs=1e-4)


def test_alpha0_from_dyts_keys_and_the_planner_counts_one_scalar_per_site():
    cfg = load_config(["model=tiny", "model.dim=2048", "norm=dyisru", "norm.alpha_ffn=0.3"])
    assert norm_args(cfg).alpha0() == {"attn": 1.0, "ffn": 0.3, "final": 0.5}  # the table's row 2048, and the key
    cfg = load_config(["norm=dyisru"])
    dyisru, rms = plan(cfg), plan(load_config(["norm=rmsnorm"]))
    assert dyisru["n_params"] == sum(p.numel() for p in Transformer(model_args(cfg), norm_args(cfg)).parameters())
    sites = 2 * cfg.model.n_layers + 1
    assert dyisru["n_params"] - rms["n_params"] == sites + 1  # α per site, the embedding scalar
    assert dyisru["params_by_part"]["scalars"] == sites + 1 and dyisru["norm"] == "dyisru"


def test_a_variant_of_study_norms():
    assert ("norm=dyisru",) in [v.overrides for v in NORM_VARIANTS if v.name == "dyisru"]


def test_trains_logs_alpha_and_telemetry_and_resumes_with_the_same_losses(run_dir, tmp_path):
    records = metrics_by_step(run_dir)
    assert sorted(records) == list(range(1, STEPS + 1)) and records[STEPS]["loss"] < records[1]["loss"]
    last = records[STEPS]
    assert last["alpha/attn/0"] != 1.0 and "embedding_scale" in last  # α trains
    for site in SITES:
        assert last[f"telemetry/alpha/{site}"] == pytest.approx(last[f"alpha/{site}"])
        assert 0 <= last[f"telemetry/saturated/{site}"] <= 1 and last[f"telemetry/gamma_abs/{site}"] > 0
    copy = tmp_path / "resumed"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "checkpoints" / f"step_{STEPS}")
    again = metrics_by_step(_train(copy))
    for step in range(INTERVAL + 1, STEPS + 1):
        assert again[step]["loss"] == pytest.approx(records[step]["loss"], rel=1e-5), step


def test_exports_with_the_same_logits_and_evaluates(run_dir, exported_fms_dyt, tiny_zero_shot):
    config, theirs = exported_fms_dyt(run_dir, "--format llama needs norm=rmsnorm")
    assert config["norm"]["kind"] == "dyisru" and isinstance(theirs.model.layers[0].ffn_norm, DyISRU)
    assert tiny_zero_shot(run_dir)["model"]["norm"]["kind"] == "dyisru"  # the bundled tiny task, offline


def test_the_analysis_draws_its_curve_and_alpha(run_dir, tmp_path):
    result = analyze([run_dir], tmp_path / "report", batch="random", batch_size=2)
    assert {"alpha_run.png", "alpha_depth.png", "telemetry_run.png", "norm_io_token_run.png"} <= set(result.figures)
    ax = next(ax for ax in result.figures["norm_io_token_run.png"].axes if ax.get_visible())
    assert any(DyISRU.formula in line.get_label() for line in ax.get_lines())
    assert "DyISRU" in (tmp_path / "report" / "report.md").read_text()
