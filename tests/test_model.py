"""The LLaMA model, its norms and the α₀ schedule: parity with transformers, counts, init, gradients."""

import math

import pytest
import torch
from transformers import LlamaForCausalLM

from fms_dyt import hf
from fms_dyt.config import ConfigError, load_config, model_args, norm_args
from fms_dyt.model import ModelArgs, Transformer, count_parameters
from fms_dyt.norms import DyT, RMSNorm, alpha_from_table
from fms_dyt.ops import dyt
from fms_dyt.plan import plan

SMALL = dict(dim=64, n_layers=2, n_heads=4, ffn_dim=96, vocab_size=128, max_seq_len=32)
PAPER_TABLE = [[1024, 1.0, 1.0], [2048, 1.0, 0.5], [4096, 0.8, 0.2], [5120, 0.6, 0.15], [8192, 0.2, 0.05]]


def _rms_model(n_kv_heads, seed=3):
    from fms_dyt.norms import NormArgs

    model = Transformer(ModelArgs(**SMALL, n_kv_heads=n_kv_heads), NormArgs())
    model.init_weights(seed)
    return model


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_logits_match_transformers_llama_both_ways(n_kv_heads):
    ours = _rms_model(n_kv_heads)
    llama = LlamaForCausalLM(hf.llama_config(ours.args, ours.norm_args)).eval()
    llama.load_state_dict(hf.to_llama_state_dict(ours.state_dict()), strict=True)
    tokens = torch.randint(0, SMALL["vocab_size"], (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = llama(tokens).logits
        assert torch.allclose(ours(tokens), reference, atol=1e-4, rtol=0)
        back = Transformer(*hf.args_from_llama(llama.config))
        back.load_state_dict(hf.from_llama_state_dict(llama.state_dict()), strict=True)
        assert torch.allclose(back(tokens), reference, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "model,count",
    [("llama7b", 6_738_415_616), ("llama13b", 13_015_864_320), ("llama34b", 33_743_970_304), ("llama70b", 68_976_648_192)],
)
def test_parameter_counts_on_meta(model, count):
    rms = plan(load_config([f"model={model}", "norm=rmsnorm"]))
    assert rms["n_params"] == count and rms["alpha"] is None and rms["embedding_scale"] is False
    dyt_plan = plan(load_config([f"model={model}", "norm=dyt"]))
    n_layers = load_config([f"model={model}"]).model.n_layers
    assert dyt_plan["n_params"] - count == 2 * n_layers + 1 + 1
    assert dyt_plan["params_by_part"]["scalars"] == 2 * n_layers + 2


def test_alpha_table_rows_interpolation_and_clamping():
    assert alpha_from_table(PAPER_TABLE, 4096) == (0.8, 0.2)
    assert alpha_from_table(PAPER_TABLE, 512) == (1.0, 1.0)
    assert alpha_from_table(PAPER_TABLE, 16384) == (0.2, 0.05)
    # Linear in log2(width): 2^11.5 sits halfway between the 2048 and 4096 rows.
    attn, other = alpha_from_table(PAPER_TABLE, round(2 ** 11.5))
    assert attn == pytest.approx(0.9, abs=1e-3) and other == pytest.approx(0.35, abs=1e-3)


def test_alpha_per_site_from_config_and_command_line():
    n = norm_args(load_config(["model=llama13b", "norm=dyt"]))
    assert (n.alpha_attn, n.alpha_ffn, n.alpha_final) == (0.6, 0.15, 0.15)
    n = norm_args(load_config(["model=llama7b", "norm=dyt", "norm.alpha_attn=0.5", "norm.alpha_final=0.3"]))
    assert (n.alpha_attn, n.alpha_ffn, n.alpha_final) == (0.5, 0.2, 0.3)
    model = Transformer(model_args(load_config(["model=tiny"])), norm_args(load_config(["model=tiny", "norm.alpha_attn=0.7"])))
    assert model.layers[0].attention_norm.alpha.item() == pytest.approx(0.7)
    assert model.layers[1].ffn_norm.alpha.item() == pytest.approx(1.0)


def test_embedding_scalar_on_with_dyt_off_with_rmsnorm():
    dyt_model = Transformer(model_args(load_config(["model=tiny"])), norm_args(load_config(["model=tiny", "norm=dyt"])))
    assert dyt_model.embedding_scale.item() == pytest.approx(math.sqrt(64))
    assert isinstance(dyt_model.norm, DyT) and dyt_model.layers[0].attention_norm.alpha.numel() == 1
    rms_model = Transformer(model_args(load_config(["model=tiny"])), norm_args(load_config(["model=tiny", "norm=rmsnorm"])))
    assert rms_model.embedding_scale is None and isinstance(rms_model.norm, RMSNorm)
    off = norm_args(load_config(["norm=dyt", "norm.embedding_scale=false"]))
    assert Transformer(model_args(load_config([])), off).embedding_scale is None


def test_initialisation_is_deterministic_and_truncated():
    a, b, c = _rms_model(2, seed=5), _rms_model(2, seed=5), _rms_model(2, seed=6)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if pa.dim() == 2:
            assert not torch.equal(pa, pc), name
            assert pa.abs().max() <= 3 * 0.02 + 1e-6 and 0.015 < pa.std() < 0.025, name
        else:
            assert torch.all(pa == 1), name  # RMSNorm weights start at one


def test_meta_init_equals_eager_init():
    from fms_dyt.norms import NormArgs

    args, norm = ModelArgs(**SMALL), NormArgs(kind="dyt", alpha_attn=0.8, alpha_ffn=0.2, alpha_final=0.2, embedding_scale=True)
    eager = Transformer(args, norm)
    eager.init_weights(11)
    with torch.device("meta"):
        lazy = Transformer(args, norm)
    lazy.to_empty(device="cpu")
    lazy.init_weights(11)
    for (name, p), q in zip(eager.named_parameters(), lazy.parameters()):
        assert torch.equal(p, q), name
    assert lazy.layers[0].ffn_norm.alpha.item() == pytest.approx(0.2)


def test_initial_weights_are_the_seed_rule_bit_for_bit():
    # Checkpoints and runs depend on these weights: matrices from (seed, name) alone, norm
    # layers at their own constants, the α₀ of their site, the embedding scalar at √dim.
    import math
    import zlib

    from fms_dyt.norms import NormArgs, norm_sites

    args = ModelArgs(**SMALL)
    norm = NormArgs(kind="dyt", alpha_attn=0.8, alpha_ffn=0.3, alpha_final=0.25, beta=True, embedding_scale=True)
    model = Transformer(args, norm)
    model.init_weights(11)
    alpha0 = {site: getattr(norm, f"alpha_{site.split('/')[0]}") for site in norm_sites(model)}
    assert list(alpha0) == [f"{s}/{i}" for i in range(args.n_layers) for s in ("attn", "ffn")] + ["final"]
    for site, layer in norm_sites(model).items():
        assert torch.equal(layer.alpha, torch.full((1,), alpha0[site]))
        assert torch.equal(layer.weight, torch.ones(args.dim)) and torch.equal(layer.bias, torch.zeros(args.dim))
    assert torch.equal(model.embedding_scale, torch.full((1,), math.sqrt(args.dim)))
    for name, p in model.named_parameters():
        if p.dim() == 2:
            g = torch.Generator().manual_seed(11 * 1_000_003 + zlib.crc32(name.encode()))
            want = torch.nn.init.trunc_normal_(torch.empty(p.shape), 0.0, 0.02, -0.06, 0.06, generator=g)
            assert torch.equal(p, want), name


def test_fused_dyt_gradcheck_fp64_and_matches_plain_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 8, dtype=torch.float64, generator=g, requires_grad=True)
    alpha = torch.tensor([0.7], dtype=torch.float64, requires_grad=True)
    weight = torch.randn(8, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(8, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(dyt, (x, alpha, weight, bias))
    assert torch.autograd.gradcheck(dyt, (x, alpha, weight, None))
    plain = weight * torch.tanh(alpha * x) + bias
    assert torch.allclose(dyt(x, alpha, weight, bias), plain)


def test_dyt_layer_backward_matches_autograd_of_formula():
    layer = DyT(16, alpha0=0.5, beta=True)
    reference = DyT(16, alpha0=0.5, beta=True, impl="eager")
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    layer(x1).pow(2).sum().backward()
    reference(x2).pow(2).sum().backward()
    assert torch.allclose(x1.grad, x2.grad, atol=1e-6)
    for p, q in zip(layer.parameters(), reference.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5)


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["model.dim=100", "model.n_heads=3"], "model.dim=100"),
        (["model.n_kv_heads=3"], "model.n_kv_heads=3"),
        (["norm.name=layernorm"], "norm.name='layernorm'"),
        (["norm=dyt", "norm.alpha_ffn=0"], "norm.alpha_ffn=0"),
        (["model=llama8b"], "model/llama8b"),
        (["model.dimm=3"], "model.dimm"),
    ],
)
def test_bad_configs_fail_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace("(", r"\(").replace(".", r"\.")):
        load_config(overrides)
