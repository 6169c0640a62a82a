"""Where documents come from: local files (.jsonl, .jsonl.zst, .parquet), a hub dataset streamed
with ``datasets`` (the Pile), and the offline sample corpus.

Every source is a list of files read row by row. ``Source.read(f, start, want, stop)`` yields,
for the rows of file ``f`` in ``[start, stop)`` that ``want(row)`` accepts, either a document
``(row, text, pile_set_name)`` or a bad row ``(row, None, reason)``; rows ``want`` rejects are
not even parsed. A file that cannot be read to its end raises ``ShardError`` after the rows
before the damage. Rows are numbered from 0 in file order (line numbers for jsonl), so a row
number names the same document on every machine.
"""

from __future__ import annotations

import glob
import hashlib
import os
import json
import logging
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

from fms_dyt.data.config import DataConfig

log = logging.getLogger(__name__)

Row = tuple  # (row, text or None, pile_set_name or reason)
FORMATS = (".jsonl", ".jsonl.zst", ".parquet")
_CHUNK = 1 << 22


class ShardError(Exception):
    """A file that could not be read to its end (corrupt, truncated, unreachable)."""

    def __init__(self, file: str, row: int, cause: BaseException):
        super().__init__(f"{file}: unreadable after row {row} ({type(cause).__name__}: {cause})")
        self.file, self.row, self.cause = file, row, cause


def document(obj, row: int) -> Row:
    """A parsed row checked against the Pile schema {"text", "meta": {"pile_set_name"}}."""
    if not isinstance(obj, dict):
        return row, None, "not a JSON object"
    text = obj.get("text")
    if not isinstance(text, str):
        return row, None, "no text field"
    if not text.strip():
        return row, None, "empty document"
    meta = obj.get("meta")
    subset = meta.get("pile_set_name") if isinstance(meta, dict) else None
    return row, text, subset if isinstance(subset, str) else "unknown"


class Source:
    """A fixed, ordered list of files; ``names`` identify them in logs and saved states."""

    names: list[str]
    kind: str

    def read(self, f: int, start: int, want: Callable[[int], bool], stop: Optional[int] = None) -> Iterator[Row]:
        raise NotImplementedError

    def where(self, f: int) -> str:
        """How logs name file ``f``."""
        return self.names[f]

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps([self.kind, self.names]).encode()).hexdigest()[:16]


def _zstd_chunks(fh) -> Iterator[bytes]:
    """Decompressed chunks of a (multi-frame) zstd stream; raises if it ends inside a frame."""
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    obj, in_frame = dctx.decompressobj(), False
    while data := fh.read(_CHUNK):
        while data:
            in_frame = True
            out = obj.decompress(data)
            if out:
                yield out
            if obj.eof:  # the frame is complete; what is left starts the next one
                data, obj, in_frame = obj.unused_data, dctx.decompressobj(), False
            else:
                data = b""
    if in_frame:
        raise EOFError("the zstd stream ends inside a frame (truncated file)")


def _lines(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        chunks = _zstd_chunks(fh) if path.name.endswith(".zst") else iter(lambda: fh.read(_CHUNK), b"")
        rest = b""
        for chunk in chunks:
            parts = (rest + chunk).split(b"\n")
            rest = parts.pop()
            yield from parts
        if rest:
            yield rest


class LocalSource(Source):
    """.jsonl, .jsonl.zst and .parquet files under a directory, a glob or a single file."""

    kind = "local"

    def __init__(self, path: str, key: str = "data.path"):
        self.files = find_files(path, key)
        root = Path(path).expanduser()
        base = root if root.is_dir() else Path(os.path.commonpath([p.parent for p in self.files]))
        # relative names: a state saved on one mount point resumes from a copy of the data elsewhere
        self.names = [str(p.relative_to(base)) if p.is_relative_to(base) else str(p) for p in self.files]

    def where(self, f: int) -> str:
        return str(self.files[f])

    def read(self, f: int, start: int, want: Callable[[int], bool], stop: Optional[int] = None) -> Iterator[Row]:
        path = self.files[f]
        reader = _parquet_rows if path.suffix == ".parquet" else _jsonl_rows
        row = start
        try:
            for row_tuple in reader(path, start, want, stop):
                row = row_tuple[0]
                yield row_tuple
        except Exception as e:  # I/O, truncation, zstd and pyarrow errors alike end this file
            raise ShardError(str(path), row, e) from e


def _jsonl_rows(path: Path, start: int, want, stop) -> Iterator[Row]:
    for row, line in enumerate(_lines(path)):
        if stop is not None and row >= stop:
            return
        if row < start or not want(row):
            continue
        if not line.strip():
            yield row, None, "blank line"
            continue
        try:
            obj = json.loads(line.decode())  # str: json.loads would first detect the encoding of bytes
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
            yield row, None, f"broken JSON ({e})"
            continue
        yield document(obj, row)


def _parquet_rows(path: Path, start: int, want, stop) -> Iterator[Row]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if "text" not in names:
        raise KeyError(f"no 'text' column (columns: {names})")
    columns = ["text"] + (["meta"] if "meta" in names else [])
    first = 0
    for group in range(pf.num_row_groups):
        n = pf.metadata.row_group(group).num_rows
        if first + n <= start:  # parquet can skip whole row groups without reading them
            first += n
            continue
        for batch in pf.iter_batches(batch_size=1024, row_groups=[group], columns=columns):
            texts = batch.column("text").to_pylist()
            metas = batch.column("meta").to_pylist() if "meta" in columns else [None] * len(texts)
            for i, (text, meta) in enumerate(zip(texts, metas)):
                row = first + i
                if stop is not None and row >= stop:
                    return
                if row >= start and want(row):
                    yield document({"text": text, "meta": meta}, row)
            first += len(texts)


def find_files(path: str, key: str = "data.path") -> list[Path]:
    """The data files named by ``path`` (directory, file or glob), sorted; clear errors otherwise."""
    hint = f"set {key}=<a directory, file or glob of {', '.join(FORMATS)} files>"
    p = Path(path).expanduser()
    if p.is_dir():
        found = [x for x in p.rglob("*") if x.is_file() and not x.name.startswith(".")]
    elif p.is_file():
        found = [p]
    elif glob.has_magic(path):
        found = [Path(x) for x in glob.glob(str(p), recursive=True) if Path(x).is_file()]
    else:
        raise FileNotFoundError(f"{key}={path!r} does not exist; {hint}")
    files = sorted(x for x in found if x.name.endswith(FORMATS))
    if not files:
        raise FileNotFoundError(f"{key}={path!r} contains no {', '.join(FORMATS)} files; {hint}")
    return files


class HubSource(Source):
    """A dataset streamed with ``datasets.load_dataset(..., streaming=True)``: one shard per file.

    ``datasets`` parses JSON in blocks, so a broken line ends its shard for the epoch (counted
    in ``skipped_files``); the ``local`` source skips single rows instead."""

    kind = "hub"

    def __init__(self, cfg: DataConfig):
        import datasets

        self.cfg = cfg
        what = f"data.hub_name={cfg.hub_name!r}" + (f" (data_files={cfg.hub_data_files!r})" if cfg.hub_data_files else "")
        try:
            self.ds = datasets.load_dataset(cfg.hub_name, data_files=cfg.hub_data_files, split=cfg.hub_split,
                                            streaming=True)
        except (ConnectionError, OSError) as e:
            raise RuntimeError(
                f"cannot stream {what}, split {cfg.hub_split!r}: {e}. Without network access, download the "
                "shards where the hub is reachable and use data=local data.path=<their directory>; if the dataset "
                "is in the Hugging Face cache, set HF_HUB_OFFLINE=1."
            ) from None
        except Exception as e:
            raise RuntimeError(f"cannot load {what}, split {cfg.hub_split!r}: {type(e).__name__}: {e}") from None
        files = getattr(self.ds._ex_iterable, "kwargs", {}).get("original_files")
        n = self.ds.n_shards
        self.names = [str(x) for x in files] if files and len(files) == n else [f"{cfg.hub_name}#{i}" for i in range(n)]

    def read(self, f: int, start: int, want: Callable[[int], bool], stop: Optional[int] = None) -> Iterator[Row]:
        import pyarrow
        import zstandard

        row, attempts = start, 0
        while True:
            try:
                shard = self.ds.shard(num_shards=len(self.names), index=f, contiguous=True)
                row = -1
                # .iter(), unlike iterating the dataset, does not split it again across DataLoader workers
                for batch in shard.iter(batch_size=256):
                    texts = batch.get("text") or [None] * len(next(iter(batch.values())))
                    metas = batch.get("meta") or [None] * len(texts)
                    for text, meta in zip(texts, metas):
                        row += 1
                        if stop is not None and row >= stop:
                            return
                        if row < start or not want(row):
                            continue
                        yield document({"text": text, "meta": meta}, row)
                        start = row + 1
                if row < 0:  # fsspec ends a zstd stream cut inside its first block quietly
                    raise EOFError("no rows: an empty file, or a compressed file truncated early")
                return
            except (ValueError, pyarrow.ArrowException, zstandard.ZstdError, EOFError) as e:  # the data itself
                raise ShardError(self.names[f], row, e) from e
            except Exception as e:  # network: reopen and skip to where we were
                if attempts >= self.cfg.hub_retries:
                    raise ShardError(self.names[f], row, e) from e
                attempts += 1
                log.warning("%s: %s at row %d; reopening (attempt %d of %d)", self.names[f], e, row, attempts,
                            self.cfg.hub_retries)
                time.sleep(2.0 ** attempts)


def make_source(cfg: DataConfig) -> Source:
    if cfg.name == "local":
        return LocalSource(cfg.path)
    if cfg.name == "pile":
        return HubSource(cfg)
    from fms_dyt.data.sample import ensure_sample

    return SampleSource(str(ensure_sample(cfg.path)), key="data.path (sample corpus)")


class SampleSource(LocalSource):
    """The sample corpus's shards (see ``sample.py``)."""

    kind = "sample"
