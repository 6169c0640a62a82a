"""Logical shards, their per-epoch assignment to readers, and the small resumable data state.

Vocabulary. A *reader* is one DataLoader worker of one rank (``reader = rank * workers + worker``).
Each file is cut into ``K = ceil(num_logical_shards / files)`` *pieces*: row ``i`` of file ``f``
belongs to piece ``f * K + slot(i)``, where ``slot`` spreads consecutive rows evenly over the K
slots (Fibonacci hashing), so a file is split inside when there are fewer files than readers.
The pieces are a fixed partition of every document, independent of the world size.

Every epoch, the pieces are put in a new order (files shuffled, then rotated) and cut into one
contiguous run per reader, so a reader reads few files and each file once. A reader streams its
pieces' rows in file order, gathers ``shuffle_buffer`` documents into a *block*, and emits the
block sorted by a per-document random key ``key(seed, epoch, file, row, copy)``.

The state of a reader is therefore tiny: for each piece the row range ``[start, end)`` of the
current block and a key threshold ``tau`` (block documents with ``key <= tau`` are already
emitted), plus the token offset of a document cut at a window border. Runs of pieces sharing
values are stored once. Because keys and piece membership do not depend on the layout, any
reader can rebuild exactly the not-yet-emitted documents of any piece: the same reader
continues bit for bit, and after a change of world size the pieces are redistributed with their
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


def mix(*values: int) -> int:
    """A 63-bit hash of integers, identical on every machine and Python version."""
    data = struct.pack(f"<{len(values)}Q", *(v & _MASK for v in values))
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


def encode_table(pieces: np.ndarray, start: np.ndarray, end: np.ndarray, tau: np.ndarray) -> list:
    """Runs ``[first_piece, last_piece + 1, start, end, tau]`` over sorted ``pieces``; pieces not
    begun this epoch (0, 0, -1) are left out."""
    if len(pieces) == 0:
        return []
    values = np.stack([start, end, tau], axis=1)
    cut = np.ones(len(pieces), dtype=bool)
    cut[1:] = (np.diff(pieces) != 1) | (values[1:] != values[:-1]).any(axis=1)
    firsts = np.flatnonzero(cut)
    lasts = np.append(firsts[1:], len(pieces))
    return [[int(pieces[a]), int(pieces[b - 1]) + 1, *map(int, values[a])]
            for a, b in zip(firsts, lasts) if tuple(values[a]) != (0, 0, -1)]


def decode_table(runs: list, pieces: np.ndarray):
    """(start, end, tau) arrays for ``pieces`` from runs made by ``encode_table``."""
    start = np.zeros(len(pieces), dtype=np.int64)
    end = np.zeros(len(pieces), dtype=np.int64)
    tau = np.full(len(pieces), -1, dtype=np.int64)
    if runs:
        runs = sorted(runs)
        first = np.array([r[0] for r in runs], dtype=np.int64)
        stop = np.array([r[1] for r in runs], dtype=np.int64)
        vals = np.array([r[2:5] for r in runs], dtype=np.int64)
        i = np.searchsorted(first, pieces, side="right") - 1
        hit = (i >= 0) & (pieces < stop[np.maximum(i, 0)])
        start[hit], end[hit], tau[hit] = vals[i[hit]].T
    return start, end, tau


def fresh_reader_state() -> dict:
    return {"epoch": 0, "tau": -1, "epochs": {}, "stats": {}}


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
    last = max([o["epoch"] for o in old] + [int(e) for o in old for e in o["epochs"]])
    result = []
    for r in mine:
        epochs = {}
        for epoch in range(first, last + 1):
            pieces = np.sort(Layout(num_files, k, seed, epoch, readers).pieces_of(r))
            owners = Layout(num_files, k, seed, epoch, old_r).owner(pieces)
            start = np.zeros(len(pieces), dtype=np.int64)
            end = np.zeros(len(pieces), dtype=np.int64)
            tau = np.full(len(pieces), -1, dtype=np.int64)
            partials = []
            for o in np.unique(owners):
                sel = owners == o
                st = old[o]
                if st["epoch"] > epoch:  # that reader finished all its pieces of this epoch
                    start[sel] = end[sel] = END
                elif str(epoch) in st["epochs"]:
                    entry = st["epochs"][str(epoch)]
                    s_, e_, t_ = decode_table(entry["pieces"], pieces[sel])
                    if st["epoch"] == epoch:  # its block progress applies to its current epoch only
                        t_ = np.maximum(t_, st["tau"])
                    start[sel], end[sel], tau[sel] = s_, e_, t_
                    owned = set(pieces[sel].tolist())
                    partials += [p for p in entry["partials"] if p[0] in owned]
            runs = encode_table(pieces, start, end, tau)
            if runs or partials:
                epochs[str(epoch)] = {"pieces": runs, "partials": partials}
        result.append({"epoch": first, "tau": -1, "epochs": epochs, "stats": {}})
    if 0 in mine:  # keep the run's totals: the old counters go to the new first reader
        totals: dict = {}
        for o in old:
            for key, value in o["stats"].items():
                if key != "epoch":
                    totals[key] = totals.get(key, 0) + value
        result[mine.index(0)]["stats"] = totals
    return result
