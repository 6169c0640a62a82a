"""Logical shards, their per-epoch assignment to readers, and the small resumable data state.

Vocabulary. A *reader* is one of the ``data.readers`` streams of a rank (``reader = rank * readers
per rank + r``), played by one of its DataLoader workers.
Each file is cut into ``K = ceil(num_logical_shards / files)`` *pieces*: row ``i`` of file ``f``
belongs to piece ``f * K + slot(i)``, where ``slot`` spreads consecutive rows evenly over the K
slots (Fibonacci hashing), so a file is split inside when there are fewer files than readers.
The pieces are a fixed partition of every document, independent of the world size.

Every epoch, the pieces are put in a new order (files shuffled, then rotated) and cut into one
contiguous run per reader, so a reader reads few files and each file once. A reader streams its
pieces' rows in file order, gathers ``shuffle_buffer`` documents into a *block*, and emits the
block sorted by a per-document random key ``key(seed, epoch, file, row, copy)``.

The state of a reader is therefore tiny (``Reader.snapshot``)::

    {"epoch": the epoch being read,
     "emitted_key": key of the last document emitted from the current block (-1: none yet),
     "epoch_progress": {epoch: {"piece_runs": [[first_piece, end_piece, block_start_row,
                                                block_end_row, emitted_key], ...],
                                "cut_documents": [[piece, row, copy, token_offset], ...]}},
     "stats": counters}

For each piece: the row range ``[block_start_row, block_end_row)`` of the current block and a key
threshold (block documents with ``key <= emitted_key`` are already emitted), stored once per run
of consecutive pieces sharing the values; and the token offset of each document cut at a window
border. Progress is kept per epoch because after a change of world size a reader may own pieces
whose old reader was already in a later epoch. States written before these names (``tau``,
``epochs``, ``pieces``, ``partials``) load unchanged (``with_current_names``).

Because keys and piece membership do not depend on the layout, any reader can rebuild exactly
the not-yet-emitted documents of any piece: the same reader continues bit for bit, and after a change of world size the pieces are redistributed with their
progress, so no document of the epoch is repeated or skipped.
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np

VERSION = 1
END = 1 << 62  # a cursor past the last row: the piece is finished for this epoch
_GOLDEN = 0x9E3779B97F4A7C15
_MASK = (1 << 64) - 1
_TAG_FILES, _TAG_ROTATE, _TAG_KEY, _TAG_COPY = 1, 2, 3, 4
_PACKERS: dict = {}


def mix(*values: int) -> int:
    """A 63-bit hash of integers, identical on every machine and Python version."""
    # called twice per document (its key, the held-out test): the packer is made once per arity
    pack = _PACKERS.get(len(values)) or _PACKERS.setdefault(len(values), struct.Struct(f"<{len(values)}Q").pack)
    try:
        data = pack(*values)
    except struct.error:  # a negative value (a seed): hashed as its 64-bit two's complement
        data = pack(*[v & _MASK for v in values])
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def doc_key(seed: int, epoch: int, f: int, row: int, copy: int) -> int:
    return mix(_TAG_KEY, seed, epoch, f, row, copy)


def copies(seed: int, epoch: int, f: int, row: int, weight: float) -> int:
    """How many times a row of this weight is used in this epoch (the fraction is drawn per row)."""
    whole = int(weight)
    frac = weight - whole
    return whole + (frac > 0 and mix(_TAG_COPY, seed, epoch, f, row) < frac * (1 << 63))


def slot(row: int, k: int) -> int:
    return (((row * _GOLDEN) & _MASK) * k) >> 64


def pieces_per_file(num_logical_shards: int, num_files: int) -> int:
    return max(1, -(-num_logical_shards // num_files))


class Layout:
    """Which pieces each of ``readers`` readers owns in ``epoch``, and in which order it reads them."""

    def __init__(self, num_files: int, k: int, seed: int, epoch: int, readers: int):
        self.F, self.K, self.P, self.R = num_files, k, num_files * k, readers
        perm = list(range(num_files))
        for i in range(num_files - 1, 0, -1):  # Fisher-Yates on our own hash: stable everywhere
            j = mix(_TAG_FILES, seed, epoch, i) % (i + 1)
            perm[i], perm[j] = perm[j], perm[i]
        self.perm = np.array(perm, dtype=np.int64)
        self.rank_of_file = np.empty(num_files, dtype=np.int64)
        self.rank_of_file[self.perm] = np.arange(num_files)
        self.offset = mix(_TAG_ROTATE, seed, epoch) % self.P

    def pieces_of(self, reader: int) -> np.ndarray:
        """The reader's pieces in reading order."""
        q = np.arange(reader * self.P // self.R, (reader + 1) * self.P // self.R, dtype=np.int64)
        s = (q + self.offset) % self.P
        return self.perm[s // self.K] * self.K + s % self.K

    def owner(self, pieces: np.ndarray) -> np.ndarray:
        f, k = np.divmod(pieces, self.K)
        q = (self.rank_of_file[f] * self.K + k - self.offset) % self.P
        return ((q + 1) * self.R + self.P - 1) // self.P - 1


def encode_table(pieces: np.ndarray, start: np.ndarray, end: np.ndarray, emitted_key: np.ndarray) -> list:
    """Runs ``[first_piece, last_piece + 1, start, end, emitted_key]`` over sorted ``pieces``;
    pieces not begun this epoch (0, 0, -1) are left out."""
    if len(pieces) == 0:
        return []
    values = np.stack([start, end, emitted_key], axis=1)
    cut = np.ones(len(pieces), dtype=bool)
    cut[1:] = (np.diff(pieces) != 1) | (values[1:] != values[:-1]).any(axis=1)
    firsts = np.flatnonzero(cut)
    lasts = np.append(firsts[1:], len(pieces))
    return [[int(pieces[a]), int(pieces[b - 1]) + 1, *map(int, values[a])]
            for a, b in zip(firsts, lasts) if tuple(values[a]) != (0, 0, -1)]


def decode_table(runs: list, pieces: np.ndarray):
    """(start, end, emitted_key) arrays for ``pieces`` from runs made by ``encode_table``."""
    start = np.zeros(len(pieces), dtype=np.int64)
    end = np.zeros(len(pieces), dtype=np.int64)
    emitted_key = np.full(len(pieces), -1, dtype=np.int64)
    if runs:
        runs = sorted(runs)
        first = np.array([r[0] for r in runs], dtype=np.int64)
        stop = np.array([r[1] for r in runs], dtype=np.int64)
        vals = np.array([r[2:5] for r in runs], dtype=np.int64)
        i = np.searchsorted(first, pieces, side="right") - 1
        hit = (i >= 0) & (pieces < stop[np.maximum(i, 0)])
        start[hit], end[hit], emitted_key[hit] = vals[i[hit]].T
    return start, end, emitted_key


def fresh_reader_state() -> dict:
    return {"epoch": 0, "emitted_key": -1, "epoch_progress": {}, "stats": {}}


def with_current_names(reader: dict) -> dict:
    """A reader state under today's field names; states saved before them (``tau``, ``epochs``,
    ``pieces``, ``partials``, same meaning) are renamed."""
    if "tau" not in reader:
        return reader
    progress = {epoch: {"piece_runs": entry["pieces"], "cut_documents": entry["partials"]}
                for epoch, entry in reader["epochs"].items()}
    return {"epoch": reader["epoch"], "emitted_key": reader["tau"], "epoch_progress": progress,
            "stats": reader["stats"]}


def redistribute(states: list[dict], num_files: int, k: int, seed: int, readers: int, mine: list[int]) -> list[dict]:
    """Reader states for readers ``mine`` of a ``readers``-reader layout, from the states all ranks
    saved under another layout: every piece keeps its progress, now with its new owner."""
    old_n = states[0]["num_workers"]
    old_r = states[0]["world_size"] * old_n
    old = [None] * old_r
    for s in states:
        for w, reader in enumerate(s["readers"]):
            old[s["rank"] * old_n + w] = reader
    first = min(o["epoch"] for o in old)
    last = max([o["epoch"] for o in old] + [int(e) for o in old for e in o["epoch_progress"]])
    result = []
    for r in mine:
        progress = {}
        for epoch in range(first, last + 1):
            pieces = np.sort(Layout(num_files, k, seed, epoch, readers).pieces_of(r))
            owners = Layout(num_files, k, seed, epoch, old_r).owner(pieces)
            start = np.zeros(len(pieces), dtype=np.int64)
            end = np.zeros(len(pieces), dtype=np.int64)
            emitted_key = np.full(len(pieces), -1, dtype=np.int64)
            cut_documents = []
            for o in np.unique(owners):
                sel = owners == o
                st = old[o]
                if st["epoch"] > epoch:  # that reader finished all its pieces of this epoch
                    start[sel] = end[sel] = END
                elif str(epoch) in st["epoch_progress"]:
                    entry = st["epoch_progress"][str(epoch)]
                    s_, e_, k_ = decode_table(entry["piece_runs"], pieces[sel])
                    if st["epoch"] == epoch:  # its block progress applies to its current epoch only
                        k_ = np.maximum(k_, st["emitted_key"])
                    start[sel], end[sel], emitted_key[sel] = s_, e_, k_
                    owned = set(pieces[sel].tolist())
                    cut_documents += [p for p in entry["cut_documents"] if p[0] in owned]
            runs = encode_table(pieces, start, end, emitted_key)
            if runs or cut_documents:
                progress[str(epoch)] = {"piece_runs": runs, "cut_documents": cut_documents}
        result.append({"epoch": first, "emitted_key": -1, "epoch_progress": progress, "stats": {}})
    if 0 in mine:  # keep the run's totals: the old counters go to the new first reader
        totals: dict = {}
        for o in old:
            for key, value in o["stats"].items():
                if key != "epoch":
                    totals[key] = totals.get(key, 0) + value
        result[mine.index(0)]["stats"] = totals
    return result
