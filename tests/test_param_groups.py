"""optim's parameter groups: which parameter decays and at which lr, training and resuming with
them, old one-group checkpoints, and the check of the lr multiplier."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from fms_dyt.checkpoint import Checkpointer
from fms_dyt.config import load_config, model_args, norm_args
from fms_dyt.model import Transformer
from fms_dyt.optim import build_optimizer, lr_at
from helpers import metrics_by_step, tiny_sample_run, train_py

STEPS, INTERVAL, SCALE = 4, 2, 4.0
GROUPS = ["optim.decay_alpha_and_shift=false", "optim.decay_norm_weights=false",
          "optim.decay_embedding_scale=false", f"optim.alpha_and_shift_lr_scale={SCALE}"]
TRAIN = tiny_sample_run("norm=derf", *GROUPS, steps=STEPS, interval=INTERVAL)


def _model_and_config(*overrides):
    cfg = load_config(["model=tiny", "model.n_layers=2", "norm=derf", "norm.final=rmsnorm", *overrides])
    return Transformer(model_args(cfg), norm_args(cfg)), cfg


def _role(name: str) -> str:
    """The role a parameter of the tiny Derf model (final RMSNorm) should have, from its name."""
    if name.endswith((".alpha", ".shift")):
        return "alpha_and_shift"
    if "_norm." in name or name.startswith("norm."):
        return "norm_weights"  # γ and β of Derf, the final RMSNorm's weight
    return "embedding_scale" if name == "embedding_scale" else "other"


def test_default_config_keeps_one_group_that_decays_everything_at_the_base_lr():
    model, cfg = _model_and_config()
    opt = build_optimizer(model, cfg.optim)
    assert len(opt.param_groups) == 1
    (group,) = opt.param_groups
    assert group["weight_decay"] == 0.1 and group["lr_scale"] == 1.0 and group["lr"] == cfg.optim.lr
    assert group["fused"] and [id(p) for p in group["params"]] == [id(p) for p in model.parameters()]


def test_each_switch_moves_exactly_its_parameters():
    model, cfg = _model_and_config(*GROUPS)
    opt = build_optimizer(model, cfg.optim)
    name_of = {id(p): n for n, p in model.named_parameters()}
    placed = {}
    for group in opt.param_groups:
        for p in group["params"]:
            placed[name_of[id(p)]] = (group["weight_decay"], group["lr_scale"], group["lr"])
    base = cfg.optim.lr
    expected = {"alpha_and_shift": (0.0, SCALE, base * SCALE), "norm_weights": (0.0, 1.0, base),
                "embedding_scale": (0.0, 1.0, base), "other": (0.1, 1.0, base)}
    assert placed == {n: expected[_role(n)] for n, _ in model.named_parameters()}
    assert {_role(n) for n in placed} == set(expected)  # every role is present in this model
    assert len(opt.param_groups) == 3  # norm weights and the embedding scalar share (0.0, 1.0)
    # One switch alone: only α and s leave the decaying group.
    model, cfg = _model_and_config("optim.decay_alpha_and_shift=false")
    no_decay = {id(p) for g in build_optimizer(model, cfg.optim).param_groups if g["weight_decay"] == 0
                for p in g["params"]}
    named = dict(model.named_parameters())
    assert {n for n, p in named.items() if id(p) in no_decay} == {n for n in named if _role(n) == "alpha_and_shift"}


def _train(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    return train_py(run_dir, *TRAIN, *overrides)


def test_groups_train_at_their_lr_and_resume_with_identical_losses(tmp_path, resumed_copy):
    run_dir = tmp_path / "run"
    done = _train(run_dir)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    records = metrics_by_step(run_dir)
    # Adam's first step moves a parameter by its lr (m / √v = ±1, up to ε) and α and s do not decay:
    # α moved by SCALE times the scheduled lr of step 1.
    cfg = load_config([*TRAIN, f"run_dir={run_dir}"])
    lr1 = lr_at(1, STEPS, cfg.optim)
    assert records[1]["lr"] == pytest.approx(lr1)
    for key in ("alpha/attn/0", "alpha/ffn/1", "alpha/final", "shift/attn/1"):
        start = 0.0 if key.startswith("shift") else 1.0
        assert abs(records[1][key] - start) == pytest.approx(SCALE * lr1, rel=1e-2), key  # ε: |g| / (|g| + ε)
    again = metrics_by_step(resumed_copy(run_dir, STEPS, INTERVAL, _train))
    for step in range(INTERVAL + 1, STEPS + 1):
        assert again[step]["loss"] == pytest.approx(records[step]["loss"], rel=1e-5), step


def test_a_one_group_checkpoint_loads_into_groups_with_its_moments(tmp_path, one_rank):
    # Saved as build_optimizer did before the switches: one plain group, no lr_scale.
    model, cfg = _model_and_config()
    old = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, fused=True)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    old.step()
    ckpt = Checkpointer(str(tmp_path / "run"), cfg, rank=0, world_size=1)
    path = ckpt.save(1, 128, model, old, {}, blocking=True)

    fresh, grouped = _model_and_config(*GROUPS)
    opt = build_optimizer(fresh, grouped.optim)
    ckpt.load(path, fresh, opt)
    assert len(opt.param_groups) == 3  # this config's groups and settings, not the checkpoint's one
    assert sorted((g["weight_decay"], g["lr_scale"]) for g in opt.param_groups) == [(0.0, 1.0), (0.0, SCALE), (0.1, 1.0)]
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), name
        assert torch.equal(old.state[p]["exp_avg"], opt.state[q]["exp_avg"]), name
        assert torch.equal(old.state[p]["exp_avg_sq"], opt.state[q]["exp_avg_sq"]), name


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_a_bad_lr_multiplier_exits_2_naming_the_key(tmp_path, value):
    done = _train(tmp_path / "run", f"optim.alpha_and_shift_lr_scale={value}")
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-3000:]
    assert "optim.alpha_and_shift_lr_scale" in done.stderr and "> 0" in done.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
