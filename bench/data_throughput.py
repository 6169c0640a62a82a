"""Throughput of fms-dyt's whole data pipeline against its tokenizer alone, on the same text.

The pipeline (DataLoader workers reading zstd JSON lines, shuffling, tokenizing, packing windows
of seq_len + 1 tokens, sending batches to the training process) is timed from its first batch
on; the tokenizer is timed encoding the very documents the pipeline delivers, in the same order
and batches, with as many threads as the pipeline has workers. The last line is
``ratio=<pipeline tokens/s / tokenizer tokens/s>``; the pipeline should reach 0.8.

    python bench/data_throughput.py [--quick] [--workers 1]   # --workers 0: no process boundary
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from functools import partial

SEQ_LEN, MICRO_BATCH = 4096, 2


def _pipeline_rate(data, tokens: int) -> tuple[float, float]:
    from fms_dyt.data import TokenizerConfig, build_dataloader

    t0 = time.perf_counter()
    loader = build_dataloader(data, TokenizerConfig(), seq_len=SEQ_LEN, micro_batch_size=MICRO_BATCH, seed=0,
                              rank=0, world_size=1)
    batches = iter(loader)
    next(batches)  # worker start-up and the first shuffle block are not throughput
    startup = time.perf_counter() - t0
    t0, done = time.perf_counter(), 0
    while done < tokens:
        inputs, _ = next(batches)
        done += inputs.shape[0] * (SEQ_LEN + 1)
    rate = done / (time.perf_counter() - t0)
    loader.close()
    return rate, startup


def _tokenizer_rate(data, tokens: int, threads: int) -> float:
    """Encode the documents of the pipeline's first reader: one thread with a worker's own encoder
    (``TextEncoder``), several with SentencePiece's thread pool over 16 documents a thread."""
    import sentencepiece

    from fms_dyt.data import TokenizerConfig
    from fms_dyt.data.pipeline import PackedLoader, Reader
    from fms_dyt.data.state import fresh_reader_state
    from fms_dyt.data.tokenizer import TextEncoder, default_model_file

    loader = PackedLoader(replace(data, num_workers=0, readers=None), TokenizerConfig(), seq_len=SEQ_LEN,
                          micro_batch_size=MICRO_BATCH, seed=0, rank=0, world_size=1)
    texts, chars = [], 0
    for text in Reader(loader.plan, 0, fresh_reader_state()).documents():
        texts.append(text)
        chars += len(text)
        if chars > tokens * 6:  # comfortably more text than needed (~3-4 characters a token)
            break
    if threads == 1:
        encode = TextEncoder(TokenizerConfig()).encode
    else:
        encode = partial(sentencepiece.SentencePieceProcessor(model_file=str(default_model_file())).encode,
                         num_threads=threads)
    step = 16 * threads
    t0, done = time.perf_counter(), 0
    for i in range(0, len(texts), step):
        encoded = encode(texts[i:i + step])
        done += sum(len(ids) + 2 for ids in encoded)  # + BOS and EOS, as the pipeline counts them
        if done >= tokens:
            break
    return done / (time.perf_counter() - t0)


def measure(quick: bool = False, workers: int = 1) -> dict:
    """Best of alternating rounds (the machine may be shared): tokens/s of the tokenizer alone and
    of the pipeline with ``workers`` DataLoader workers, on the sample corpus; and their ratio."""
    from fms_dyt.data import DataConfig
    from fms_dyt.data.sample import ensure_sample

    ensure_sample()
    data = DataConfig(name="sample", num_workers=workers)
    rounds, tokens = (1, 1_500_000) if quick else (3, 4_000_000)
    threads = max(1, workers)  # 0 workers: the pipeline in this process, against one thread
    tok, pipe, startup = [], [], []
    for _ in range(rounds):
        tok.append(_tokenizer_rate(data, tokens, threads))
        rate, start = _pipeline_rate(data, tokens)
        pipe.append(rate)
        startup.append(start)
    return {"tokenizer_tokens_per_s": max(tok), "pipeline_tokens_per_s": max(pipe),
            "ratio": max(pipe) / max(tok), "workers": workers, "tokenizer_threads": threads, "rounds": rounds,
            "tokens_per_round": tokens,
            "pipeline_startup_s": min(startup), "seq_len": SEQ_LEN, "micro_batch_size": MICRO_BATCH}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one round of 1.5M tokens instead of three of 4M")
    ap.add_argument("--workers", type=int, default=1,
                    help="pipeline workers = tokenizer threads (default 1; 0: the pipeline in this process, one thread)")
    ap.add_argument("--json", action="store_true", help="also print the measurements as JSON")
    a = ap.parse_args(argv)
    r = measure(a.quick, a.workers)
    print(f"tokenizer alone (sentencepiece, {r['tokenizer_threads']} thread(s), same documents): "
          f"{r['tokenizer_tokens_per_s']:,.0f} tokens/s")
    print(f"pipeline ({a.workers} DataLoader worker(s): zstd JSON lines, shuffle, tokenize, pack "
          f"{MICRO_BATCH}x{SEQ_LEN + 1}): {r['pipeline_tokens_per_s']:,.0f} tokens/s "
          f"(first batch after {r['pipeline_startup_s']:.1f} s)")
    if a.json:
        print(json.dumps(r))
    print(f"ratio={r['ratio']:.3f}")


if __name__ == "__main__":
    main()
