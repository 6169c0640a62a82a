"""norm=derf: the layer, its α₀ per site, training and resume, export, evaluation, the planner and
the analysis; and the point-wise telemetry interface (preactivation, saturated_above) of DyT and Derf."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fms_dyt.analysis.activations import capture_norm_io
from fms_dyt.config import load_config, model_args, norm_args
from fms_dyt.metrics import norm_scalars
from fms_dyt.model import ModelArgs, Transformer
from fms_dyt.norms import Derf, DyT, NormArgs, RMSNorm
from fms_dyt.plan import plan
from helpers import metrics_by_step, tiny_sample_run, train_py, trained

STEPS, INTERVAL = 4, 2
TRAIN = tiny_sample_run("norm=derf", "tokenizer=sample", "model.vocab_size=8000", "optim.lr=3e-3",
                        f"validation.interval={INTERVAL}", "validation.tokens=330", steps=STEPS, interval=INTERVAL)
SMALL = ModelArgs(dim=32, n_layers=2, n_heads=2, ffn_dim=64, vocab_size=64)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return trained(tmp_path_factory.mktemp("derf") / "run", *TRAIN)


def _trained_derf(dim: int = 8, seed: int = 0) -> Derf:
    """A Derf layer whose parameters are away from their initial values."""
    g = torch.Generator().manual_seed(seed)
    derf = Derf(dim, alpha0=0.7, shift0=0.0)
    with torch.no_grad():
        for p in derf.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return derf


def test_forward_is_the_formula_and_starts_at_the_initial_values():
    derf = Derf(8, alpha0=0.7, shift0=0.25, site="ffn")
    assert derf.alpha.item() == pytest.approx(0.7) and derf.shift.item() == pytest.approx(0.25)
    assert torch.equal(derf.weight, torch.ones(8)) and torch.equal(derf.bias, torch.zeros(8))
    trained = _trained_derf()
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(1)) * 2
    expected = trained.weight * torch.erf(trained.alpha * x + trained.shift) + trained.bias
    assert torch.allclose(trained(x), expected, atol=1e-6, rtol=0)
    assert torch.allclose(trained.preactivation(x), trained.alpha * x + trained.shift)
    trained(x).sum().backward()  # every parameter learns
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained.parameters())


def test_preactivation_and_saturation_threshold_of_each_pointwise_norm():
    dyt = DyT(8, alpha0=0.6, impl="eager")
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(dyt.preactivation(x), 0.6 * x)
    assert torch.allclose(dyt.normalize(x), torch.tanh(dyt.preactivation(x)))
    # The same fraction of the derivative's peak at either threshold: tanh'(z) = 1 - tanh², erf'(z) ∝ exp(-z²).
    tanh_fraction = 1 - math.tanh(DyT.saturated_above) ** 2
    assert DyT.saturated_above == 2.0 and tanh_fraction == pytest.approx(0.07, abs=0.001)
    assert math.exp(-Derf.saturated_above ** 2) == pytest.approx(tanh_fraction, rel=1e-9)
    z = torch.tensor(Derf.saturated_above, dtype=torch.float64, requires_grad=True)
    torch.erf(z).backward()
    assert z.grad.item() / (2 / math.sqrt(math.pi)) == pytest.approx(tanh_fraction, rel=1e-9)


def test_alpha0_per_site_from_the_width_table_or_the_keys():
    cfg = load_config(["model=tiny", "model.dim=2048", "norm=derf"])
    assert norm_args(cfg).alpha0() == {"attn": 1.0, "ffn": 0.5, "final": 0.5}  # the table's row 2048
    cfg = load_config(["model=tiny", "model.dim=2048", "norm=derf", "norm.alpha_ffn=0.3", "norm.shift0=0.1"])
    args = norm_args(cfg)
    assert args.alpha0() == {"attn": 1.0, "ffn": 0.3, "final": 0.5} and args.shift0 == 0.1
    small = Transformer(SMALL, args)  # the α₀ resolved for width 2048, on a small model
    assert small.layers[0].ffn_norm.alpha.item() == pytest.approx(0.3)
    assert small.layers[1].attention_norm.alpha.item() == pytest.approx(1.0)
    assert small.norm.alpha.item() == pytest.approx(0.5) and small.norm.shift.item() == pytest.approx(0.1)


def test_derf_and_dyt_mix_per_site():
    cfg = load_config(["model=tiny", "model.n_layers=2", "norm=dyt", "norm.final=derf"])
    model = Transformer(model_args(cfg), norm_args(cfg))
    assert isinstance(model.layers[0].attention_norm, DyT) and isinstance(model.norm, Derf)
    assert norm_args(cfg).description() == "dyt, final derf"
    assert {"alpha/final", "shift/final", "alpha/attn/1"} <= set(norm_scalars(model))
    assert not any(k.startswith("shift/attn") for k in norm_scalars(model))
    cfg = load_config(["model=tiny", "model.n_layers=2", "norm=derf", "norm.final=rmsnorm"])
    model = Transformer(model_args(cfg), norm_args(cfg))
    assert isinstance(model.layers[1].ffn_norm, Derf) and isinstance(model.norm, RMSNorm)
    assert set(norm_args(cfg).alpha0()) == {"attn", "ffn"}


def test_planner_counts_alpha_shift_gamma_and_beta_per_layer():
    derf, rms = plan(load_config(["norm=derf"])), plan(load_config(["norm=rmsnorm"]))
    cfg = load_config(["norm=derf"])
    model = Transformer(model_args(cfg), norm_args(cfg))
    assert derf["n_params"] == sum(p.numel() for p in model.parameters())
    sites, dim = 2 * cfg.model.n_layers + 1, cfg.model.dim
    # Per site Derf has α, s, γ and β where RMSNorm has its weight; plus the embedding scalar.
    assert derf["n_params"] - rms["n_params"] == sites * (2 + dim) + 1
    assert derf["params_by_part"]["scalars"] == 2 * sites + 1


def test_analysis_draws_erf_over_derf_layers():
    model = Transformer(SMALL, NormArgs(kind="derf", alpha_attn=0.8, alpha_ffn=0.6, alpha_final=0.6, shift0=0.2))
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        caps = capture_norm_io(model, tokens, ["ffn/1", "final"], max_tokens=12, seed=1)
    for cap, norm in zip(caps, (model.layers[1].ffn_norm, model.norm)):
        grid, values, formula = cap.curve
        assert formula == "erf(αx + s)" and cap.shift == pytest.approx(0.2)
        assert torch.allclose(values, torch.erf(cap.alpha * grid + cap.shift), atol=1e-6)
        assert torch.allclose(cap.y, torch.erf(norm.alpha * cap.x + norm.shift), atol=1e-6)


def test_trains_and_resumes_with_the_losses_of_an_uninterrupted_run(run_dir, resumed_copy):
    uninterrupted = metrics_by_step(run_dir)
    assert sorted(uninterrupted) == list(range(1, STEPS + 1))
    assert uninterrupted[STEPS]["val/loss"] < uninterrupted[INTERVAL]["val/loss"]  # learns: the same held-out windows
    assert {"alpha/attn/0", "shift/ffn/1", "shift/final", "embedding_scale"} <= set(uninterrupted[STEPS])
    assert uninterrupted[STEPS]["shift/final"] != 0.0  # s learns
    again = metrics_by_step(resumed_copy(run_dir, STEPS, INTERVAL, lambda copy: train_py(copy, *TRAIN)))
    for step in range(INTERVAL + 1, STEPS + 1):
        assert again[step]["loss"] == pytest.approx(uninterrupted[step]["loss"], rel=1e-5), step


def test_the_trained_run_exports_with_the_same_logits_and_evaluates(run_dir, exported_fms_dyt, tiny_zero_shot):
    config, theirs = exported_fms_dyt(run_dir, "--format fms_dyt")
    assert config["norm"]["kind"] == "derf"
    assert isinstance(theirs.model.norm, Derf) and isinstance(theirs.model.layers[0].attention_norm, Derf)
    assert tiny_zero_shot(run_dir)["model"]["norm"]["kind"] == "derf"  # the bundled tiny task, offline
