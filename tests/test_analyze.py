"""python -m fms_dyt.analyze on two tiny trained runs (DyT and RMSNorm): every figure, its series, the report."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch

from fms_dyt.analysis import figures as F
from fms_dyt.analysis.activations import capture_norm_io, default_sites, parse_sites
from fms_dyt.analysis.runs import AnalysisError, load_run, read_metrics
from fms_dyt.analyze import analyze, main
from fms_dyt.inference import load_for_inference
from fms_dyt.config import load_config
from fms_dyt.eval.report import averages, default_output, metric_rows, write_json
from helpers import CountedBatches, train_here

REPO = Path(__file__).resolve().parent.parent

SEQ, MICRO, LAYERS, STEPS = 32, 2, 2, 6


class RepeatedHalves(CountedBatches):
    """An in-memory source with something to learn: each row is a random half-sequence said twice."""

    def __iter__(self):
        while True:
            half = torch.randint(3, 400, (MICRO, SEQ // 2 + 1), generator=torch.Generator().manual_seed(self.i))
            row = torch.cat([half, half], dim=1)[:, : SEQ + 1]
            self.i += 1
            yield row[:, :-1], row[:, 1:]


def _train(run_dir: Path, norm: str) -> Path:
    cfg = load_config([
        "model=tiny", f"model.n_layers={LAYERS}", f"norm={norm}", f"train.seq_len={SEQ}",
        f"train.micro_batch_size={MICRO}", f"train.global_batch_tokens={SEQ * MICRO}", f"train.max_steps={STEPS}",
        "parallel.param_dtype=float32", "logging.interval=1", "logging.wandb.mode=disabled", "optim.lr=3e-3",
        "optim.warmup_steps=2", "checkpoint.interval=3", "checkpoint.keep=0", f"run_dir={run_dir}",
    ])
    train_here(cfg, RepeatedHalves())
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return _train(root / "dyt", "dyt"), _train(root / "rms", "rmsnorm")


@pytest.fixture(scope="module")
def analysis(runs, tmp_path_factory):
    return analyze(list(runs), tmp_path_factory.mktemp("report"), batch="random", batch_size=2)


def series(ax, kind="lines"):
    items = ax.get_lines() if kind == "lines" else ax.collections
    return [a for a in items if a.get_gid() == "series"]


def test_every_figure_is_written_and_not_blank(analysis):
    assert set(analysis.figures) == {
        "loss.png", "alpha_dyt.png", "alpha_depth.png",
        "norm_io_token_dyt.png", "norm_io_channel_dyt.png", "norm_io_token_rms.png", "norm_io_channel_rms.png",
        "telemetry_dyt.png", "telemetry_rms.png",  # the trainer's telemetry pass at the last step
    }
    for name in analysis.figures:
        image = matplotlib.image.imread(analysis.out / name)
        assert image.shape[0] > 300 and image.shape[1] > 500, name
        assert image[..., :3].std() > 0.05, f"{name} looks blank"


def test_the_report_embeds_every_figure_and_links_nothing_missing(analysis):
    text = analysis.report.read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert sorted(links) == sorted(analysis.figures)
    assert all((analysis.out / link).is_file() for link in links)
    assert "| final loss (mean of last 10 logged) |" in text
    assert "uniformly random token ids (--batch random)" in text


def test_loss_figure_has_both_runs_raw_and_smoothed_and_their_difference(analysis, runs):
    top, bottom = analysis.figures["loss.png"].axes
    assert len(series(top)) == 2 and len(series(top, "collections")) == 2
    assert [line.get_label() for line in series(top)] == ["DyT α₀ attn 1, other 1 · dyt", "RMSNorm · rms"]
    logged = [r["loss"] for r in read_metrics(runs[0] / "metrics.jsonl").records]
    assert np.allclose(series(top, "collections")[0].get_offsets()[:, 1], logged)
    assert len(series(bottom)) == 1  # RMSNorm minus DyT; the zero line is a reference
    assert [ln.get_gid() for ln in bottom.get_lines()].count("reference") == 1


def test_alpha_figures_follow_every_layer_and_match_the_checkpoint(analysis, runs):
    attn, other, scale = analysis.figures["alpha_dyt.png"].axes[:3]
    assert len(series(attn)) == LAYERS
    assert len(series(other)) == LAYERS + 1  # FFN norms and the final norm
    assert len(series(scale)) == 1
    depth = analysis.figures["alpha_depth.png"].axes[0]
    attn_line, ffn_line, final_point = series(depth)
    model, _, _ = load_for_inference(runs[0])
    layers = model.model.layers
    assert np.allclose(attn_line.get_ydata(), [layer.attention_norm.alpha.item() for layer in layers])
    assert np.allclose(ffn_line.get_ydata(), [layer.ffn_norm.alpha.item() for layer in layers])
    assert final_point.get_ydata()[0] == pytest.approx(model.model.norm.alpha.item())
    # The checkpoint is the last step, so the α plotted over training ends where the depth plot is.
    last = read_metrics(runs[0] / "metrics.jsonl").records[-1]
    assert last["alpha/attn/1"] == pytest.approx(layers[1].attention_norm.alpha.item())


@pytest.mark.parametrize("run,norm", [("dyt", "dyt"), ("rms", "rmsnorm")])
def test_norm_maps_have_a_panel_per_site_and_the_right_curves(analysis, run, norm):
    for color_by in ("token", "channel"):
        axes = [ax for ax in analysis.figures[f"norm_io_{color_by}_{run}.png"].axes if ax.get_visible()]
        assert len(axes) == len(default_sites(LAYERS)) == 5
        for ax in axes:
            dots = series(ax, "collections")
            assert len(dots) == 1 + 4  # grey sample + four coloured tokens or channels
            curves = series(ax)
            assert len(curves) == (1 if norm == "dyt" else 0)
            if norm == "dyt":  # the α of the drawn curve tanh(αx), read back from one of its points
                cx, cy = curves[0].get_data()
                mid = np.argmin(np.abs(np.abs(cy) - 0.5))
                alpha = np.arctanh(cy[mid]) / cx[mid]
            for group in dots[1:]:
                x, y = group.get_offsets().T
                if norm == "dyt":  # every point sits on the drawn curve
                    assert np.allclose(y, np.tanh(alpha * x), atol=1e-4)
                elif color_by == "token":  # one token under RMSNorm: a line through 0 of slope 1/RMS
                    slope = y / x
                    assert np.allclose(slope, slope[0], rtol=1e-3)


def test_captured_inputs_are_what_the_norm_layers_receive(runs):
    model, _, _ = load_for_inference(runs[0])
    t = model.model
    tokens = torch.randint(0, 400, (2, SEQ), generator=torch.Generator().manual_seed(1))
    caps = capture_norm_io(t, tokens, ["attn/0", "final"], max_tokens=20, seed=3)
    rows = caps[0].sequences * SEQ + caps[0].positions
    with torch.no_grad():
        embedded = (t.tok_embeddings(tokens) * t.embedding_scale).reshape(-1, t.args.dim)[rows]
    assert torch.allclose(caps[0].x, embedded)
    assert torch.equal(caps[0].token_ids, tokens.reshape(-1)[rows])
    assert torch.allclose(caps[1].y, torch.tanh(t.norm.alpha * caps[1].x))
    assert caps[1].x.shape == (20, t.args.dim) and caps[0].alpha == pytest.approx(t.layers[0].attention_norm.alpha.item())


def _fake_eval(run_dir: Path, step: int, scores: dict, limit=None) -> Path:
    """A results file in eval/zero_shot.py's format (its rows and averages from its own functions)."""
    results = {task: {f"{metric},none": value for metric, value in metrics.items()} for task, metrics in scores.items()}
    tasks = list(scores)
    rows = metric_rows(results, tasks)
    report = {
        "checkpoint": {"kind": "training", "run_dir": str(run_dir), "step": step},
        "evaluation": {"limit": limit}, "tasks": {t: {"version": 1} for t in tasks},
        "rows": rows, "averages": averages(rows, tasks),
    }
    path = default_output(report["checkpoint"], limit)
    write_json(report, path)
    return path


def test_results_table_from_eval_files(runs, tmp_path):
    dyt, rms = tmp_path / "dyt", tmp_path / "rms"
    shutil.copytree(runs[0], dyt)
    shutil.copytree(runs[1], rms)
    _fake_eval(dyt, 3, {"piqa": {"acc": 0.1, "acc_norm": 0.2}, "boolq": {"acc": 0.3}})
    _fake_eval(dyt, STEPS, {"piqa": {"acc": 0.5, "acc_norm": 0.6}, "boolq": {"acc": 0.7}}, limit=10)
    _fake_eval(dyt, STEPS, {"piqa": {"acc": 0.55, "acc_norm": 0.65}, "boolq": {"acc": 0.75}})
    (dyt / "eval" / "notes.json").write_text('{"not": "a results file"}')
    result = analyze([dyt, rms], tmp_path / "out", checkpoints=False)
    text = result.report.read_text()
    table = text.split("## Zero-shot results")[1]
    # the full evaluation of the newest step wins over the --limit one and the older step
    assert "| average, primary metric per task | 0.7000 (2 tasks) | — |" in table
    assert "| average, OpenLLaMA (all metric rows) | 0.6500 (3 rows) | — |" in table
    assert "| piqa (acc_norm) | 0.6500 | — |" in table
    losses = [r["loss"] for r in read_metrics(dyt / "metrics.jsonl").records]
    assert f"| primary average / final loss (as Table 4) | 0.700 / {np.mean(losses[-10:]):.2f} | — |" in table
    assert "skipped `notes.json: KeyError" in table
    assert set(result.figures) == {"loss.png", "alpha_dyt.png", "telemetry_dyt.png", "telemetry_rms.png"}
    assert "--no-checkpoint" in text


def test_a_checkpoint_directory_ends_the_curves_at_its_step(runs):
    run = load_run(runs[1] / "checkpoints" / "step_3")
    assert run.name == "rms@step_3" and run.norm.kind == "rmsnorm"
    assert [r["step"] for r in run.metrics.records] == [1, 2, 3]


def test_unreadable_metrics_lines_are_skipped_counted_and_reported(runs, tmp_path):
    run = tmp_path / "rms"
    shutil.copytree(runs[1], run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 1.0, "tokens_se')  # a record cut short by a kill
    m = read_metrics(run / "metrics.jsonl")
    assert m.unreadable == 1 and len(m.records) == STEPS
    result = analyze([run], tmp_path / "out", checkpoints=False)
    assert "1 unreadable line(s) of metrics.jsonl skipped" in result.report.read_text()


def test_run_data_is_used_when_asked_and_auto_falls_back_saying_why(runs, tmp_path, monkeypatch):
    import fms_dyt.data

    seen = {}

    def fake_loader(data, tokenizer, *, seq_len, micro_batch_size, seed, rank, world_size):
        seen.update(data=data.name, seq_len=seq_len, micro=micro_batch_size, seed=seed, world=world_size)
        return iter([(torch.full((micro_batch_size, seq_len), 7), None)])

    monkeypatch.setattr(fms_dyt.data, "build_dataloader", fake_loader)
    monkeypatch.setattr("fms_dyt.analysis.activations.token_namer", lambda run: None)
    from fms_dyt.analysis.activations import analysis_batch

    run = load_run(runs[0])
    tokens, where, from_run = analysis_batch(run, "run", 2, None, 32000)
    assert from_run and torch.equal(tokens, torch.full((2, SEQ), 7))
    assert seen == {"data": "sample", "seq_len": SEQ, "micro": 2, "seed": 2023, "world": 1}
    assert "from the run's data (data=sample" in where

    def broken(*args, **kwargs):
        raise FileNotFoundError("no corpus at /nowhere")

    monkeypatch.setattr(fms_dyt.data, "build_dataloader", broken)
    tokens, where, from_run = analysis_batch(run, "auto", 2, 16, 500)
    assert not from_run and tokens.shape == (2, 16) and int(tokens.max()) < 500
    assert "the run's data loader failed: FileNotFoundError: no corpus at /nowhere" in where
    with pytest.raises(AnalysisError, match="--batch run: the run's data loader failed"):
        analysis_batch(run, "run", 2, 16, 500)


def test_site_selection():
    assert default_sites(4) == ["attn/0", "ffn/0", "attn/2", "ffn/2", "attn/3", "ffn/3", "final"]
    assert parse_sites("attn:first, ffn:mid,attn:-1,final,attn:0", 4) == ["attn/0", "ffn/2", "attn/3", "final"]
    with pytest.raises(AnalysisError, match="layers 0..3"):
        parse_sites("attn:4", 4)
    with pytest.raises(AnalysisError, match="write attn:<layer>"):
        parse_sites("mlp:1", 4)


def test_smoothing_is_a_centred_mean_that_keeps_the_ends():
    y = np.array([0.0, 0.0, 3.0, 0.0, 0.0, 6.0])
    assert np.allclose(F.smooth(y, 3), [0, 1, 1, 1, 2, 3])
    assert np.allclose(F.smooth(y, 1), y)


def test_cli_errors_name_the_bad_run(tmp_path, capsys):
    assert main([str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"RUN {tmp_path / 'missing'} is not a directory" in err
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "not a training run (no config.yaml or metrics.jsonl)" in capsys.readouterr().err


def test_a_bad_site_fails_before_any_figure(runs, tmp_path, capsys):
    assert main([str(runs[0]), "--out", str(tmp_path / "o"), "--sites", "attn:0,ffn:9"]) == 2
    assert "--sites item 'ffn:9': the model has layers 0..1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_writes_the_report(runs, tmp_path, capsys):
    assert main([str(runs[1]), "--out", str(tmp_path / "o"), "--no-checkpoint", "--smooth", "3"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == [str(tmp_path / "o" / "loss.png"), str(tmp_path / "o" / "telemetry_rms.png"),
                                f"report: {tmp_path / 'o' / 'report.md'}",
                                "note: --no-checkpoint: no input/output maps and no α against depth"]
    assert "centred moving average over 3 logged points" in (tmp_path / "o" / "report.md").read_text()
    with pytest.raises(SystemExit):
        main([str(runs[1]), "--out", str(tmp_path / "o"), "--points", "0"])
    assert "--points=0 must be positive" in capsys.readouterr().err


def test_exported_models_get_maps_and_alpha_but_no_curves(runs, tmp_path):
    from fms_dyt.export import export

    for run, fmt in ((runs[0], "fms_dyt"), (runs[1], "llama")):
        model, _, _ = load_for_inference(run)
        assert export(model.model, tmp_path / run.name, fmt) == fmt
    result = analyze([tmp_path / "dyt", tmp_path / "rms"], tmp_path / "out", batch="auto", sites="attn:0,final")
    assert set(result.figures) == {"alpha_depth.png", "norm_io_token_dyt.png", "norm_io_channel_dyt.png",
                                   "norm_io_token_rms.png", "norm_io_channel_rms.png"}
    assert len([ax for ax in result.figures["norm_io_token_rms.png"].axes if ax.get_visible()]) == 2
    text = result.report.read_text()
    assert "is an exported model without a data config" in text
    assert "dyt: no logged training loss (exported model)" in text
    assert "| checkpoint | exported model | exported model |" in text
