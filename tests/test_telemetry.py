"""fms_dyt.telemetry: the values of a pass, the keys a run logs, the warnings, the analysis figure."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from fms_dyt.analyze import analyze
from fms_dyt.config import ConfigError, load_config, model_args, norm_args
from fms_dyt.model import Transformer
from fms_dyt.norms import DyT, RMSNorm
from fms_dyt.parallel import free_port
from fms_dyt.telemetry import Telemetry, measure
from fms_dyt.trainer import train
from helpers import CountedBatches, RandomBatches, metrics_by_step, train_here

SEQ, MICRO, LAYERS, STEPS = 16, 2, 2, 5
SITES = [f"{kind}/{i}" for i in range(LAYERS) for kind in ("attn", "ffn")] + ["final"]
TINY = ["model=tiny", f"model.n_layers={LAYERS}", f"train.seq_len={SEQ}", f"train.micro_batch_size={MICRO}",
        f"train.global_batch_tokens={SEQ * MICRO}", "parallel.param_dtype=float32", "logging.wandb.mode=disabled",
        "optim.lr=3e-3", "optim.warmup_steps=2"]


class SplitBatches(CountedBatches):
    """Global batch g (two micro-batches) is fixed by g; each rank takes its share of it, so one and
    two ranks train alike."""

    def __init__(self, rank: int = 0, world: int = 1):
        super().__init__()
        self.rank, self.world = rank, world

    def __iter__(self):
        while True:
            g, micro = divmod(self.i, 2 // self.world)
            rows = torch.randint(3, 400, (2 * MICRO, SEQ + 1), generator=torch.Generator().manual_seed(g))
            start = (micro * self.world + self.rank) * MICRO
            self.i += 1
            yield rows[start:start + MICRO, :-1], rows[start:start + MICRO, 1:]


def _rank_worker(rank: int, world: int, port: int, overrides: list[str]) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    assert train(load_config(overrides), data=SplitBatches(rank, world)) == 0


def test_two_fsdp_ranks_log_the_telemetry_of_one_process(tmp_path):
    overrides = [*TINY, "norm=dyt", f"train.global_batch_tokens={2 * SEQ * MICRO}", "train.max_steps=2",
                 "logging.telemetry_interval=1", "checkpoint.interval=100"]
    for world in (1, 2):
        mp.start_processes(_rank_worker, args=(world, free_port(), [*overrides, f"run_dir={tmp_path / str(world)}"]),
                           nprocs=world, start_method="spawn")
    one, two = metrics_by_step(tmp_path / "1"), metrics_by_step(tmp_path / "2")
    assert sorted(one) == sorted(two) == [1, 2]
    for step in one:
        keys = _telemetry_keys(one[step]) - {"telemetry/time_s"}
        assert keys == _telemetry_keys(two[step]) - {"telemetry/time_s"} and len(keys) == 4 * len(SITES)
        assert {k: two[step][k] for k in keys} == pytest.approx({k: one[step][k] for k in keys}, rel=1e-5, abs=1e-6)


def _train(run_dir: Path, *overrides: str) -> Path:
    cfg = load_config([*TINY, f"train.max_steps={STEPS}", "logging.interval=10", "logging.telemetry_interval=2",
                       "checkpoint.interval=100", f"run_dir={run_dir}", *overrides])
    train_here(cfg, RandomBatches(MICRO, SEQ, low=3, high=400))
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("telemetry_runs")
    return {"dyt": _train(root / "dyt", "norm=dyt"), "rmsnorm": _train(root / "rms", "norm=rmsnorm")}


def _telemetry_keys(record: dict) -> set[str]:
    return {k for k in record if k.startswith("telemetry/")}


def test_a_dyt_run_logs_every_quantity_of_every_site_at_the_interval_steps_and_the_last(runs):
    records = metrics_by_step(runs["dyt"])
    assert sorted(records) == [2, 4, 5]  # logging.interval 10: only the telemetry steps and the last are written
    expected = {f"telemetry/{q}/{site}" for q in ("input_rms", "saturated", "alpha", "gamma_abs") for site in SITES}
    for step, record in records.items():
        assert _telemetry_keys(record) == expected | {"telemetry/time_s"}, step
        assert "loss" in record and record["telemetry/alpha/final"] == pytest.approx(record["alpha/final"])
    assert records[2]["telemetry/input_rms/attn/0"] != records[5]["telemetry/input_rms/attn/0"]  # the model moved


def test_an_rmsnorm_run_logs_the_input_rms_only(runs):
    records = metrics_by_step(runs["rmsnorm"])
    assert sorted(records) == [2, 4, 5]
    for record in records.values():
        assert _telemetry_keys(record) == {f"telemetry/input_rms/{s}" for s in SITES} | {"telemetry/time_s"}


def test_null_disables_telemetry_and_an_interval_below_one_is_refused(tmp_path):
    run_dir = _train(tmp_path / "off", "norm=dyt", "logging.telemetry_interval=null")
    assert sorted(metrics_by_step(run_dir)) == [5] and not _telemetry_keys(metrics_by_step(run_dir)[5])
    with pytest.raises(ConfigError, match=r"logging.telemetry_interval=0 must be >= 1"):
        load_config([*TINY, "logging.telemetry_interval=0"])


def test_saturated_fraction_input_rms_and_parameters_equal_a_hand_computation():
    layer = DyT(4, alpha0=0.5, site="final")
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([2.0, -2.0, 1.0, -3.0]))
    x = torch.tensor([[[-9.0, -4.5, -3.9, 0.0], [1.0, 4.1, 4.0, 8.0]]])  # |0.5 x| > 2 for -9, -4.5, 4.1, 8
    values = measure(layer, x)
    assert values == pytest.approx({
        "telemetry/input_rms/final": (x.pow(2).sum().item() / 8) ** 0.5,
        "telemetry/saturated/final": 4 / 8,
        "telemetry/alpha/final": 0.5,
        "telemetry/gamma_abs/final": 2.0,
    })
    rms_only = {"telemetry/input_rms/final": values["telemetry/input_rms/final"]}
    assert measure(RMSNorm(4, site="final"), x) == pytest.approx(rms_only)


def test_warnings_fire_once_on_a_stuck_saturated_model_and_not_on_a_fresh_one(caplog):
    cfg = load_config([*TINY, "norm=dyt"])
    model = Transformer(model_args(cfg), norm_args(cfg))
    model.init_weights(0)
    inputs = torch.randint(3, 400, (MICRO, SEQ), generator=torch.Generator().manual_seed(0))
    telemetry = Telemetry(inputs, interval=1, total_steps=10, warn=True)
    assert telemetry.plateau_steps == 2
    with caplog.at_level(logging.WARNING, logger="fms_dyt"):
        fresh = telemetry(model, step=1)
        assert max(fresh[f"telemetry/saturated/{s}"] for s in SITES) < 0.5
        assert not caplog.records
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("alpha"):
                    p.fill_(1000.0)
            model.tok_embeddings.weight.mul_(1000.0)
        telemetry(model, step=2)
        assert [r.getMessage() for r in caplog.records if "are saturated" in r.getMessage()] == []  # not yet a plateau
        telemetry(model, step=3)
        telemetry(model, step=4)
        messages = [r.getMessage() for r in caplog.records]
        telemetry(model, step=5)
    saturated = [m for m in messages if "are saturated" in m]
    grown = [m for m in messages if "has grown" in m]
    assert len(saturated) == len(SITES) and all("step 4:" in m and "since step 2" in m for m in saturated)
    assert len(grown) >= 1 and "since step 1" in grown[0]  # the residual stream grew 1000x
    # the remedies, the output scale first
    assert 0 < saturated[0].index("norm.final_gamma0=auto") < saturated[0].index("norm.final=rmsnorm")
    assert len(caplog.records) == len(messages)  # once per site and condition, not again at step 5


def test_a_resumed_run_measures_growth_from_the_runs_first_pass_and_replays_silently(caplog):
    logged = [{"step": 10, "loss": 7.0, "telemetry/input_rms/final": 1.0},
              {"step": 20, "loss": 6.0},
              {"step": 30, "telemetry/input_rms/final": 150.0}]  # warned about before the resume
    telemetry = Telemetry(torch.zeros(1, 1, dtype=torch.long), interval=10, total_steps=100, warn=True)
    with caplog.at_level(logging.WARNING, logger="fms_dyt"):
        telemetry.replay(logged)
        assert not caplog.records
        telemetry._check({"telemetry/input_rms/final": 120.0}, step=40)  # 120x the first pass, not 0.8x the last
    assert [r.getMessage() for r in caplog.records if "has grown 120x since step 10" in r.getMessage()], caplog.text


def test_the_analysis_draws_each_runs_telemetry_and_notes_a_run_without(runs, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(runs["dyt"] / "config.yaml", bare / "config.yaml")
    stripped = [{k: v for k, v in r.items() if not k.startswith("telemetry/")} for r in metrics_by_step(runs["dyt"]).values()]
    (bare / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stripped))
    result = analyze([runs["dyt"], runs["rmsnorm"], bare], tmp_path / "report", checkpoints=False)
    dyt, rms = result.figures["telemetry_dyt.png"], result.figures["telemetry_rms.png"]
    assert "telemetry_bare.png" not in result.figures
    assert any("bare: no telemetry/ keys" in note for note in result.notes)
    panels = [ax for ax in dyt.axes if ax.get_visible() and ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["input RMS of each norm (log scale)", "fraction of inputs saturated",
                                                 "α of each norm", "mean |γ| of each norm"]
    lines = [ln for ln in panels[0].get_lines() if ln.get_gid() == "series"]
    assert len(lines) == len(SITES) and list(lines[0].get_xdata()) == [2, 4, 5]
    assert list(lines[0].get_ydata()) == [r["telemetry/input_rms/attn/0"] for r in metrics_by_step(runs["dyt"]).values()]
    assert [ax.get_title() for ax in rms.axes if ax.get_visible() and ax.get_title()] == [panels[0].get_title()]
    report = result.report.read_text()
    assert "![telemetry of the norm sites, dyt](telemetry_dyt.png)" in report
    assert (result.out / "telemetry_rms.png").stat().st_size > 10_000
