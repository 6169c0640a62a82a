"""Every value is checked before anything is built: the error names the key, exit 2, nothing created."""

import subprocess
import sys
from pathlib import Path

import pytest

from fms_dyt.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("override, key", [
    ("optim.lr=-1e-3", "optim.lr=-0.001"),
    ("train.max_steps=0", "train.max_steps=0"),
    ("+train.max_stpes=5", "train.max_stpes (did you mean train.max_steps?)"),
])
def test_train_py_refuses_with_exit_2_naming_the_key_and_creates_no_run_dir(tmp_path, override, key):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "train.py", "experiment=quickstart", override, f"run_dir={run_dir}",
                           "logging.wandb.mode=offline"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert key in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert list(tmp_path.iterdir()) == []  # no run directory, so no W&B run, config.yaml or checkpoint


@pytest.mark.parametrize("override, key", [
    ("optim.betas=[0.9,1.0]", "optim.betas"), ("optim.betas=[0.9]", "optim.betas"), ("optim.eps=0", "optim.eps"),
    ("optim.weight_decay=-0.1", "optim.weight_decay"), ("optim.grad_clip=0", "optim.grad_clip"),
    ("optim.warmup_steps=-1", "optim.warmup_steps"), ("optim.min_lr_ratio=1.5", "optim.min_lr_ratio"),
    ("optim.lr=nan", "optim.lr"), ("train.tokens=0", "train.tokens"), ("train.micro_batch_size=0", "train.micro_batch_size"),
    ("train.seq_len=0", "train.seq_len"), ("train.global_batch_tokens=0", "train.global_batch_tokens"),
    ("train.max_bad_steps=0", "train.max_bad_steps"), ("checkpoint.interval=0", "checkpoint.interval"),
    ("checkpoint.keep=-1", "checkpoint.keep"), ("logging.interval=0", "logging.interval"),
    ("logging.console_interval=0", "logging.console_interval"), ("parallel.timeout_s=0", "parallel.timeout_s"),
    ("parallel.replicas=0", "parallel.replicas"), ("parallel.param_dtype=fp8", "parallel.param_dtype"),
    ("train.resume=maybe", "train.resume"), ("seed=-1", "seed"), ("+optim.lr_max=1", "optim.lr_max"),
    ("+model.dimm=8", "model.dimm (did you mean model.dim?)"), ("+bogus=1", "bogus"),
    ("norm.final=layernorm", "norm.final='layernorm'"), ("norm.alpha_attn=0", "norm.alpha_attn"),
])
def test_each_bad_value_is_named(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(["experiment=quickstart", override])
    assert str(e.value).startswith(key) or f" {key}" in str(e.value), str(e.value)


def test_a_dyt_final_norm_needs_its_alpha0_and_gets_none_under_rmsnorm():
    with pytest.raises(ConfigError, match=r"set norm.alpha_final \(the final norm is dyt\)"):
        load_config(["experiment=quickstart", "norm=rmsnorm", "norm.final=dyt"])
    from fms_dyt.config import norm_args

    mixed = norm_args(load_config(["experiment=quickstart", "norm=rmsnorm", "norm.final=dyt", "norm.alpha_final=0.5"]))
    assert (mixed.alpha_attn, mixed.alpha_ffn, mixed.alpha_final) == (None, None, 0.5)
    blocks = norm_args(load_config(["experiment=quickstart", "norm.final=rmsnorm", "norm.alpha_attn=null",
                                    "norm.alpha_ffn=null", "norm.alpha_final=0.5"]))  # the table's α₀ at width 64
    assert (blocks.alpha_attn, blocks.alpha_ffn, blocks.alpha_final) == (1.0, 1.0, None)


def test_the_shipped_configurations_pass():
    for experiment in ("quickstart", "llama7b_dyt", "llama70b_rmsnorm"):
        load_config([f"experiment={experiment}"])
    load_config(["experiment=quickstart", "optim.warmup_steps=null", "train.max_steps=null", "train.tokens=1e6",
                 "checkpoint.keep=0", "+data.weights.Github=0.5", "train.resume=force"])
