"""Checkpoint write and read speed: fms-dyt's DCP save against ``dd`` on the same disk.

The state is what ``fms_dyt.checkpoint.Checkpointer`` saves (``get_state_dict`` of the model and
its AdamW state after one step), written with ``torch.distributed.checkpoint.save`` as the
Checkpointer does, in one process. ``dd`` writes as many bytes of zeros with
``conv=fdatasync``; DCP's file writer fsyncs its files too, so both timings end on disk. Loading
reads the checkpoint back (from the page cache, right after saving) into the model and optimiser.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from harness import interleaved, median
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from fms_dyt.config import load_config, model_args, norm_args
from fms_dyt.model import Transformer
from fms_dyt.optim import build_optimizer

DD_BLOCK = 4 * 2**20


def _trained_state(overrides: list[str]):
    cfg = load_config([*overrides, "norm=dyt"])
    model = Transformer(model_args(cfg), norm_args(cfg))
    optimizer = build_optimizer(model, cfg.optim)
    tokens = torch.randint(0, model.args.vocab_size, (2, 33))
    F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
    optimizer.step()  # AdamW's moments exist only after a step
    return model, optimizer


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def measure(workdir: Path, quick: bool = False) -> tuple[dict, dict]:
    repeats = 3 if quick else 5
    model, optimizer = _trained_state(["model=tiny"] if quick else ["model=small"])
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt_dir, dd_file = workdir / "dcp", workdir / "dd.bin"

    def save():
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        dcp.save(state, checkpoint_id=str(ckpt_dir), no_dist=True)

    save()
    nbytes = _dir_bytes(ckpt_dir)
    blocks = max(1, round(nbytes / DD_BLOCK))

    def dd():
        dd_file.unlink(missing_ok=True)
        subprocess.run(["dd", "if=/dev/zero", f"of={dd_file}", f"bs={DD_BLOCK}", f"count={blocks}",
                        "conv=fdatasync", "status=none"], check=True)

    times = interleaved({"dcp_save": save, "dd": dd}, repeats, warmup=1)
    save_rate = nbytes / median(times["dcp_save"])
    dd_rate = blocks * DD_BLOCK / median(times["dd"])

    def load():
        model_sd, optim_sd = get_state_dict(model, optimizer)
        loaded = {"model": model_sd, "optim": optim_sd}
        dcp.load(loaded, checkpoint_id=str(ckpt_dir), no_dist=True)
        set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])

    load_times = interleaved({"load": load}, repeats, warmup=1)["load"]
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    dd_file.unlink(missing_ok=True)
    results = {
        "ckpt_save_over_dd": save_rate / dd_rate,
        "ckpt_load_s": median(load_times),
    }
    details = {"checkpoint": {
        "bytes": nbytes, "repeats": repeats, "dcp_save_mb_per_s": round(save_rate / 1e6, 1),
        "dd_mb_per_s": round(dd_rate / 1e6, 1), "load_mb_per_s_page_cache": round(nbytes / median(load_times) / 1e6, 1),
        "workdir": str(workdir),
    }}
    return results, details
