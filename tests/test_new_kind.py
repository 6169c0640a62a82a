"""The extension point of fms_dyt.norms: a point-wise kind defined here, in the test, and registered
for the test's duration only, goes through the whole stack (config, model, optimizer roles,
parameter count, metrics, telemetry, planner, analysis names, export format) by what its class
declares, with no other module knowing its name."""

from __future__ import annotations

import math

import pytest
import torch

from fms_dyt import norms
from fms_dyt.analysis.runs import norm_name
from fms_dyt.config import ConfigError, load_config, model_args, norm_args
from fms_dyt.hf import llama_expressible
from fms_dyt.metrics import norm_scalars
from fms_dyt.model import ModelArgs, Transformer, count_parameters
from fms_dyt.optim import parameter_roles
from fms_dyt.plan import activation_bytes, measure_activation_bytes
from fms_dyt.telemetry import measure
from helpers import RandomBatches, metrics_by_step, train_here


class Softsign(norms.Norm):
    """y = weight · αx / (1 + |αx|): a scaled softsign, point-wise, one learnable α per layer."""

    kind, display_name, formula = "softsign", "Softsign", "αx / (1 + |αx|)"
    pointwise, scalars, bounded_by_gamma = True, ("alpha",), True
    # softsign'(z) = 1 / (1 + |z|)², down to SATURATED_FRACTION of its peak at |z| = fraction^(-1/2) - 1
    saturated_above = norms.SATURATED_FRACTION ** -0.5 - 1

    def __init__(self, dim: int, alpha0: float, site: str, gamma0: float = 1.0):
        super().__init__()
        self.alpha0, self.site, self.gamma0 = float(alpha0), site, float(gamma0)
        self.alpha = torch.nn.Parameter(torch.empty(1))
        self.weight = torch.nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    @classmethod
    def build(cls, dim, site, args):
        return cls(dim, getattr(args, f"alpha_{site}"), site, args.gamma0(site))

    @staticmethod
    def saved_bytes(dim, compute_bytes, cpu=False):
        return 4 * compute_bytes * dim  # autograd keeps x, αx, 1 + |αx| and their quotient

    def preactivation(self, x):
        return self.alpha.to(x.dtype) * x

    def normalize(self, x):
        z = self.preactivation(x)
        return z / (1 + z.abs())

    def forward(self, x):
        return self.weight * self.normalize(x)

    def initial_state(self, device=None):
        return {"alpha": torch.full((1,), self.alpha0, device=device),
                "weight": torch.full(self.weight.shape, self.gamma0, device=device)}


SEQ, MICRO, LAYERS = 16, 2, 2
SITES = [f"{kind}/{i}" for i in range(LAYERS) for kind in ("attn", "ffn")] + ["final"]
# dyt.yaml's keys (α₀ table, embedding scalar) under the new kind's name: no YAML of its own
TINY = ["model=tiny", f"model.n_layers={LAYERS}", "norm=dyt", "norm.name=softsign", f"train.seq_len={SEQ}",
        f"train.micro_batch_size={MICRO}", f"train.global_batch_tokens={SEQ * MICRO}", "parallel.param_dtype=float32",
        "logging.wandb.mode=disabled", "optim.lr=3e-3", "optim.warmup_steps=1"]


@pytest.fixture
def softsign(monkeypatch):
    monkeypatch.setitem(norms.NORMS, Softsign.kind, Softsign)
    return Softsign


def test_an_unregistered_kind_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"norm.name='softsign' is unknown"):
        load_config(TINY)


def test_the_model_its_roles_counts_and_names_come_from_the_class(softsign):
    cfg = load_config(TINY)
    norm = norm_args(cfg)
    assert norm.alpha0() == {"attn": 1.0, "ffn": 1.0, "final": 1.0}  # point-wise: α₀ from the width table
    model = Transformer(model_args(cfg), norm)
    assert all(isinstance(m, softsign) for m in norms.norm_sites(model).values())
    roles = {name: role for name, _, role in parameter_roles(model)}
    assert {n for n, r in roles.items() if r == "alpha_and_shift"} == {f"{n}.alpha" for n in _site_modules(model)}
    assert roles["norm.weight"] == "norm_weights" and roles["embedding_scale"] == "embedding_scale"
    assert count_parameters(model)["scalars"] == len(SITES) + 1  # one α per site and the embedding scalar
    assert sorted(norm_scalars(model)) == sorted([f"alpha/{s}" for s in SITES] + ["embedding_scale"])
    assert norm_name(norm) == "Softsign" and not llama_expressible(norm)


def _site_modules(model) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, norms.Norm)]


def test_telemetry_counts_its_saturated_inputs_by_its_threshold(softsign):
    assert 1 / (1 + softsign.saturated_above) ** 2 == pytest.approx(norms.SATURATED_FRACTION)
    layer = softsign(3, alpha0=2.0, site="final")
    x = torch.tensor([[[0.1, 1.5, -2.0]]])  # |αx| = 0.2, 3.0, 4.0 against a threshold of ~2.76
    values = measure(layer, x)
    assert values["telemetry/saturated/final"] == pytest.approx(2 / 3)
    assert values["telemetry/alpha/final"] == 2.0 and values["telemetry/gamma_abs/final"] == 1.0


def test_the_planner_keeps_what_the_class_declares(softsign):
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192, vocab_size=500, max_seq_len=64)
    norm = norms.NormArgs(kind="softsign", alpha_attn=1.0, alpha_ffn=1.0, alpha_final=1.0, embedding_scale=True)
    estimate = activation_bytes(args, norm, 2, 64, 4, [False, False], cpu=True)
    measured = measure_activation_bytes(args, norm, 2, 64, torch.float32, [False, False])
    assert estimate["saved"] == pytest.approx(measured["saved"], rel=0.05)


def test_it_trains_logs_its_scalars_and_telemetry(softsign, tmp_path):
    cfg = load_config([*TINY, "train.max_steps=3", "logging.interval=1", "logging.telemetry_interval=3",
                       "checkpoint.interval=100", f"run_dir={tmp_path}"])
    train_here(cfg, RandomBatches(MICRO, SEQ, low=3, high=400))
    records = metrics_by_step(tmp_path)
    assert sorted(records) == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in records.values())
    last = records[3]
    assert last["alpha/attn/0"] != 1.0  # α trains
    for site in SITES:
        assert last[f"telemetry/alpha/{site}"] == pytest.approx(last[f"alpha/{site}"])
        assert 0 <= last[f"telemetry/saturated/{site}"] <= 1
