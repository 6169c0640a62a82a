"""norm.final: DyT blocks with an RMSNorm final norm, from the model to training, resume, export,
evaluation and analysis."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from fms_dyt import hf
from fms_dyt.analyze import analyze
from fms_dyt.metrics import norm_scalars
from fms_dyt.model import ModelArgs, Transformer
from fms_dyt.norms import DyT, NormArgs, RMSNorm
from helpers import losses, metrics_by_step, tiny_sample_run, train_py, trained

REPO = Path(__file__).resolve().parent.parent
STEPS, INTERVAL = 4, 2
TRAIN = tiny_sample_run("norm=dyt", "norm.final=rmsnorm", "tokenizer=sample", "model.vocab_size=8000", "optim.lr=3e-3",
                        f"validation.interval={INTERVAL}", "validation.tokens=330", steps=STEPS, interval=INTERVAL)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return trained(tmp_path_factory.mktemp("final_rmsnorm") / "run", *TRAIN)


def test_blocks_and_final_norm_are_built_per_site():
    norm = NormArgs(kind="dyt", final="rmsnorm", alpha_attn=0.5, alpha_ffn=0.25, embedding_scale=True)
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=2, ffn_dim=64, vocab_size=64), norm)
    assert all(isinstance(block.attention_norm, DyT) and isinstance(block.ffn_norm, DyT) for block in model.layers)
    assert isinstance(model.norm, RMSNorm) and model.embedding_scale is not None
    assert set(norm_scalars(model)) == {"alpha/attn/0", "alpha/attn/1", "alpha/ffn/0", "alpha/ffn/1", "embedding_scale"}
    assert norm.alpha0() == {"attn": 0.5, "ffn": 0.25}
    # Plain LlamaForCausalLM only where every site is RMSNorm and there is no scalar.
    assert hf.llama_expressible(NormArgs(kind="rmsnorm", final="rmsnorm"))
    assert not hf.llama_expressible(NormArgs(kind="rmsnorm", final="dyt", alpha_final=1.0))
    assert not hf.llama_expressible(NormArgs(kind="dyt", final="rmsnorm"))


def test_trains_and_resumes_with_the_losses_of_an_uninterrupted_run(run_dir, resumed_copy):
    uninterrupted = losses(run_dir)
    assert sorted(uninterrupted) == list(range(1, STEPS + 1))
    val = {step: r["val/loss"] for step, r in metrics_by_step(run_dir).items() if "val/loss" in r}
    assert val[STEPS] < val[INTERVAL]  # it learns: the loss on the same held-out windows falls
    # Stopped after its first checkpoint: a copy of the run without the last checkpoint and steps.
    again = losses(resumed_copy(run_dir, STEPS, INTERVAL, lambda copy: train_py(copy, *TRAIN)))
    for step in range(INTERVAL + 1, STEPS + 1):
        assert again[step] == pytest.approx(uninterrupted[step], rel=1e-5), step


def test_the_resume_guard_refuses_another_final_norm(run_dir):
    before = (run_dir / "config.yaml").read_text()
    done = train_py(run_dir, *TRAIN, "norm.final=null")
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-3000:]
    assert "norm.final" in done.stderr
    assert (run_dir / "config.yaml").read_text() == before


def test_export_loads_with_remote_code_and_gives_the_same_logits(run_dir, exported_fms_dyt):
    config, theirs = exported_fms_dyt(run_dir, "norm.final=rmsnorm")
    assert config["norm"]["final"] == "rmsnorm"
    assert isinstance(theirs.model.norm, RMSNorm) and isinstance(theirs.model.layers[0].ffn_norm, DyT)


def test_zero_shot_runs_on_the_bundled_tiny_task(run_dir, tiny_zero_shot):
    assert tiny_zero_shot(run_dir)["model"]["norm"]["final"] == "rmsnorm"


def test_analysis_labels_the_final_norm_and_draws_its_maps(run_dir, tmp_path):
    result = analyze([run_dir], tmp_path / "report", batch_size=1, max_tokens=64, points=200)
    report = (tmp_path / "report" / "report.md").read_text()
    assert "DyT, final RMSNorm" in report
    assert "1 / 1 / —" in report  # α₀ attention / FFN / final: the final norm has none
    assert any(name.startswith("norm_io_token") for name in result.figures)
    assert "alpha_depth.png" in result.figures  # α of the DyT blocks against depth, without a final α


def test_quickstart_check_measures_saturation_at_the_dyt_layers_only(run_dir):
    sys.path.insert(0, str(REPO / "bench"))
    import quickstart_check

    saturated = quickstart_check.saturation(run_dir, batch_size=1)
    assert sorted(saturated) == ["attn/0", "attn/1", "ffn/0", "ffn/1"]  # not the RMSNorm final norm
    assert all(0.0 <= fraction <= 1.0 for fraction in saturated.values())
