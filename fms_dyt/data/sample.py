"""The ``sample`` corpus: tens of MB in the Pile's schema, built in seconds from text already on
this machine, so the quickstart and the tests run offline.

Subsets (``meta.pile_set_name``): the Python standard library's modules, its tests, the
docstrings gathered per module, the language reference shipped in ``pydoc_data``, and, where the
system has them, English man pages and package documentation under /usr/share. The same machine
always builds the same bytes (sorted inputs, fixed caps). Written to
``$FMS_DYT_CACHE/sample-v<VERSION>`` (default ``~/.cache/fms_dyt/sample-v3``) as 8 jsonl.zst shards plus
``manifest.json``; never part of the repository.
"""

from __future__ import annotations

import fcntl
import functools
import gzip
import hashlib
import json
import os
import re
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional

from fms_dyt.data.tokenizer import cache_root

VERSION = 3
NUM_SHARDS = 8
_MB = 1 << 20
CAPS = {"python-tests": 6 * _MB, "man-pages": 6 * _MB, "package-docs": 4 * _MB}  # bytes of text per subset
# Longer sources are cut into documents of at most this many characters, at blank lines where
# possible: a module of 100 kB would otherwise fill a data reader for dozens of steps, and a tiny
# model's loss would follow that one file up and down (docs/quickstart.md).
MAX_DOCUMENT_CHARS = 600
_DOCSTRING = re.compile(r'(?:"""|\'\'\')(.*?)(?:"""|\'\'\')', re.S)
_ROFF_ESCAPE = re.compile(r"\\f(?:\[[^\]]*\]|\(..|.)|\\\(..|\\\[[^\]]*\]|\\[&|^%:]")


@functools.lru_cache(maxsize=1)
def _stdlib() -> tuple:
    """(relative path, text) of the standard library's modules, read once per build."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__", "pydoc_data"}
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if not skip & set(rel.parts):
            text = _read_text(path)
            if text and text.strip():
                found.append((rel, text))
    return tuple(found)


def _is_test(rel: Path) -> bool:
    return any(part in ("test", "tests", "idle_test") for part in rel.parts) or rel.name.startswith("test_")


def _read_text(path: Path) -> Optional[str]:
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile):
        return None
    if b"\0" in raw[:4096]:  # binary
        return None
    return raw.decode("utf-8", errors="replace")


def _roff_to_text(src: str) -> str:
    """Man page source without the markup (good enough to read and to tokenize)."""
    out = []
    for line in src.splitlines():
        if line.startswith(('.\\"', "'\\\"")):
            continue
        if line.startswith("."):
            words = line[1:].split(None, 1)
            if len(words) < 2:
                continue
            line = words[1].replace('"', "")
        out.append(_ROFF_ESCAPE.sub("", line).replace("\\-", "-").replace("\\e", "\\"))
    return "\n".join(out).strip()


def _modules(tests: bool) -> Iterator[tuple[str, str]]:
    for rel, text in _stdlib():
        if _is_test(rel) == tests:
            yield str(rel), text


def _docstrings() -> Iterator[tuple[str, str]]:
    for rel, source in _modules(tests=False):
        strings = [s.strip() for s in _DOCSTRING.findall(source) if len(s.strip()) > 40]
        if sum(map(len, strings)) > 200:
            name = ".".join(Path(rel).with_suffix("").parts)
            yield rel, f"Docstrings of the Python module {name}\n\n" + "\n\n".join(strings)


def _reference() -> Iterator[tuple[str, str]]:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return
    for name in sorted(topics):
        yield name, topics[name]


def _man_pages() -> Iterator[tuple[str, str]]:
    man = Path("/usr/share/man")
    for section in sorted(man.glob("man[1-8]")) if man.is_dir() else []:
        for path in sorted(section.iterdir()):
            text = _read_text(path) if path.is_file() else None
            if text and not text.startswith(".so "):  # .so pages only point to another page
                text = _roff_to_text(text)
                if len(text) > 200:
                    yield str(path.relative_to(man)), text


def _package_docs() -> Iterator[tuple[str, str]]:
    docs = Path("/usr/share/doc")
    pattern = re.compile(r"^(README|NEWS|copyright|changelog|.*\.(txt|md|rst))", re.I)
    for package in sorted(docs.iterdir()) if docs.is_dir() else []:
        for path in sorted(package.rglob("*")) if package.is_dir() else []:
            if path.is_file() and not path.is_symlink() and pattern.match(path.name.removesuffix(".gz")):
                text = _read_text(path)
                if text and len(text.strip()) > 200:
                    yield str(path.relative_to(docs)), text


SUBSETS = {
    "python-stdlib": lambda: _modules(tests=False),
    "python-tests": lambda: _modules(tests=True),
    "python-docstrings": _docstrings,
    "python-reference": _reference,
    "man-pages": _man_pages,
    "package-docs": _package_docs,
}


def _pieces(text: str, limit: int = MAX_DOCUMENT_CHARS) -> list[str]:
    """``text`` cut into consecutive pieces of at most ``limit`` characters (joined they give it
    back): at the last blank line before the limit, else the last line break, else at the limit."""
    pieces = []
    while len(text) > limit:
        cut = text.rfind("\n\n", 0, limit) + 2
        if cut < 2:
            cut = text.rfind("\n", 0, limit) + 1
        if cut < 1:
            cut = limit
        pieces.append(text[:cut])
        text = text[cut:]
    return pieces + [text] if text else pieces


def _documents() -> Iterator[tuple[str, str, str]]:
    """(subset, origin, text) in a fixed order; a capped subset ends before the source that would
    pass its cap, and nothing after it is read. Origins of a cut source end in ``#<piece>``."""
    for subset, documents in SUBSETS.items():
        size = 0
        for origin, text in documents():
            if size + len(text) > CAPS.get(subset, float("inf")):
                break
            size += len(text)
            pieces = _pieces(text)
            for i, piece in enumerate(pieces):
                if piece.strip():
                    yield subset, origin if len(pieces) == 1 else f"{origin}#{i}", piece


def build_sample(out: Path) -> dict:
    """Write the corpus into ``out`` (8 jsonl.zst shards + manifest.json); return the manifest."""
    import zstandard

    out.mkdir(parents=True, exist_ok=True)
    shards = [[] for _ in range(NUM_SHARDS)]
    counts: dict[str, list[int]] = {}
    for subset, origin, text in _documents():
        n_docs, n_bytes = counts.setdefault(subset, [0, 0])
        counts[subset] = [n_docs + 1, n_bytes + len(text)]
        line = json.dumps({"text": text, "meta": {"pile_set_name": subset, "origin": origin}})
        # a hash of subset and origin places each document: every shard mixes all subsets
        h = int(hashlib.sha1(f"{subset}/{origin}".encode()).hexdigest(), 16)
        shards[h % NUM_SHARDS].append((h, line))
    names = []
    for i, lines in enumerate(shards):
        name = f"sample-{i:02d}-of-{NUM_SHARDS:02d}.jsonl.zst"
        text = "\n".join(line for _, line in sorted(lines)) + "\n"
        (out / name).write_bytes(zstandard.ZstdCompressor(level=3).compress(text.encode()))
        names.append(name)
    manifest = {"version": VERSION, "python": sys.version.split()[0], "shards": names,
                "documents": {k: v[0] for k, v in counts.items()}, "text_bytes": {k: v[1] for k, v in counts.items()}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def sample_dir(path: Optional[str] = None) -> Path:
    return Path(path).expanduser() if path else cache_root() / f"sample-v{VERSION}"  # versions side by side: checkouts share the cache


def ensure_sample(path: Optional[str] = None) -> Path:
    """The sample corpus directory, built first if missing or from an older version."""
    target = sample_dir(path)
    manifest = target / "manifest.json"

    def ready() -> bool:
        try:
            return json.loads(manifest.read_text())["version"] == VERSION
        except (OSError, ValueError, KeyError):
            return False

    if ready():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # ranks and workers on one machine build it once
        if not ready():
            t0 = time.perf_counter()
            tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
            try:
                info = build_sample(tmp)
                if target.exists():
                    shutil.rmtree(target)
                os.rename(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            print(f"fms-dyt: built the sample corpus in {target} ({sum(info['documents'].values())} documents, "
                  f"{sum(info['text_bytes'].values()) / _MB:.0f} MB of text, {time.perf_counter() - t0:.1f} s)",
                  file=sys.stderr)
    return target
