"""Checks users run before a big job: ``scan`` (does one epoch give every document exactly once
for this world size?) and ``preview`` (what do the first windows look like?)."""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from contextlib import contextmanager

from fms_dyt.data.config import DataConfig, TokenizerConfig, as_config
from fms_dyt.data.pipeline import PackedLoader
from fms_dyt.data.state import copies
from fms_dyt.data.tokenizer import TextEncoder
from fms_dyt.errors import counted


def present_documents(loader: PackedLoader) -> tuple[dict, int, set, int]:
    """Read every file once, straight from the source: {(file, row, copy): subset} of the
    documents epoch 0 should deliver, the number of bad rows, the files that end early, and the
    rows held out for validation (``data.holdout``)."""
    plan = loader.plan
    expected, bad_rows, bad_files, held_out = {}, 0, set(), 0
    for f in range(len(plan.source.names)):
        try:
            for row, text, info in plan.source.read(f, 0, lambda row: True):
                if plan.held_out(f, row):  # for validation, never delivered
                    held_out += 1
                    continue
                if text is None:
                    bad_rows += 1
                    continue
                n = copies(plan.seed, 0, f, row, plan.weights.get(info, 1.0)) if plan.weights else 1
                for c in range(n):
                    expected[(f, row, c)] = info
        except Exception:  # the loader must stop at the same row; scan reports the file as skipped
            bad_files.add(f)
    return expected, bad_rows, bad_files, held_out


@contextmanager
def _quiet_readers():
    """These tools report bad input themselves, once, instead of every reader logging it."""
    logger = logging.getLogger("fms_dyt.data.pipeline")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _event(loader: PackedLoader, f: int, row, reason: str) -> str:
    return reason if row is None else f"{loader.plan.source.where(f)} line {row + 1}: {reason}"


def scan(data, tokenizer, *, world_size: int, seq_len: int, micro_batch_size: int, seed: int) -> dict:
    """Run epoch 0 of the loader of every rank (with its DataLoader workers) and compare the
    documents it delivers with those in the files. A document counts as seen once all its tokens
    came out exactly once; ``duplicates`` are documents with tokens delivered twice; ``held_out``
    are the rows kept for validation, never delivered (without bad rows or weights,
    ``documents_seen + held_out`` is every row of the files). Bad input is reported in the result
    (first examples in ``skipped_examples``)."""
    with _quiet_readers():
        return _scan(data, tokenizer, world_size, seq_len, micro_batch_size, seed)


def _scan(data, tokenizer, world_size, seq_len, micro_batch_size, seed) -> dict:
    t0 = time.perf_counter()
    data, tokenizer = as_config(data, DataConfig), as_config(tokenizer, TokenizerConfig)
    tokens_of = defaultdict(int)  # (file, row, copy) -> tokens delivered in epoch 0
    length_of = {}
    starts = Counter()
    tokens_per_rank, bad_rows, bad_files, examples = [], set(), set(), {}
    expected = None
    for rank in range(world_size):
        loader = PackedLoader(data, tokenizer, seq_len=seq_len, micro_batch_size=micro_batch_size, seed=seed,
                              rank=rank, world_size=world_size, trace=True)
        if expected is None:
            expected, n_bad_rows, unreadable, held_out = present_documents(loader)
        finished, tokens = set(), 0
        batches = iter(loader)
        try:
            while len(finished) < loader.per_rank:
                next(batches)
                reader, events, spans = loader.last_trace
                for epoch, f, row, reason in events:
                    if epoch == 0:
                        (bad_rows.add((f, row)) if row is not None else bad_files.add(f))
                        examples.setdefault((f, row), _event(loader, f, row, reason))
                for epoch, f, row, c, a, b, length, _ in spans:
                    if epoch == 0:
                        tokens_of[(f, row, c)] += b - a
                        length_of[(f, row, c)] = length
                        starts[(f, row, c)] += a == 0
                        tokens += b - a
                    else:
                        finished.add(reader)
        finally:
            loader.close()
        tokens_per_rank.append(tokens)
    seen = set(tokens_of)
    duplicates = sum(1 for d in seen if tokens_of[d] > length_of[d] or starts[d] > 1 or d not in expected)
    missing = sum(1 for d in expected if tokens_of.get(d, 0) < length_of.get(d, 1))
    names = loader.plan.source.names
    return {
        "world_size": world_size, "num_workers": data.num_workers, "readers_per_rank": loader.per_rank,
        "files": len(names),
        "logical_shards": loader.plan.k * len(names),
        "documents_present": len(expected), "documents_seen": len(seen), "held_out": held_out,
        "duplicates": duplicates, "missing": missing,
        "skipped": len(bad_rows) + len(bad_files), "skipped_rows": len(bad_rows), "skipped_files": len(bad_files),
        "skipped_files_names": sorted(names[f] for f in bad_files),
        "skipped_examples": [examples[k] for k in sorted(examples, key=lambda k: (k[0], k[1] is not None, k[1] or 0))][:20],
        "bad_rows_in_files": n_bad_rows, "unreadable_files": sorted(names[f] for f in unreadable),
        "tokens_per_rank": tokens_per_rank, "seconds": round(time.perf_counter() - t0, 2),
    }


def preview(data, tokenizer, *, seq_len: int, micro_batch_size: int, seed: int, windows: int = 2,
            mix_windows: int = 64, chars: int = 300) -> str:
    """The first ``windows`` windows of rank 0 decoded, document by document, and the subset mix,
    document lengths and skipped input over the first ``mix_windows`` windows."""
    loader = PackedLoader(data, tokenizer, seq_len=seq_len, micro_batch_size=micro_batch_size, seed=seed,
                          rank=0, world_size=1, trace=True)
    encoder = TextEncoder(loader.plan.tokenizer)
    names = loader.plan.source.names
    lines, skipped, shown = [], [], 0
    docs, tokens = Counter(), Counter()
    lengths = []
    batches = iter(loader)
    try:
        with _quiet_readers():
            while shown < max(windows, mix_windows):
                inputs, targets = next(batches)
                _, events, spans = loader.last_trace
                skipped += [_event(loader, f, row, reason) for _, f, row, reason in events]
                for _, f, row, c, a, b, length, subset in spans:
                    tokens[subset] += b - a
                    if a == 0:
                        docs[subset] += 1
                        lengths.append(length)
                full = [inputs[i].tolist() + targets[i, -1:].tolist() for i in range(len(inputs))]
                for i, window in enumerate(full):
                    if shown + i < windows:
                        lines.append(f"=== window {shown + i} ({len(window)} tokens = seq_len + 1) ===")
                        lines += _describe(window, spans, i * len(window), encoder, names, chars)
                shown += len(full)
    finally:
        loader.close()
    total = sum(tokens.values()) or 1
    lines.append(f"=== subset mix over the first {shown} windows ({total} tokens) ===")
    for subset, n in tokens.most_common():
        lines.append(f"{subset:>24}: {n / total:6.1%} of tokens, {counted(docs[subset], 'document')} started")
    if lengths:
        lengths.sort()
        lines.append(f"tokens per document (with BOS/EOS): median {lengths[len(lengths) // 2]}, "
                     f"mean {sum(lengths) / len(lengths):.0f}, max {lengths[-1]}, over {counted(len(lengths), 'document')}")
    if skipped:
        lines.append(f"=== skipped while reading them: {len(skipped)} (bad rows and files; first 10) ===")
        lines += skipped[:10]
    return "\n".join(lines)


def _describe(window, spans, first_token, encoder, names, chars) -> list[str]:
    out, pos = [], 0
    for _, f, row, c, a, b, length, subset in spans:
        lo, hi = max(pos, first_token), min(pos + b - a, first_token + len(window))
        if lo < hi:
            ids = window[lo - first_token:hi - first_token]
            text = encoder.decode(ids).replace("\n", "\\n")
            text = text if len(text) <= chars else text[:chars] + f" ...[{len(text) - chars} more chars]"
            out.append(f"--- {subset} | {names[f]} row {row}{f' copy {c}' if c else ''} | tokens "
                       f"{a + lo - pos}-{a + hi - pos} of {length}\n{text}")
        pos += b - a
    return out
