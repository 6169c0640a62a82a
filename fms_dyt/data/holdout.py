"""The held-out slice of a source: documents that training never reads and validation does.

A row is held out when a hash of its file's name (as the source names it, relative to the data
directory) and its row number falls below ``data.holdout``. The seed takes no part, so every run
and every seed of a study holds out, and is validated on, the same documents; nor does the world
size, the number of workers or ``data.num_logical_shards``.
"""

from __future__ import annotations

import hashlib

from fms_dyt.data.state import mix

_TAG_HOLDOUT = 5


def _name_key(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


class HeldOut:
    """``held_out(f, row)``: whether row ``row`` of file ``f`` of ``names`` is held out."""

    def __init__(self, names: list[str], fraction: float):
        self.fraction = fraction
        self._threshold = int(fraction * (1 << 63))  # mix() is 63 bits
        self._file_keys = [_name_key(name) for name in names]

    def __call__(self, f: int, row: int) -> bool:
        return self._threshold > 0 and mix(_TAG_HOLDOUT, self._file_keys[f], row) < self._threshold
