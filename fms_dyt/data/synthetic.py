"""Small generated shards in the Pile's schema, with optional bad rows and a truncated shard: for
the tests, the throughput benchmark, and for trying ``python -m fms_dyt.data scan`` on bad input.

    python -m fms_dyt.data.synthetic /tmp/shards --files 3 --rows 200 --bad-rows --corrupt
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

_WORDS = ("the model data token layer norm tanh alpha scale train loss step batch shard epoch file row "
          "gradient weight value window document reader worker rank seed state resume pile text code "
          "python function return class import def self 0 1 2 3 4 5 6 7 8 9 { } ( ) = + - * / , . : ;").split()
SUBSETS = ("Pile-CC", "Github", "Wikipedia (en)", "ArXiv")
BAD_ROWS = ('{"text": "broken', '{"meta": {"pile_set_name": "Github"}}', '{"text": ""}', "", '["not", "an object"]',
            '{"text": 42}')


def _text(rng: random.Random) -> str:
    words = rng.choices(_WORDS, k=rng.randint(3, 300))
    return " ".join(words) + ("\n" + " ".join(rng.choices(_WORDS, k=rng.randint(1, 40))) if rng.random() < 0.3 else "")


def write_shards(out_dir, files: int = 3, rows: int = 200, bad_rows: bool = False, corrupt: bool = False,
                 fmt: str = "jsonl.zst", seed: int = 0) -> dict:
    """Write ``files`` shards of ``rows`` rows (plus, with ``corrupt``, one shard cut in the middle of
    its zstd stream); return {"documents": good rows, "bad_rows": n, "files": [...]}.
    With ``bad_rows`` every jsonl shard gets one of each kind of bad row in ``BAD_ROWS`` (parquet
    shards an empty and a missing text); ``corrupt`` applies to jsonl.zst."""
    import zstandard

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    info = {"documents": 0, "bad_rows": 0, "files": []}
    for i in range(files + (1 if corrupt else 0)):
        lines = []
        for r in range(rows):
            lines.append(json.dumps({"text": _text(rng), "meta": {"pile_set_name": SUBSETS[(r * 7 + i) % len(SUBSETS)]}}))
        is_corrupt = corrupt and i == files
        if fmt == "parquet":  # a typed column: only an empty and a missing text can be bad
            import pyarrow as pa
            import pyarrow.parquet as pq

            rows_ = [json.loads(line) for line in lines]
            if bad_rows:
                rows_[len(rows_) // 3:len(rows_) // 3] = [{"text": "", "meta": None}]
                rows_[len(rows_) // 2:len(rows_) // 2] = [{"text": None, "meta": None}]
                info["bad_rows"] += 2
            name = f"shard-{i:03d}.parquet"
            pq.write_table(pa.Table.from_pylist(rows_), out / name, row_group_size=max(1, rows // 3))
            info["files"].append(name)
            info["documents"] += rows
            continue
        if bad_rows and not is_corrupt:
            for j, bad in enumerate(BAD_ROWS):
                lines.insert((j + 1) * len(lines) // (len(BAD_ROWS) + 1), bad)
            info["bad_rows"] += len(BAD_ROWS)
        data = ("\n".join(lines) + "\n").encode()
        name = f"{'corrupt' if is_corrupt else 'shard'}-{i:03d}.{fmt}"
        if fmt == "jsonl.zst":
            data = zstandard.ZstdCompressor(level=3).compress(data)
            if is_corrupt:
                data = data[: len(data) * 3 // 5]
        (out / name).write_bytes(data)
        info["files"].append(name)
        if not is_corrupt:
            info["documents"] += rows
    return info


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--files", type=int, default=3)
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--bad-rows", action="store_true")
    ap.add_argument("--corrupt", action="store_true")
    ap.add_argument("--format", default="jsonl.zst", choices=("jsonl", "jsonl.zst", "parquet"))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    print(json.dumps(write_shards(a.out_dir, a.files, a.rows, a.bad_rows, a.corrupt, a.format, a.seed)))


if __name__ == "__main__":
    main()
