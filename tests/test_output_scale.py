"""The output scale: norm.final_gamma0 (a number or auto) and model.output_multiplier, from the config
to the model's initial values, the logits of its exports and the resume guard."""

import math

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from fms_dyt.config import ConfigError, load_config, model_args, norm_args
from fms_dyt.export import export
from fms_dyt.model import Transformer
from fms_dyt.norms import NORMS, auto_final_gamma0
from fms_dyt.resume import check_same_run

SMALL = ["model=tiny", "model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.ffn_dim=64", "model.vocab_size=96"]
TOKENS = torch.randint(0, 96, (2, 17), generator=torch.Generator().manual_seed(0))


def test_auto_keeps_the_logit_scale_of_the_width_4096_model_and_never_goes_below_1():
    assert auto_final_gamma0(64, 0.02) == pytest.approx(8.0)
    assert auto_final_gamma0(128, 0.02) == pytest.approx(math.sqrt(32))
    assert auto_final_gamma0(256, 0.02) == pytest.approx(4.0)
    for width in (4096, 5120, 6656, 8192):  # the paper's 7B-70B: γ₀ 1, as it trains them
        assert auto_final_gamma0(width, 0.02) == 1.0
    # the rule holds γ₀ · init_std · √width fixed: half the init_std, twice the γ₀
    assert auto_final_gamma0(256, 0.01) == pytest.approx(8.0)


@pytest.mark.parametrize("kind", sorted(NORMS))  # every registered kind
def test_only_the_final_norm_starts_at_gamma0_for_every_kind(kind):
    cfg = load_config([*SMALL, f"norm={kind}", "norm.final_gamma0=auto"])
    norm = norm_args(cfg)
    assert norm.final_gamma0 == pytest.approx(auto_final_gamma0(32, 0.02)) == pytest.approx(math.sqrt(128))
    model = Transformer(model_args(cfg), norm)
    assert torch.all(model.norm.weight == torch.tensor(norm.final_gamma0))
    for block in model.layers:
        assert torch.all(block.attention_norm.weight == 1) and torch.all(block.ffn_norm.weight == 1)
    # a materialised meta model gets the same values (the sharded path)
    with torch.device("meta"):
        meta = Transformer(model_args(cfg), norm)
    assert torch.equal(meta.initial_value("norm.weight", meta.norm.weight, seed=0), model.norm.weight.detach())


@pytest.mark.parametrize("value", ["big", "0", "-2"])
def test_a_bad_final_gamma0_names_the_key(value):
    with pytest.raises(ConfigError, match=r"norm\.final_gamma0=.*> 0.*auto"):
        load_config([*SMALL, "norm=dyt", f"norm.final_gamma0={value}"])


def test_a_bad_output_multiplier_names_the_key():
    with pytest.raises(ConfigError, match=r"model\.output_multiplier=0"):
        load_config([*SMALL, "model.output_multiplier=0"])


def test_the_output_multiplier_scales_the_logits_and_gamma0_scales_them_at_init():
    plain = Transformer(model_args(load_config(SMALL)), norm_args(load_config(SMALL)))
    doubled = Transformer(model_args(load_config([*SMALL, "model.output_multiplier=2.5"])), plain.norm_args)
    scaled = Transformer(plain.args, norm_args(load_config([*SMALL, "norm.final_gamma0=2.5"])))
    with torch.no_grad():
        reference = plain(TOKENS)
        assert torch.allclose(doubled(TOKENS), 2.5 * reference, atol=1e-5)
        assert torch.allclose(scaled(TOKENS), 2.5 * reference, atol=1e-5)


def _trained_like(cfg) -> Transformer:
    """A model of ``cfg`` whose parameters moved away from their initial values (γ included)."""
    model = Transformer(model_args(cfg), norm_args(cfg))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return model.eval()


@pytest.mark.parametrize("fmt, overrides", [
    ("fms_dyt", ["norm=dyt", "norm.final_gamma0=auto", "model.output_multiplier=1.5"]),
    ("llama", ["norm=rmsnorm", "norm.final_gamma0=3", "model.output_multiplier=1.5"]),
])
def test_exports_reproduce_the_logits(tmp_path, fmt, overrides):
    model = _trained_like(load_config([*SMALL, *overrides]))
    assert export(model, tmp_path / "out", fmt) == fmt
    loaded = (LlamaForCausalLM.from_pretrained(tmp_path / "out") if fmt == "llama"
              else AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(TOKENS).logits, model(TOKENS), atol=1e-4, rtol=0)


@pytest.mark.parametrize("change", ["norm.final_gamma0=2", "model.output_multiplier=2"])
def test_the_resume_guard_refuses_another_output_scale(tmp_path, change):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    same_run = ["experiment=quickstart", f"run_dir={run_dir}", "norm.final_gamma0=auto"]
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(load_config(same_run)))
    check_same_run(load_config(same_run), run_dir)  # the same setting resumes
    key = change.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{key}: .* -> 2"):
        check_same_run(load_config([*same_run, change]), run_dir)
