"""Atomic, resumable checkpoints with ``torch.distributed.checkpoint`` (DCP).

Layout: ``<run_dir>/checkpoints/step_<N>/`` holds the DCP shards of the model and optimiser,
``meta.json`` (step, tokens seen, world size), ``config.yaml`` (the resolved config),
``data_state.json`` (every rank's data-loader state) and ``rng/rank_<r>.pt``. A checkpoint is
written into ``.tmp_step_<N>`` and renamed when complete, so a job killed mid-save leaves the
previous checkpoint intact; leftovers are removed at the next start. DCP reshards on load, so a
checkpoint resumes on any world size and loads in one process (``fms_dyt.inference``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

log = logging.getLogger("fms_dyt")
STEP_DIR = re.compile(r"^step_(\d+)$")


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    found = []
    for d in root.glob("step_*") if root.is_dir() else []:
        m = STEP_DIR.match(d.name)
        if m and (d / "meta.json").is_file():
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a run directory (its newest) or a step directory."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return path
    found = complete_checkpoints(path)
    if not found:
        raise FileNotFoundError(
            f"{path} holds no complete checkpoint (expected {path}/checkpoints/step_<N>/meta.json)"
        )
    return found[-1]


class Checkpointer:
    def __init__(self, run_dir: str, cfg, rank: int, world_size: int):
        self.root = Path(run_dir) / "checkpoints"
        self.cfg, self.rank, self.world = cfg, rank, world_size
        self.keep = cfg.checkpoint.keep
        self.pending = None  # (future, tmp dir, final dir, meta) of an async save

    def clean_partial(self) -> None:
        """Remove what a killed save left behind (rank 0, at start-up)."""
        if self.rank == 0 and self.root.is_dir():
            for d in self.root.glob(".tmp_step_*"):
                log.warning("removing incomplete checkpoint %s (a save was interrupted)", d)
                shutil.rmtree(d, ignore_errors=True)
            for d in self.root.glob("step_*"):
                if not (d / "meta.json").is_file():
                    log.warning("removing incomplete checkpoint %s (no meta.json)", d)
                    shutil.rmtree(d, ignore_errors=True)
        dist.barrier()

    def save(self, step: int, tokens_seen: int, model, optimizer, data_state: dict, blocking=False) -> Path:
        self.wait()
        tmp, final = self.root / f".tmp_step_{step}", self.root / f"step_{step}"
        if self.rank == 0:
            tmp.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        (tmp / "rng").mkdir(parents=True, exist_ok=True)
        torch.save(torch.get_rng_state(), tmp / "rng" / f"rank_{self.rank}.pt")
        states = [None] * self.world
        dist.all_gather_object(states, data_state)
        meta = {"step": step, "tokens_seen": tokens_seen, "world_size": self.world, "data_state": states}
        if self.cfg.checkpoint.async_save and not blocking:
            self.pending = (dcp.async_save(state, checkpoint_id=str(tmp)), tmp, final, meta)
        else:
            dcp.save(state, checkpoint_id=str(tmp))
            self._finish(tmp, final, meta)
        return final

    def wait(self) -> None:
        """Complete an async save in flight."""
        if self.pending is not None:
            future, tmp, final, meta = self.pending
            self.pending = None
            future.result()
            self._finish(tmp, final, meta)

    def _finish(self, tmp: Path, final: Path, meta: dict) -> None:
        dist.barrier()  # every rank's shards are on disk
        if self.rank == 0:
            (tmp / "data_state.json").write_text(json.dumps(meta.pop("data_state")))
            (tmp / "config.yaml").write_text(OmegaConf.to_yaml(self.cfg, resolve=True))
            _write_synced(tmp / "meta.json", json.dumps(meta))  # written last: marks completeness
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            if self.keep > 0:  # keep <= 0 keeps every checkpoint
                for old in complete_checkpoints(self.root.parent)[: -self.keep]:
                    shutil.rmtree(old, ignore_errors=True)
        dist.barrier()

    def load(self, path: Path, model, optimizer) -> dict:
        """Restore model, optimiser and RNG; returns meta with ``data_state`` (all ranks' states)."""
        meta = json.loads((path / "meta.json").read_text())
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        rng = path / "rng" / f"rank_{self.rank}.pt"
        if meta["world_size"] == self.world and rng.is_file():
            torch.set_rng_state(torch.load(rng))
        meta["data_state"] = json.loads((path / "data_state.json").read_text())
        return meta


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
