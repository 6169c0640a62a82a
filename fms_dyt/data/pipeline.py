"""The training data loader: read, shuffle, tokenize and pack documents into windows, with a small
state that resumes bit for bit and rescales to another world size (see ``state.py``).

A rank has ``data.readers`` readers (``Reader``), taken in turn, a batch from each; the DataLoader
workers share them out, each playing every ``num_workers``-th one, so the batches and their order
are the same with any number of worker processes. Documents are wrapped as ``BOS doc EOS``, and a
reader's stream is cut into windows of ``seq_len + 1`` tokens (documents cross window borders); a
batch is ``micro_batch_size`` consecutive windows of one reader, split into inputs ``w[:, :-1]``
and targets ``w[:, 1:]``. With each batch goes its reader's state after it; the loader keeps the
latest one per reader and which reader comes next, so ``state_dict()`` describes exactly the
batches already handed to the trainer, however far the workers have read ahead.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
from dataclasses import dataclass
from functools import partial
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from fms_dyt.data.config import DataConfig, TokenizerConfig, as_config, readers_per_rank
from fms_dyt.data.holdout import HeldOut
from fms_dyt.data.sources import ShardError, Source, make_source
from fms_dyt.data.state import (END, VERSION, Layout, copies, decode_table, doc_key, encode_table,
                                fresh_reader_state, pieces_per_file, redistribute, slot, with_current_names)
from fms_dyt.data.tokenizer import TextEncoder
from fms_dyt.errors import counted
from fms_dyt.stop import ignore_in_worker

log = logging.getLogger(__name__)

COUNTERS = ("documents", "tokens", "skipped_rows", "skipped_files", "held_out")
_TOKENIZE_AHEAD = 16  # documents tokenized together, ahead of the packing
_LOGGED_ROWS = 100  # bad rows logged at WARNING per reader; the rest at DEBUG (all are counted)
_MAX_EMPTY_EPOCHS = 8


@dataclass
class Plan:
    """What every reader of a run shares (sent to the DataLoader workers)."""

    source: Source
    k: int  # pieces per file
    seed: int
    readers: int  # world_size * per_rank
    per_rank: int  # readers per rank (data.readers)
    rank: int
    weights: dict
    block: int  # documents shuffled together
    seq_len: int
    micro_batch_size: int
    tokenizer: TokenizerConfig
    trace: bool = False  # also report which document every token came from (scan, tests)
    held_out: Optional[HeldOut] = None  # rows kept for validation (holdout.py), never trained on


class _Doc:
    __slots__ = ("key", "f", "row", "copy", "text", "subset", "tokens")

    def __init__(self, key, f, row, copy, text, subset):
        self.key, self.f, self.row, self.copy, self.text, self.subset = key, f, row, copy, text, subset
        self.tokens = None


class Reader:
    """One reader's infinite stream of packed batches, from a reader state (see ``state.py``)."""

    def __init__(self, plan: Plan, reader: int, state: dict):
        self.p, self.r = plan, reader
        self.encoder = None  # loaded on first use: documents() needs none
        self.stats = {key: 0 for key in COUNTERS} | state["stats"]
        self.saved_progress = {int(e): v for e, v in state["epoch_progress"].items()}  # epochs not begun
        self.events: list = []
        self.logged_rows = 0
        self.empty_epochs = 0
        self._start_epoch(state["epoch"], state["emitted_key"])

    # ---- layout and state of one epoch
    def _start_epoch(self, epoch: int, emitted_key: int = -1) -> None:
        K = self.p.k
        self.epoch = epoch
        order = Layout(len(self.p.source.names), K, self.p.seed, epoch, self.p.readers).pieces_of(self.r)
        self.first_slot_files = set((order[order % K == 0] // K).tolist())
        self.files = list(dict.fromkeys((order // K).tolist()))  # in reading order
        ordinal = {f: j for j, f in enumerate(self.files)}
        self.pieces = np.sort(order)
        self.file_ord = np.array([ordinal[f] for f in (self.pieces // K).tolist()], dtype=np.int64)
        entry = self.saved_progress.pop(epoch, None) or {"piece_runs": [], "cut_documents": []}
        self.block_start, self.block_end, self.block_emitted_key = decode_table(entry["piece_runs"], self.pieces)
        self.cut_documents = {(p, row, c): off for p, row, c, off in entry["cut_documents"]}
        self.base = self.block_end  # the stream goes on where the saved block ended
        self.emitted_key, self.cur_off, self.piece_runs = emitted_key, 0, None
        self.pos = (0, 0)  # (file ordinal, next row) of the stream
        self.tokens_in_epoch = 0
        self.block = self._rebuild() if (self.block_start < self.block_end).any() else []
        self.emit = 0
        self.stream = self._stream()

    def _file_range(self, f: int) -> tuple[int, int]:
        K = self.p.k
        return int(np.searchsorted(self.pieces, f * K)), int(np.searchsorted(self.pieces, (f + 1) * K))

    def _cursors(self) -> np.ndarray:
        j, i = self.pos
        return np.where(self.file_ord < j, END, np.where(self.file_ord == j, np.maximum(self.base, i), self.base))

    def _docs(self, f: int, row: int, text: str, subset: str) -> list:
        p = self.p
        n = copies(p.seed, self.epoch, f, row, p.weights.get(subset, 1.0)) if p.weights else 1
        return [_Doc(doc_key(p.seed, self.epoch, f, row, c), f, row, c, text, subset) for c in range(n)]

    def _held_out(self, f: int, row: int) -> bool:
        return self.p.held_out is not None and self.p.held_out(f, row)

    def _rebuild(self) -> list:
        """The saved block's documents not emitted yet, in emission order (read again quietly:
        their bad rows were counted when first read)."""
        K = self.p.k
        threshold = np.maximum(self.block_emitted_key, self.emitted_key)
        pending = self.block_start < self.block_end
        docs = []
        for f in self.files:
            a, b = self._file_range(f)
            sel = np.arange(a, b)[pending[a:b]]
            if not len(sel):
                continue
            lo, hi, th = [None] * K, [0] * K, [0] * K
            for i in sel.tolist():
                k = int(self.pieces[i]) - f * K
                lo[k], hi[k], th[k] = int(self.block_start[i]), int(self.block_end[i]), int(threshold[i])
            stop = int(self.block_end[sel].max())

            def want(row, lo=lo, hi=hi, f=f):
                k = slot(row, K)
                return lo[k] is not None and lo[k] <= row < hi[k] and not self._held_out(f, row)

            try:
                for row, text, subset in self.p.source.read(f, int(self.block_start[sel].min()), want,
                                                            None if stop >= END else stop):
                    if text is not None:
                        docs += [d for d in self._docs(f, row, text, subset) if d.key > th[slot(row, K)]]
            except ShardError as e:
                log.debug("reader %d: %s (while restoring its block)", self.r, e)
        docs.sort(key=lambda d: d.key)
        return docs

    def _stream(self) -> Iterator[list]:
        """The rows of this reader's pieces from ``base`` on, as lists of documents (copies)."""
        K = self.p.k
        for j, f in enumerate(self.files):
            a, b = self._file_range(f)
            base = self.base[a:b]
            live = base < END
            if not live.any():
                continue
            lower = [None] * K
            for p, start in zip(self.pieces[a:b][live].tolist(), base[live].tolist()):
                lower[p - f * K] = start
            first = int(base[live].min())
            self.pos = (j, first)

            def want(row, lower=lower):
                x = lower[slot(row, K)]
                return x is not None and row >= x

            try:
                for row, text, info in self.p.source.read(f, first, want):
                    self.pos = (j, row + 1)
                    if self._held_out(f, row):  # a validation document, good or bad: not ours
                        self.stats["held_out"] += 1
                        continue
                    if text is None:
                        self._bad_row(f, row, info)
                        continue
                    docs = self._docs(f, row, text, info)
                    if docs:
                        yield docs
            except ShardError as e:
                self._bad_file(f, e)
            self.pos = (j + 1, 0)

    def _next_block(self) -> bool:
        self.block_start = self._cursors()
        docs = []
        while len(docs) < self.p.block:
            row_docs = next(self.stream, None)
            if row_docs is None:
                break
            docs += row_docs
        self.block_end = self._cursors()
        self.block_emitted_key = np.full(len(self.pieces), -1, dtype=np.int64)
        self.emitted_key, self.piece_runs, self.emit = -1, None, 0
        docs.sort(key=lambda d: d.key)
        self.block = docs
        return bool(docs)

    def _next_epoch(self) -> None:
        self.empty_epochs = self.empty_epochs + 1 if self.tokens_in_epoch == 0 else 0
        if self.empty_epochs >= _MAX_EMPTY_EPOCHS:
            raise RuntimeError(
                f"data reader {self.r} (rank {self.r // self.p.per_rank}, reader {self.r % self.p.per_rank}) found no "
                f"documents in {self.empty_epochs} epochs in a row: the data is too small to give all "
                f"{self.p.readers} readers (ranks x data.readers) a share; use fewer readers or more data"
            )
        self._start_epoch(self.epoch + 1)

    # ---- bad input: counted, logged, never fatal
    def _bad_row(self, f: int, row: int, reason: str) -> None:
        self.stats["skipped_rows"] += 1
        if self.p.trace:
            self.events.append((self.epoch, f, row, reason))
        self.logged_rows += 1
        level = logging.WARNING if self.logged_rows <= _LOGGED_ROWS else logging.DEBUG
        log.log(level, "%s line %d: %s; row skipped", self.p.source.where(f), row + 1, reason)
        if self.logged_rows == _LOGGED_ROWS:
            log.warning("data reader %d: further bad rows are logged at DEBUG level; data/skipped_rows counts "
                        "them all", self.r)

    def _bad_file(self, f: int, error: ShardError) -> None:
        if self.p.trace:
            self.events.append((self.epoch, f, None, str(error)))
        if f in self.first_slot_files:  # every reader of the file meets the damage; one counts it
            self.stats["skipped_files"] += 1
            log.warning("%s; the rest of this file is skipped in epoch %d", error, self.epoch)
        else:
            log.debug("%s (counted by another reader)", error)

    # ---- emission
    def _current(self) -> _Doc:
        while self.emit >= len(self.block):
            if not self._next_block():
                self._next_epoch()
        doc = self.block[self.emit]
        if doc.tokens is None:
            if self.encoder is None:
                self.encoder = TextEncoder(self.p.tokenizer)
                self.prefix = [self.encoder.bos_id] if self.p.tokenizer.add_bos else []
                self.suffix = [self.encoder.eos_id] if self.p.tokenizer.add_eos else []
            todo = [d for d in self.block[self.emit:self.emit + _TOKENIZE_AHEAD] if d.tokens is None]
            for d, ids in zip(todo, self.encoder.encode([d.text for d in todo])):
                d.tokens = self.prefix + ids + self.suffix  # a list: batches() converts them all at once
                d.text = None
        if self.cur_off == 0 and self.cut_documents:
            self.cur_off = self.cut_documents.pop((self._piece(doc), doc.row, doc.copy), 0)
        return doc

    def _piece(self, doc: _Doc) -> int:
        return doc.f * self.p.k + slot(doc.row, self.p.k)

    def _finish(self, doc: _Doc) -> None:
        self.emitted_key = doc.key
        self.block[self.emit] = None  # free its tokens
        self.emit += 1
        self.cur_off = 0

    def documents(self) -> Iterator[str]:
        """The texts of this reader's current epoch in delivery order, untokenized (for training
        a tokenizer on the same stream)."""
        while True:
            while self.emit >= len(self.block):
                if not self._next_block():
                    return
            doc = self.block[self.emit]
            self._finish(doc)
            yield doc.text

    def batches(self) -> Iterator[tuple]:
        """(windows [micro_batch_size, seq_len + 1], state after them, bad-input events, spans)."""
        need = self.p.micro_batch_size * (self.p.seq_len + 1)
        while True:
            parts, n, spans = [], 0, []
            while n < need:
                doc = self._current()
                off, length = self.cur_off, len(doc.tokens)
                if off >= length:  # a saved offset beyond the document (another tokenizer)
                    self._finish(doc)
                    continue
                take = min(length - off, need - n)
                parts.append(doc.tokens if take == length else doc.tokens[off:off + take])
                if off == 0:
                    self.stats["documents"] += 1
                if self.p.trace:
                    spans.append((self.epoch, doc.f, doc.row, doc.copy, off, off + take, length, doc.subset))
                n += take
                self.tokens_in_epoch += take
                self.cur_off = off + take
                if self.cur_off == length:
                    self._finish(doc)
            self.stats["tokens"] += need
            events, self.events = self.events, []
            # one conversion of the batch's token lists: a numpy array per document cost more
            windows = np.fromiter(itertools.chain.from_iterable(parts), dtype=np.int64, count=need)
            yield windows.reshape(self.p.micro_batch_size, self.p.seq_len + 1), self.snapshot(), events, spans

    def snapshot(self) -> dict:
        """The reader state (``state.py``): a JSON object of a few numbers per run of pieces."""
        if self.piece_runs is None:
            self.piece_runs = encode_table(self.pieces, self.block_start, self.block_end, self.block_emitted_key)
        cut = [[p, row, c, off] for (p, row, c), off in self.cut_documents.items()]
        if self.cur_off:
            doc = self.block[self.emit]
            cut.append([self._piece(doc), doc.row, doc.copy, self.cur_off])
        progress = {str(e): v for e, v in self.saved_progress.items()}
        progress[str(self.epoch)] = {"piece_runs": self.piece_runs, "cut_documents": cut}
        return {"epoch": self.epoch, "emitted_key": self.emitted_key, "epoch_progress": progress,
                "stats": dict(self.stats)}


class _Readers(IterableDataset):
    """The rank's readers, a batch from each in turn from reader ``rotation`` on. The DataLoader
    takes batch ``t`` from worker ``t % W``: worker ``w`` plays readers ``rotation + w``,
    ``rotation + w + W``, ... (mod readers) in that order, so the batches reach the loader in the
    readers' order for any number of workers ``W`` that divides the readers."""

    def __init__(self, plan: Plan, states: list, rotation: int):
        self.plan, self.states, self.rotation = plan, states, rotation

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        n, first = self.plan.per_rank, self.plan.rank * self.plan.per_rank
        mine = [(self.rotation + t) % n for t in range(worker, n, workers)]
        streams = [Reader(self.plan, first + logical, self.states[logical]).batches() for logical in mine]
        for logical, stream in itertools.cycle(zip(mine, streams)):
            windows, state, events, spans = next(stream)
            # numpy, not a tensor: a worker sends it as 64 KB of bytes through its pipe, where a
            # tensor costs a shared-memory file per batch (created, passed, mapped, unlinked)
            yield logical, windows, state, events, spans


def _as_is(item):
    return item


class PackedLoader:
    """Iterable of ``(inputs, targets)`` LongTensors ``[micro_batch_size, seq_len]``, endless
    (epoch after epoch, each in a new order), with ``state_dict``/``load_state_dict``/``stats``.
    Build it with ``build_dataloader``."""

    def __init__(self, data, tokenizer, *, seq_len: int, micro_batch_size: int, seed: int, rank: int,
                 world_size: int, trace: bool = False, pin_memory: bool = False):
        data, tokenizer = as_config(data, DataConfig), as_config(tokenizer, TokenizerConfig)
        if seq_len < 1 or micro_batch_size < 1:
            raise ValueError(f"train.seq_len={seq_len} and train.micro_batch_size={micro_batch_size} must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        TextEncoder(tokenizer)  # fail here, not in a worker, if the tokenizer cannot load
        source = make_source(data)
        k = pieces_per_file(data.num_logical_shards, len(source.names))
        per_rank = readers_per_rank(data)
        readers = world_size * per_rank
        if readers > k * len(source.names):
            raise ValueError(
                f"{counted(world_size, 'rank')} x {counted(per_rank, 'reader')} = {readers} readers, but the data has "
                f"only {counted(k * len(source.names), 'logical shard')} ({counted(len(source.names), 'file')}): set "
                f"data.num_logical_shards to at least {readers} (this starts a new data order), or use fewer readers "
                "(data.readers, data.num_workers)"
            )
        self.data, self.world_size, self.rank, self.per_rank = data, world_size, rank, per_rank
        self.pin_memory = pin_memory
        self.plan = Plan(source, k, seed, readers, per_rank, rank, dict(data.weights or {}), max(1, data.shuffle_buffer),
                         seq_len, micro_batch_size, tokenizer, trace, HeldOut(source.names, data.holdout))
        # data.holdout changes which rows are trained on; 0 keeps the fingerprint of states saved before it
        holdout = [data.holdout] if data.holdout else []
        self.fingerprint = hashlib.sha256(
            json.dumps([VERSION, source.fingerprint(), k, seed, *holdout]).encode()).hexdigest()[:16]
        self._readers = [fresh_reader_state() for _ in range(per_rank)]
        self._next = 0
        self._gen = None
        self.last_trace: Optional[tuple] = None  # (worker, events, spans) of the last batch when trace=True

    def __iter__(self):
        self.close()
        self._gen = self._batches()
        return self._gen

    def _batches(self):
        dataset = _Readers(self.plan, list(self._readers), rotation=self._next)
        if self.data.num_workers == 0:
            batches = iter(dataset)
        else:
            # Workers ignore the job's stop signals: the training process finishes its step first.
            batches = iter(DataLoader(dataset, batch_size=None, num_workers=self.data.num_workers, collate_fn=_as_is,
                                      prefetch_factor=self.data.prefetch, 
                                      worker_init_fn=partial(ignore_in_worker, os.getpid())))
        try:
            for logical, windows, state, events, spans in batches:
                self._readers[logical] = state
                self._next = (logical + 1) % self.per_rank
                if self.plan.trace:
                    self.last_trace = (logical, events, spans)
                windows = torch.from_numpy(windows)
                inputs, targets = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
                if self.pin_memory:  # page-locked: the trainer's non_blocking copy to the GPU is asynchronous
                    inputs, targets = inputs.pin_memory(), targets.pin_memory()
                yield inputs, targets
        finally:
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown:
                shutdown()

    def close(self) -> None:
        """Stop the worker processes of the current iteration (a new ``iter()`` restarts them)."""
        if self._gen is not None:
            self._gen.close()
            self._gen = None

    def state_dict(self) -> dict:
        """This rank's data state after the batches handed out so far (JSON-serialisable, KBs).
        ``num_workers`` is the readers per rank (named when each worker process was one reader)."""
        return {"version": VERSION, "fingerprint": self.fingerprint, "world_size": self.world_size,
                "num_workers": self.per_rank, "rank": self.rank, "next_worker": self._next,
                "readers": list(self._readers)}

    def load_state_dict(self, states) -> None:
        """Resume from the states of ALL ranks as saved (a list, or one dict for a single rank).
        Same world size and readers per rank: continues bit for bit. Otherwise the logical shards move to
        their new owners with their progress: in the current epoch no document is repeated or
        skipped (the shuffle order of the rest differs)."""
        states = [states] if isinstance(states, dict) else list(states)
        states = [{**s, "readers": [with_current_names(r) for r in s["readers"]]} for s in states]
        for s in states:
            if s.get("version") != VERSION:
                raise ValueError(f"data state version {s.get('version')} is not {VERSION}; it was written by "
                                 "another fms-dyt version")
            if s["fingerprint"] != self.fingerprint:
                raise ValueError(
                    "the data state was saved for other data: the file list, data.num_logical_shards, data.holdout or "
                    "the seed changed since the checkpoint. Restore them, or start the data order afresh in a new run_dir."
                )
        old_w, old_n = states[0]["world_size"], states[0]["num_workers"]
        ranks = sorted(s["rank"] for s in states)
        if ranks != list(range(old_w)) or any((s["world_size"], s["num_workers"]) != (old_w, old_n) for s in states):
            raise ValueError(f"incomplete data state: expected the states of ranks 0..{old_w - 1} of one run, "
                             f"got ranks {ranks}")
        self.close()
        if (old_w, old_n) == (self.world_size, self.per_rank):
            mine = next(s for s in states if s["rank"] == self.rank)
            self._readers, self._next = list(mine["readers"]), mine["next_worker"]
            return
        if self.rank == 0:
            log.info("data: moving the logical shards of %s x %s to %s x %s", counted(old_w, "rank"),
                     counted(old_n, "reader"), counted(self.world_size, "rank"), counted(self.per_rank, "reader"))
        mine = [self.rank * self.per_rank + r for r in range(self.per_rank)]
        self._readers = redistribute(states, len(self.plan.source.names), self.plan.k, self.plan.seed,
                                     self.plan.readers, mine)
        self._next = 0

    def stats(self) -> dict:
        """Counters of this rank for the training metrics: documents and tokens emitted, bad rows
        and files skipped, held-out rows passed over (since the run began), and the epoch of its
        slowest reader."""
        out = {key: sum(r["stats"].get(key, 0) for r in self._readers) for key in COUNTERS}
        out["epoch"] = min(r["epoch"] for r in self._readers)
        return out


def build_dataloader(data, tokenizer, *, seq_len: int, micro_batch_size: int, seed: int, rank: int,
                     world_size: int, pin_memory: bool = False) -> PackedLoader:
    """The data loader of one rank; ``data``/``tokenizer`` are DataConfig/TokenizerConfig (or
    OmegaConf nodes of them). ``pin_memory``: batches in page-locked memory (CUDA training)."""
    return PackedLoader(data, tokenizer, seq_len=seq_len, micro_batch_size=micro_batch_size, seed=seed,
                        rank=rank, world_size=world_size, pin_memory=pin_memory)
