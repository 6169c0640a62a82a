"""Atomic, resumable checkpoints with ``torch.distributed.checkpoint`` (DCP).

Layout: ``<run_dir>/checkpoints/step_<N>/`` holds the DCP shards of the model and optimiser,
``meta.json`` (step, tokens seen, world size), ``config.yaml`` (the resolved config),
``data_state.json`` (every rank's data-loader state) and ``rng/rank_<r>.pt`` (CPU and CUDA random
states). A checkpoint is written into ``.tmp_step_<N>`` and renamed when complete, so a job killed
mid-save leaves the previous checkpoint intact; such leftovers are removed at the next start.
Checkpoints past ``checkpoint.keep`` are renamed ``.expired_step_<N>_<id>`` and deleted in the
background, off the collective path. A ``step_<N>`` directory that is incomplete (no ``meta.json``)
or fails to load (a truncated shard, a bad ``meta.json``, no ``data_state.json``) is never deleted:
it is renamed aside (``step_<N>.incomplete``, ``step_<N>.unloadable``) with a warning, and the run
resumes from the newest one that loads: rank 0 checks the files and chooses, every rank loads
(:meth:`Checkpointer.load_newest`). DCP's collectives run on a gloo process group of their own. DCP
reshards on load, so a checkpoint resumes on any world size and loads in one process (``fms_dyt.inference``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import uuid
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from fms_dyt.errors import EXIT_ERROR, EXIT_NO_SPACE
from fms_dyt.parallel import checkpoint_group, on_rank0

log = logging.getLogger("fms_dyt")
STEP_DIR = re.compile(r"^step_(\d+)$")
EXPIRED_PREFIX = ".expired_"  # checkpoints past checkpoint.keep, being deleted


def _step_of(path: Path) -> int:
    return int(STEP_DIR.match(path.name).group(1))


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    found = []
    for d in root.glob("step_*") if root.is_dir() else []:
        m = STEP_DIR.match(d.name)
        if m and (d / "meta.json").is_file():
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


class CheckpointError(ValueError):
    """No checkpoint can be loaded; the message names each directory and what is wrong with it."""


class CheckpointWriteError(CheckpointError):
    """A save failed (a full disk, a quota, any write error): its partial directory is gone, the
    previous checkpoints are as they were; the message names the directory, the bytes needed and
    the bytes free. ``exit_code`` EXIT_NO_SPACE (6) when space ran out: a
    requeue would fail again, so ``slurm/launch.sh`` does not retry it."""

    def __init__(self, message: str, no_space: bool):
        super().__init__(message)
        self.exit_code = EXIT_NO_SPACE if no_space else EXIT_ERROR


def checkpoint_problem(path: Path, need_data_state: bool = True) -> str | None:
    """What makes the checkpoint in ``path`` unloadable, read from its files alone (None: nothing)."""
    return inspect_checkpoint(path, need_data_state)[0]


def inspect_checkpoint(path: Path, need_data_state: bool = True) -> tuple[str | None, dict | None]:
    """``(problem, meta)`` of the checkpoint in ``path``: what makes it unloadable (None: nothing),
    read from its files alone (meta.json, data_state.json, DCP's ``.metadata`` and a ``stat`` of
    every shard it names), and when there is none its ``meta.json`` with the loaders' states under
    ``data_state`` (with ``need_data_state``). In a run only rank 0 calls it (:meth:`Checkpointer.load_newest`)."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except FileNotFoundError:
        return "meta.json is missing (the save did not finish)", None
    except (OSError, ValueError) as e:
        empty = not (path / "meta.json").stat().st_size
        return "meta.json is empty" if empty else f"meta.json is not valid JSON ({e})", None
    missing = [k for k in ("step", "tokens_seen", "world_size") if not isinstance(meta, dict) or k not in meta]
    if missing:
        return f"meta.json lacks {', '.join(missing)}", None
    if need_data_state:
        try:
            meta["data_state"] = json.loads((path / "data_state.json").read_text())
        except FileNotFoundError:
            return "data_state.json is missing", None
        except (OSError, ValueError) as e:
            return f"data_state.json is not valid JSON ({e})", None
    try:
        index = FileSystemReader(str(path)).read_metadata()
    except FileNotFoundError:
        return ".metadata (DCP's index of the shards) is missing", None
    except Exception as e:  # a truncated pickle raises anything from EOFError to UnpicklingError
        return f".metadata (DCP's index of the shards) cannot be read ({type(e).__name__}: {e})", None
    needed: dict[str, int] = {}
    for item in (index.storage_data or {}).values():
        needed[item.relative_path] = max(needed.get(item.relative_path, 0), item.offset + item.length)
    for name, size in sorted(needed.items()):
        try:
            found = (path / name).stat().st_size
        except FileNotFoundError:
            return f"shard {name} is missing", None
        if found < size:
            return f"shard {name} is truncated ({found:,} bytes; the index needs {size:,})", None
    return None, meta


def set_aside(path: Path, label: str) -> Path:
    """Rename ``step_<N>`` to ``step_<N>.<label>`` (never deleted: it may be someone's only copy)."""
    target, n = path.with_name(f"{path.name}.{label}"), 1
    while target.exists():
        target, n = path.with_name(f"{path.name}.{label}.{n}"), n + 1
    os.replace(path, target)
    return target


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a run directory (its newest that loads) or a step directory."""
    path = Path(path)
    if (path / "meta.json").is_file():
        problem = checkpoint_problem(path, need_data_state=False)
        if problem:
            raise CheckpointError(f"checkpoint {path} cannot be loaded: {problem}")
        return path
    found = complete_checkpoints(path)
    if not found:
        raise FileNotFoundError(
            f"{path} holds no complete checkpoint (expected {path}/checkpoints/step_<N>/meta.json)"
        )
    problems = []
    for ckpt in reversed(found):
        problem = checkpoint_problem(ckpt, need_data_state=False)
        if problem is None:
            for bad, why in problems:
                log.warning("skipping checkpoint %s: %s", bad, why)
            return ckpt
        problems.append((ckpt, problem))
    raise CheckpointError(f"no checkpoint of {path} can be loaded:\n" + "\n".join(f"  {p}: {w}" for p, w in problems))


class Checkpointer:
    def __init__(self, run_dir: str, cfg, rank: int, world_size: int):
        self.root = Path(run_dir) / "checkpoints"
        self.cfg, self.rank, self.world = cfg, rank, world_size
        # DCP's collectives (saves, async ones in a background thread, and loads) on a gloo group
        # of their own, made once, with the start-up timeout: see fms_dyt.parallel.checkpoint_group
        self.group = checkpoint_group(cfg.parallel.init_timeout_s)
        self.keep = cfg.checkpoint.keep
        self.pending = None  # (future, tmp dir, final dir, meta) of an async save
        self.deleting = None  # the thread deleting expired checkpoints (rank 0)

    def clean_partial(self) -> None:
        """Tidy up after a killed save (rank 0, at start-up): a temporary directory is removed, or
        moved into place when only its rename was missed; ``step_<N>`` without ``meta.json`` is set aside."""
        if self.rank == 0 and self.root.is_dir():
            for d in sorted(self.root.glob(".tmp_step_*")):
                final = self.root / d.name.removeprefix(".tmp_")
                if (d / "meta.json").is_file() and not final.exists():
                    log.warning("completing checkpoint %s (its save was interrupted just before the rename)", final)
                    os.replace(d, final)
                else:
                    log.warning("removing incomplete checkpoint %s (a save was interrupted)", d)
                    shutil.rmtree(d, ignore_errors=True)
            self._delete_in_background(list(self.root.glob(f"{EXPIRED_PREFIX}*")))  # a job ended mid-deletion
            for d in sorted(self.root.iterdir()):
                if STEP_DIR.match(d.name) and not (d / "meta.json").is_file():
                    log.warning("checkpoint %s has no meta.json (its save did not finish): renamed to %s",
                                d, set_aside(d, "incomplete").name)
        dist.barrier(group=self.group)

    def load_newest(self, model, optimizer) -> tuple[Path, dict, list] | None:
        """Restore the newest checkpoint that loads on every rank: ``(path, meta, skipped)`` with
        ``skipped`` the newer ``(path, problem)`` pairs set aside on the way; None when there is
        none.

        Rank 0 alone lists the checkpoints and checks the newest (:func:`inspect_checkpoint`: its
        JSON files, DCP's index, a ``stat`` per shard) and broadcasts its choice with the meta it
        read; every rank then loads that one with DCP. At 1,024 ranks that is one reader of the
        JSON files and the index instead of 1,024, and one ``stat`` per shard file instead of two
        on every rank (about 2 million). A checkpoint that fails to load on any rank is skipped by
        all, and rank 0 chooses again among the older ones."""
        skipped: list[tuple[Path, str]] = []
        older_than = None  # step numbers at or above this one were tried
        while True:
            path, meta, problems = on_rank0(lambda: self._choose(older_than))
            skipped += problems
            if path is None:
                break
            try:
                meta = self.load(path, model, optimizer, meta)
                problem = None
            except Exception as e:  # DCP raises on every rank when one rank's read fails
                problem = f"loading failed: {type(e).__name__}: {(str(e).strip() or '?').splitlines()[0]}"
            problem = self._agree(problem)
            if problem is None:
                if self.rank == 0:
                    for bad, why in skipped:
                        log.warning("checkpoint %s cannot be loaded (%s): renamed to %s", bad, why,
                                    set_aside(bad, "unloadable").name)
                dist.barrier(group=self.group)
                return path, meta, skipped
            if self.rank == 0:
                log.warning("checkpoint %s cannot be loaded: %s; trying the one before", path, problem)
            skipped.append((path, problem))
            older_than = _step_of(path)
        if not skipped:
            return None
        raise CheckpointError(
            f"no checkpoint in {self.root} can be loaded:\n" + "\n".join(f"  {p}: {w}" for p, w in skipped)
            + "\nRepair or move them away to start this run afresh, or train in a new run_dir."
        )

    def _choose(self, older_than: int | None) -> tuple[Path | None, dict | None, list[tuple[Path, str]]]:
        """Rank 0: ``(path, meta, problems)`` of the newest complete checkpoint before step
        ``older_than`` (None: any) whose files show no problem, with ``problems`` the ``(path,
        problem)`` of the newer ones that do; ``path`` None when none is left."""
        problems = []
        for path in reversed(complete_checkpoints(self.root.parent)):
            if older_than is not None and _step_of(path) >= older_than:
                continue
            problem, meta = inspect_checkpoint(path)
            if problem is None:
                return path, meta, problems
            log.warning("checkpoint %s cannot be loaded: %s; trying the one before", path, problem)
            problems.append((path, problem))
        return None, None, problems

    def _agree(self, problem: str | None) -> str | None:
        """The first rank's problem, on every rank (None when no rank has one)."""
        problems = [None] * self.world
        dist.all_gather_object(problems, problem, group=self.group)
        for rank, p in enumerate(problems):
            if p is not None:
                return p if self.world == 1 else f"{p} (rank {rank})"
        return None

    def save(self, step: int, tokens_seen: int, model, optimizer, data_state: dict, blocking=False) -> Path:
        """Write ``step_<step>`` (through ``.tmp_step_<step>``); a write error on any rank raises
        :class:`CheckpointWriteError` on every rank, with nothing of this save left on disk."""
        self.wait()
        tmp, final = self.root / f".tmp_step_{step}", self.root / f"step_{step}"
        error = None
        if self.rank == 0:
            try:
                tmp.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                error = e
        error = self._first_error(error)  # also the barrier before the other ranks write into tmp
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        self.need_bytes = _state_bytes(state) * self.world
        if error is None:
            try:
                (tmp / "rng").mkdir(parents=True, exist_ok=True)
                torch.save(_rng_state(), tmp / "rng" / f"rank_{self.rank}.pt")
            except OSError as e:
                error = e
        states = [None] * self.world
        dist.all_gather_object(states, (data_state, _describe(error)), group=self.group)
        failed = [(r, e) for r, (_, e) in enumerate(states) if e is not None]
        if failed:
            self._failed(tmp, failed[0][1], failed[0][0])
        meta = {"step": step, "tokens_seen": tokens_seen, "world_size": self.world, "data_state": [s for s, _ in states]}
        try:
            if self.cfg.checkpoint.async_save and not blocking:
                self.pending = (dcp.async_save(state, checkpoint_id=str(tmp), process_group=self.group), tmp, final, meta)
            else:
                dcp.save(state, checkpoint_id=str(tmp), process_group=self.group)
        except (Exception, CheckpointException) as e:  # DCP raises on every rank when one rank's write fails
            self._failed(tmp, _describe(e), None)
        if self.pending is None:
            self._finish(tmp, final, meta)
        return final

    def _first_error(self, error: BaseException | None) -> str | None:
        """Rank 0's error, on every rank (a broadcast: also a barrier)."""
        box = [_describe(error)]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def _failed(self, tmp: Path, error: str, rank: int | None) -> None:
        """A save failed on some rank: remove its partial directory (rank 0), raise on every rank."""
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier(group=self.group)
        root = self.root if self.root.exists() else self.root.parent
        try:
            free = shutil.disk_usage(root).free
        except OSError:
            free = None
        need = getattr(self, "need_bytes", 0)
        # torch.save's zip writer reports a full disk as "unexpected pos": the free space tells
        no_space = (any(w in error for w in ("No space left", "Disk quota exceeded", "ENOSPC", "EDQUOT"))
                    or (free is not None and free < need))
        last = complete_checkpoints(self.root.parent)
        raise CheckpointWriteError(
            f"checkpoint {tmp.with_name(tmp.name.removeprefix('.tmp_'))} could not be written"
            + (f" (rank {rank})" if rank is not None and self.world > 1 else "")
            + (": out of space" if no_space else "") + f" ({error}). "
            f"It needs about {need:,} bytes; {self.root} has "
            + (f"{free:,} bytes free" if free is not None else "an unknown number of bytes free")
            + f" now that the partial {tmp.name} is removed. "
            + (f"The newest complete checkpoint, {last[-1]}, is intact. " if last else "No earlier checkpoint exists. ")
            + ("Free space (or lower checkpoint.keep), then run the same command to resume." if no_space
               else "Run the same command to resume from it."),
            no_space)

    def wait(self) -> None:
        """Complete an async save in flight."""
        if self.pending is not None:
            future, tmp, final, meta = self.pending
            self.pending = None
            try:
                future.result()
            except (Exception, CheckpointException) as e:
                self._failed(tmp, _describe(e), None)
            self._finish(tmp, final, meta)

    def _finish(self, tmp: Path, final: Path, meta: dict) -> None:
        dist.barrier(group=self.group)  # every rank's shards are on disk
        error = None
        if self.rank == 0:
            try:
                (tmp / "data_state.json").write_text(json.dumps(meta.pop("data_state")))
                (tmp / "config.yaml").write_text(OmegaConf.to_yaml(self.cfg, resolve=True))
                _write_synced(tmp / "meta.json", json.dumps(meta))  # written last: marks completeness
            except OSError as e:
                error = e
            else:
                if final.exists():  # the same step saved again
                    self._expire([final])
                os.replace(tmp, final)
                # Only now, with the new one complete, may older ones go; the newest always stays.
                if self.keep > 0:  # keep <= 0 keeps every checkpoint
                    self._expire(complete_checkpoints(self.root.parent)[: -self.keep])
        error = self._first_error(error)  # also the barrier: every rank leaves with the checkpoint in place
        if error is not None:
            self._failed(tmp, error, 0)

    def _expire(self, old: list[Path]) -> None:
        """Take checkpoints out of ``step_*`` at once (a rename) and delete them in the background:
        hundreds of GB take minutes, while the other ranks wait in a barrier under a timeout."""
        expired = []
        for d in old:
            target = self.root / f"{EXPIRED_PREFIX}{d.name}_{uuid.uuid4().hex[:8]}"
            os.replace(d, target)
            expired.append(target)
        self._delete_in_background(expired)

    def _delete_in_background(self, paths: list[Path]) -> None:
        # Not a daemon: a run that ends normally finishes deleting before the process exits.
        if paths:
            self.deleting = threading.Thread(target=_delete_all, args=(paths,), name="fms-dyt-checkpoint-retention")
            self.deleting.start()

    def load(self, path: Path, model, optimizer, meta: dict | None = None) -> dict:
        """Restore model, optimiser and RNG; returns meta with ``data_state`` (all ranks' states).
        ``meta`` is that dict as rank 0 read it (:meth:`load_newest`); None reads it here. DCP
        reads its index and this rank's part of the shards; the rest is this rank's RNG file."""
        if meta is None:
            meta = json.loads((path / "meta.json").read_text())
            meta["data_state"] = json.loads((path / "data_state.json").read_text())
        model_sd, optim_sd = get_state_dict(model, optimizer)
        # The moments are read per parameter (by name); the parameter groups and their settings
        # stay those of this config (fms_dyt.optim), so a checkpoint of another grouping loads too.
        state = {"model": model_sd, "optim": {"state": optim_sd["state"]}}
        dcp.load(state, checkpoint_id=str(path), process_group=self.group)
        set_state_dict(model, optimizer, model_state_dict=state["model"],
                       optim_state_dict={"state": state["optim"]["state"], "param_groups": optim_sd["param_groups"]})
        if meta["world_size"] == self.world:
            try:
                _set_rng_state(torch.load(path / "rng" / f"rank_{self.rank}.pt"))
            except FileNotFoundError:  # checkpoints written before the RNG states were saved
                pass
        return meta


def _describe(error: BaseException | None) -> str | None:
    """An error as one line that travels between ranks (None stays None); DCP's
    CheckpointException carries each failed rank's exception, the first of which is named."""
    if error is None:
        return None
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, (exc, _) = next(iter(failures.items()))
        return f"{type(exc).__name__}: {exc} (rank {rank})"
    return f"{type(error).__name__}: {error}"


def _state_bytes(state) -> int:
    """Bytes of this rank's part of a state dict (DTensors: the local shard)."""
    if isinstance(state, dict):
        return sum(_state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_state_bytes(v) for v in state)
    if isinstance(state, torch.Tensor):
        local = state.to_local() if hasattr(state, "to_local") else state
        return local.numel() * local.element_size()
    return 0


def _delete_all(paths: list[Path]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def _rng_state() -> dict:
    """This rank's random number generators: the CPU's and, on a GPU, its device's."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state) -> None:
    if isinstance(state, torch.Tensor):  # checkpoints written before the CUDA state was saved
        state = {"cpu": state}
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
