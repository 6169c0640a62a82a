"""fms_dyt.tune alpha0 and fms_dyt.study: arguments, the pick per site, the report table, resume,
the slurm sweep command, and one tiny real tune (a few probes of 3 steps)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from fms_dyt import study as S
from fms_dyt import tune as T
from fms_dyt.config import ConfigError
from fms_dyt.probe import Metric, Probe, Stopped, finished, read_metric, result_of, run_command, run_probes

REPO = Path(__file__).resolve().parent.parent
LOSS = Metric("loss", 2)


def fake_run(run_dir: Path, losses, overrides=None, checkpoint_step=None, exit_code=0, wall_s=12.0) -> Path:
    """A run directory as train.py leaves it: metrics.jsonl, a checkpoint of the last logged step
    (or ``checkpoint_step``), with ``overrides`` the config.yaml train.py would write; and the
    probe runner's exit record."""
    run_dir.mkdir(parents=True)
    if overrides is not None:
        from omegaconf import OmegaConf

        from fms_dyt.config import load_config

        cfg = load_config([*overrides, f"run_dir={run_dir}"])
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (run_dir / "metrics.jsonl").write_text("".join(
        json.dumps({"step": i + 1, "loss": v, "tokens_seen": 64 * (i + 1)}) + "\n" for i, v in enumerate(losses)))
    ckpt = run_dir / "checkpoints" / f"step_{checkpoint_step or len(losses)}"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text(json.dumps({"step": checkpoint_step or len(losses)}))
    (run_dir.parent / f"{run_dir.name}.exit.json").write_text(json.dumps({"exit": exit_code, "wall_s": wall_s}))
    return run_dir


# ---- arguments --------------------------------------------------------------------------------


def test_grid_parsing():
    assert T.parse_grid("4, 0.5,1,1") == [0.5, 1.0, 4.0]
    for bad in ("a,b", "1", "0,1", "-1,2", "1,inf"):
        with pytest.raises(ValueError, match="--grid"):
            T.parse_grid(bad)


@pytest.mark.parametrize("module, argv, flag", [
    (T, ["alpha0", "--grid", "1,x"], "--grid"),
    (T, ["alpha0", "--steps", "0"], "--steps"),
    (T, ["alpha0", "--jobs", "0"], "--jobs"),
    (T, ["alpha0", "--last", "0"], "--last"),
    (T, ["alpha0", "experiment"], "'experiment'"),
    (T, ["alpha1"], "alpha1"),
    (S, ["norms", "--variants", "dyt,nope"], "--variants"),
    (S, ["norms", "--seeds", "0"], "--seeds"),
    (S, ["alpha0-width", "--widths", "64,100"], "--widths"),
    (S, ["norms", "--preset", "tpu"], "--preset"),
    (S, ["norms", "--probe-steps", "-1"], "--probe-steps"),
])
def test_bad_arguments_exit_2_naming_the_flag(module, argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        module.parse_args(argv)
    assert e.value.code == 2
    assert flag in capsys.readouterr().err


def test_study_arguments_reach_the_runs(tmp_path):
    ns, study = S.parse_args(["norms", "--seeds", "3", "--variants", "rmsnorm,dyt_probed", "--steps", "7",
                              "--grid", "2,1", "--out", str(tmp_path), "optim.lr=1e-3"])
    assert [v.name for v in ns.variant_list] == ["rmsnorm", S.PROBED]
    assert study.seed_list() == [2023, 2024, 2025]
    run = study.run(ns.variant_list[0], 2024).command()
    # the preset first, then the user's overrides, then the variant's, so the variant's keys win
    assert run.index("model.dim=128") < run.index("optim.lr=1e-3") < run.index("norm=rmsnorm")
    assert "train.max_steps=7" in run and "checkpoint.interval=7" in run and "seed=2024" in run
    assert study.tune(ns.variant_list[1], tmp_path / "probe").grid == [1.0, 2.0]


def _raise(error: BaseException):
    raise error


@pytest.mark.parametrize("error, code, says", [
    (KeyboardInterrupt(), 130, "stopped; run the same command again to resume"),
    (ConfigError("norm.alpha_attn=-1: must be > 0"), 2, "configuration error: norm.alpha_attn=-1"),
    (T.TuneError("every probe failed"), 1, "every probe failed"),
])
def test_tune_and_study_turn_errors_into_exit_codes(error, code, says, capsys):
    assert run_command("fms_dyt.study", lambda: _raise(error), T.TuneError) == (None, code)
    assert f"fms_dyt.study: {says}" in capsys.readouterr().err
    assert run_command("fms_dyt.study", lambda: 7, T.TuneError) == (7, 0)


def test_metric_reduction_is_the_mean_of_the_last_k_records(tmp_path):
    run = fake_run(tmp_path / "r", [9.0, 5.0, 3.0, 1.0])
    assert read_metric(run, Metric("loss", 2)) == (2.0, None)
    assert read_metric(run, Metric("loss", 1)) == (1.0, None)
    value, why = read_metric(run, Metric("val/loss", 1))
    assert value is None and "'val/loss'" in why
    nan = fake_run(tmp_path / "nan", [9.0, float("nan")])
    value, why = read_metric(nan, Metric("loss", 2))
    assert value is None and "non-finite" in why


# ---- the pick and the summary ----------------------------------------------------------------


def _tune(tmp_path, grid=(1.0, 2.0, 4.0)) -> T.Tune:
    return T.Tune(["experiment=quickstart"], list(grid), 5, tmp_path, LOSS)


def _fabricate(tune: T.Tune, losses: dict) -> dict:
    """Probe run directories whose last two logged losses are ``losses[point]`` (None: NaN, and exit 1)."""
    out = {}
    for point, value in losses.items():
        probe = tune.probe(point)
        last = float("nan") if value is None else value
        fake_run(probe.run_dir, [8.0, 7.0, 6.0, last, last], exit_code=1 if value is None else 0)
        out[point] = result_of(probe, tune.metric)
    return out


def test_best_per_site_and_the_table_row(tmp_path):
    tune = _tune(tmp_path)
    P = T.Point
    assert T.joint_points(tune.grid) == [P(1, 1), P(2, 2), P(4, 4)]
    assert T.site_points(tune.grid, 2.0) == [P(1, 2), P(4, 2), P(2, 1), P(2, 4)]
    # joint best 2; along attention (other = 2) 4 wins; along FFN/final (attn = 2) 1 wins;
    # (4, 2) fails and (1, 1)'s low value is on no line through the joint best but the joint one
    losses = {P(1, 1): 5.5, P(2, 2): 5.0, P(4, 4): 5.8, P(1, 2): 5.2, P(4, 2): 4.9, P(2, 1): 4.7, P(2, 4): 5.1}
    results = _fabricate(tune, losses)
    summary = T.summarize(tune, results, 128, ["attn", "ffn"])
    assert summary["joint_best"] == 2.0
    assert summary["best"] == {"attn": 4.0, "ffn": 1.0}
    assert summary["alpha_table_row"] == [128, 4.0, 1.0]
    assert summary["overrides_best"] == ["norm.alpha_attn=4", "norm.alpha_ffn=1", "norm.alpha_final=1"]
    assert summary["reduction"] == "loss, mean of the last 2 logged values"
    T.figure(summary)  # draws with every point


def test_a_failed_probe_is_reported_with_its_log_and_all_failed_is_an_error(tmp_path):
    tune = _tune(tmp_path, (1.0, 2.0))
    P = T.Point
    results = _fabricate(tune, {P(1, 1): None, P(2, 2): 6.0, P(1, 2): 6.5, P(2, 1): 5.5})
    summary = T.summarize(tune, results, 64, ["attn", "ffn", "final"])
    failed = [p for p in summary["probes"] if p["value"] is None]
    assert [p["name"] for p in failed] == [P(1, 1).name]
    assert "exited with 1" in failed[0]["error"] and str(tune.probe(P(1, 1)).log) in failed[0]["error"]
    # joint best 2 (the only joint probe left); along FFN/final (2, 1) beats it, along attention (1, 2) does not
    assert summary["joint_best"] == 2 and summary["best"] == {"attn": 2.0, "ffn": 1.0, "final": 1.0}
    fig = T.figure(summary)
    assert any("failed" in t.get_text() for t in fig.axes[0].get_legend().get_texts())

    none = _tune(tmp_path / "all", (1.0, 2.0))
    with pytest.raises(T.TuneError, match="all 2 probes failed") as e:
        T.summarize(none, _fabricate(none, {P(1, 1): None, P(2, 2): None}), 64, ["attn"])
    assert str(none.probe(P(2, 2)).log) in str(e.value)


# ---- resume -----------------------------------------------------------------------------------


def test_finished_runs_are_not_run_again(tmp_path):
    three = ["experiment=quickstart", "train.max_steps=3"]
    done = Probe("done", three, fake_run(tmp_path / "done", [6.0, 5.0, 4.0], three))
    assert finished(done)
    assert not finished(Probe("longer", ["experiment=quickstart", "train.max_steps=4"], done.run_dir))
    assert not finished(Probe("other_lr", [*three, "optim.lr=1e-3"], done.run_dir))  # another run: train.py refuses it
    half = Probe("half", three, fake_run(tmp_path / "half", [6.0, 5.0], three, checkpoint_step=2))
    assert not finished(half)
    # a probe whose command fails at once stands for one that must run
    broken = Probe("broken", [*three, "no_such_key=1"], tmp_path / "broken")
    seen = []
    results = run_probes([done, broken], LOSS, jobs=2, echo=seen.append)
    assert results[0].ok and results[0].value == 4.5 and results[0].wall_s == 12.0
    assert not results[1].ok and "exited with" in results[1].error and str(broken.log) in results[1].error
    assert "no_such_key" in broken.log.read_text()
    assert any("done: finished before" in s for s in seen)
    assert not any(s.startswith("done: started") for s in seen)


CHECKPOINTING_RUN = """
import signal, sys, time
def stop(signum, frame):
    open(sys.argv[1], "w").write(signal.Signals(signum).name)  # stands for: finish the step, save
    sys.exit(75)
signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
time.sleep(120)
"""


class _Sleeper(Probe):
    def command(self):
        return [sys.executable, "-c", CHECKPOINTING_RUN, str(self.run_dir.parent / "got")]


def test_sigterm_to_the_tune_alone_reaches_the_runs_in_flight(tmp_path):
    import os
    import signal
    import threading
    import time

    probe = _Sleeper("sleeper", [], tmp_path / "sleeper")

    def kill_when_ready():
        while not (probe.log.is_file() and "ready" in probe.log.read_text()):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=kill_when_ready, daemon=True).start()
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Stopped, match="got SIGTERM"):
        run_probes([probe], LOSS, echo=lambda _: None)
    assert (tmp_path / "got").read_text() == "SIGTERM"  # it stopped as a run does, and was waited for
    assert signal.getsignal(signal.SIGTERM) is before
    assert run_command("fms_dyt.tune", lambda: _raise(Stopped(signal.SIGTERM)), T.TuneError) == (None, 75)


# ---- the study's report -------------------------------------------------------------------------


def test_report_table_mean_and_spread_over_seeds(tmp_path):
    study = S.Study(tmp_path, S.PRESETS["cpu"], [], 2, LOSS, 1)
    rms = [fake_run(study.run(S.NORM_VARIANTS[0], s).run_dir, [7.0, v, v], wall_s=60.0 * (i + 1))
           for i, (s, v) in enumerate(zip(study.seed_list(), (5.0, 5.4)))]
    dyt = [fake_run(study.run(S.NORM_VARIANTS[1], s).run_dir, [7.0, v, v], exit_code=1 if math.isnan(v) else 0)
           for s, v in zip(study.seed_list(), (6.0, float("nan")))]
    results = [result_of(Probe(d.name, [], d), LOSS) for d in rms + dyt]
    rows = [S.variant_row("rmsnorm", results[:2]), S.variant_row("dyt", results[2:])]
    assert rows[0]["mean"] == pytest.approx(5.2) and rows[0]["sd"] == pytest.approx(0.4 / math.sqrt(2))
    assert rows[0]["range"] == pytest.approx(0.4) and rows[0]["tokens"] == 192 and rows[0]["wall_s"] == 90.0
    assert rows[1]["ok"] == 1 and rows[1]["mean"] == 6.0 and rows[1]["sd"] is None and len(rows[1]["failed"]) == 1
    table = S.norms_table(rows + [{"variant": S.PROBED, "error": "the α₀ probe failed"}], LOSS)
    assert "| rmsnorm | 5.200 | 0.283 | 0.400 | 2/2 | 192 | 1.5 min |" in table
    assert "| dyt | 6.000 | — | — | 1/2 |" in table
    assert f"| {S.PROBED} | FAILED |" in table
    report = S.norms_report(study, rows, results, {"figures": ["loss.png"], "notes": []}, [])
    assert "![curves of every variant](curves.png)" in report and (tmp_path / "curves.png").is_file()
    assert "No telemetry figures" in report and "## Failed runs" in report and "dyt_seed2024" in report


def test_alpha0_width_trend():
    rows = [{"width": 256, "attn": 1.0, "ffn": 2.0}, {"width": 64, "attn": 4.0, "ffn": 2.0},
            {"width": 128, "attn": 2.0, "ffn": 2.0}]
    assert S.trend(rows, "attn") == "falls with width (as Table 5)"
    assert S.trend(rows, "ffn") == "does not move"
    assert S.trend(rows[:1], "attn").startswith("cannot tell")
    assert S.trend([{"width": 64, "attn": 1.0}, {"width": 128, "attn": 4.0}], "attn").startswith("rises")


# ---- slurm --------------------------------------------------------------------------------------


def test_slurm_sweep_command(tmp_path, capsys):
    code = T.main(["alpha0", "experiment=quickstart", "--launcher", "slurm", "--dry-run", "--grid", "0.5,1",
                   "--steps", "20", "--out", str(tmp_path)])
    assert code == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("slurm sweep: ")
    cmd = T.Tune(["experiment=quickstart"], [0.5, 1.0], 20, tmp_path, LOSS).slurm_command()
    assert cmd[1:6] == [str(REPO / "train.py"), "-m", "hydra/launcher=submitit_slurm", "+hydra/slurm=alpha0",
                        "experiment=quickstart"]
    for arg in ("norm.alpha_attn=0.5,1", "norm.alpha_ffn=0.5,1", "norm.alpha_final=${norm.alpha_ffn}",
                "train.max_steps=20", "checkpoint.interval=20", f"hydra.sweep.dir={tmp_path / 'probes'}"):
        assert arg in cmd
    assert not list(tmp_path.iterdir())  # a dry run submits and writes nothing


def test_slurm_subdir_is_the_local_probe_directory(tmp_path):
    """Hydra resolves the sweep's subdir per job from the job's own α₀: the directory name must be
    the one the local runner uses, so the same reader picks up the sweep's runs."""
    from hydra import compose, initialize_config_dir

    from fms_dyt.config import CONFIG_DIR

    sweep = T.Tune(["experiment=quickstart"], [0.5, 1.0], 20, tmp_path, LOSS).slurm_command()
    subdir = next(a for a in sweep if a.startswith("hydra.sweep.subdir="))
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose("train", overrides=["experiment=quickstart", "norm.alpha_attn=1", "norm.alpha_ffn=0.5",
                                          subdir], return_hydra_config=True)
    assert cfg.hydra.sweep.subdir == T.Point(1, 0.5).name == "attn1.0_other0.5"


# ---- one real tune ----------------------------------------------------------------------------


def test_tune_alpha0_end_to_end(tmp_path):
    """Four probes of 3 steps of a width-32 quickstart, ranked by the training loss."""
    argv = [sys.executable, "-m", "fms_dyt.tune", "alpha0", "experiment=quickstart", "model.dim=32", "model.ffn_dim=64",
            "train.seq_len=32", "train.global_batch_tokens=64", "train.micro_batch_size=2", "data.num_workers=0",
            "--grid", "1,4", "--steps", "3", "--metric", "loss", "--jobs", "2", "--out", str(tmp_path)]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "alpha0.json").read_text())
    assert len(summary["probes"]) == 4 and all(p["value"] is not None for p in summary["probes"]), summary["probes"]
    assert set(summary["best"]) == {"attn", "ffn", "final"}  # the quickstart is all-DyT: a final α₀ too
    assert summary["alpha_table_row"][0] == 32 and (tmp_path / "alpha0.png").stat().st_size > 0
    for p in summary["probes"]:
        config = (Path(p["run_dir"]) / "config.yaml").read_text()
        assert f"alpha_attn: {p['attn']}" in config and f"alpha_ffn: {p['other']}" in config
        assert f"alpha_final: {p['other']}" in config
    assert "best α₀ after 3 steps (loss, mean of the last 10 logged values)" in done.stdout
    again = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("finished before") == 4


def test_a_rerun_study_trains_nothing_finished_and_reports_every_variant(tmp_path):
    """``study norms`` over runs that finished before: no train.py starts, the report has every variant."""
    preset = S.Preset(overrides=("experiment=quickstart",), steps=3, probe_steps=2, grid=(1.0, 2.0), widths=(64,),
                      width_steps=2, width_grid=(1.0, 2.0), jobs=1)
    study = S.Study(tmp_path, preset, [], 2, LOSS, 1)
    variants = [S.NORM_VARIANTS[0], S.WIDTH_VARIANT]
    for v in variants:
        for seed, loss in zip(study.seed_list(), (5.0, 5.5)):
            run = study.run(v, seed)
            fake_run(run.run_dir, [7.0, loss, loss], run.overrides)
    seen = []
    done = S.run_norms(study, variants, echo=seen.append)
    assert not any("started" in s for s in seen) and sum("finished before" in s for s in seen) == 4
    report = done["report"].read_text()
    assert "| rmsnorm | 5.250 | 0.354 | 0.500 | 2/2 | 192 |" in report
    assert "| dyt_final_rmsnorm | 5.250 |" in report
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["variant"] for r in summary["rows"]] == ["rmsnorm", "dyt_final_rmsnorm"]


def test_alpha0_width_report():
    study = S.Study(Path("/tmp/w"), S.PRESETS["cpu"], [], 1, LOSS, 2)
    rows = [{"width": 64, "attn": 4.0, "ffn": 2.0, "joint_best": 4.0, "table": [1.0, 1.0], "figure": "width64/alpha0.png"},
            {"width": 128, "attn": 2.0, "ffn": 2.0, "joint_best": 2.0, "table": [1.0, 1.0], "figure": "width128/alpha0.png"},
            {"width": 256, "error": "all 10 probes failed"}]
    report = S.width_report(study, rows)
    assert "| 64 | 4 | 2 | 4 | 1, 1 |" in report and "| 256 | FAILED |" in report
    assert "- attention: the best α₀ falls with width (as Table 5)" in report
    assert "- FFN and final: the best α₀ does not move" in report
    assert "--grid 1,2,4,8 --steps 100" in report and "width 256 failed: all 10 probes failed" in report


# ---- final-scale --------------------------------------------------------------------------------

# Final losses of the fabricated grid: width -> kind -> γ₀ label -> loss of seed 2023 (2024: +0.02)
SCALE_LOSSES = {
    64: {"dyt": {"1": 6.4, "4": 5.3, "auto": 5.1, "16": 5.2}, "rmsnorm": {"1": 5.2, "4": 5.15, "auto": 5.12, "16": 5.3}},
    128: {"dyt": {"1": 6.3, "2.828": 5.0, "auto": 4.95, "11.31": 5.4},
          "rmsnorm": {"1": 4.9, "2.828": 4.8, "auto": 4.85, "11.31": 5.0}},
}


def _fabricate_scale_run(study, variant, loss, saturated):
    for i, seed in enumerate(study.seed_list()):
        run = study.run(variant, seed)
        fake_run(run.run_dir, [7.0, loss + 0.02 * i, loss + 0.02 * i], run.overrides)
        metrics = run.run_dir / "metrics.jsonl"
        *earlier, last = metrics.read_text().splitlines()
        last = {**json.loads(last), "telemetry/saturated/final": saturated, "telemetry/saturated/attn/0": saturated / 2}
        metrics.write_text("\n".join([*earlier, json.dumps(last)]) + "\n")


def test_final_scale_report_from_finished_runs(tmp_path):
    """The grid's labels and the auto value per width, the best γ₀ of each kind, the verdicts, the
    multiplier and the lr round (its γ₀ chosen from the grid) — read from runs that finished before."""
    preset = S.Preset(overrides=("model=tiny", "model.n_layers=1"), steps=3, probe_steps=2, grid=(1.0,), widths=(64, 128),
                      width_steps=2, width_grid=(1.0,), jobs=1, scale_steps=3, scale_lrs=(1e-3, 3e-4))
    study = S.Study(tmp_path, preset, [], 2, LOSS, 1)
    assert [label for label, _ in S.gamma_grid(study, 64)] == ["1", "4", "auto", "16"]
    assert [label for label, _ in S.gamma_grid(study, 128)] == ["1", "2.828", "auto", "11.31"]
    for width, kinds in SCALE_LOSSES.items():
        for kind, losses in kinds.items():
            for label, loss in losses.items():
                _fabricate_scale_run(study, S.scale_variant(width, kind, label), loss, 0.3 if label == "auto" else 0.9)
        _fabricate_scale_run(study, S.scale_variant(width, "dyt", "1", (f"model.output_multiplier={8 if width == 64 else 5.657}",),
                                                    "_multiplier"), 5.5, 0.2)
    # the lr round at the widest width (the runs' lr is optim's default 3e-4, so only 1e-3 is new)
    for kind, label, loss in (("dyt", "auto", 4.9), ("rmsnorm", "2.828", 4.85)):
        _fabricate_scale_run(study, S.scale_variant(128, kind, label, ("optim.lr=0.001",), "_lr0.001"), loss, 0.3)
    seen = []
    done = S.run_final_scale(study, [64, 128], echo=seen.append)
    assert not any("started" in s for s in seen)
    report = done["report"].read_text()
    assert "| 64 | 8 | 8 (5.110 ± 0.014) | yes | 8 (5.130 ± 0.014) | yes | -0.020 | -0.020 | 30% |" in report
    assert "| 128 | 5.66 | 5.66 (4.960 ± 0.014) | yes | 2.83 (4.810 ± 0.014) | yes | +0.100 | +0.150 | 30% |" in report
    assert "| 128 | 11.31 | 5.410 ± 0.014 (range 0.020) | 90% | 5.010 ± 0.014 (range 0.020) |" in report
    assert "- width 64: all-DyT with `norm.final_gamma0=auto` ends -0.020 nats" in report and "**matches**" in report
    assert "- width 128: all-DyT with `norm.final_gamma0=auto` ends +0.100 nats" in report and "**does not match**" in report
    assert "| 64 | 5.110 ± 0.014 (range 0.020) | 5.510 ± 0.014 (range 0.020) |" in report  # γ₀ against the multiplier
    assert "| dyt | 5.66 | 0.001 | 4.910 ± 0.014 (range 0.020) |" in report
    assert "| rmsnorm | 2.83 | 0.001 | 4.860 ± 0.014 (range 0.020) |" in report  # worse than at 3e-4
    assert "At each one's best lr: all-DyT − RMSNorm = +0.100 nats." in report  # 4.91 against 4.81
    rows = json.loads((tmp_path / "summary.json").read_text())["rows"]
    assert len(rows) == 2 * 2 * 4 + 2 + 2 and all(r["ok"] == 2 for r in rows)
