"""Train a SentencePiece BPE tokenizer with LLaMA-2's trainer settings on a configured corpus and
write a directory that transformers loads and fms-dyt uses with ``tokenizer.path=<dir>``.

    python tokenizer/train_tokenizer.py --out tokenizers/pile-32k data=pile
    python tokenizer/train_tokenizer.py --out /tmp/tok --vocab-size 8000 --max-chars 2e8 data=sample

The corpus is read exactly as training reads it (same sources, same shuffled order, bad rows
skipped and counted), as lines of text, up to ``--max-chars`` characters.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

# LLaMA-2's trainer spec (see docs: shared/notes/reference.md); vocab size and data come from flags.
LLAMA2_SPEC = dict(
    model_type="bpe", byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
    character_coverage=0.99995, max_sentencepiece_length=16, split_by_unicode_script=True, split_by_number=True,
    split_by_whitespace=True, treat_whitespace_as_suffix=False, normalization_rule_name="identity",
    add_dummy_prefix=True, remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
)


def corpus_lines(data_cfg, seed: int, max_chars: float, stats: dict):
    """Non-empty lines of the corpus's documents in epoch-0 order of a single reader."""
    from dataclasses import replace

    from fms_dyt.data.config import DataConfig, TokenizerConfig, as_config
    from fms_dyt.data.pipeline import PackedLoader, Reader
    from fms_dyt.data.state import fresh_reader_state

    one_reader = replace(as_config(data_cfg, DataConfig), num_workers=0, readers=None)
    loader = PackedLoader(one_reader, TokenizerConfig(), seq_len=1, micro_batch_size=1, seed=seed, rank=0,
                          world_size=1)
    reader = Reader(loader.plan, 0, fresh_reader_state())
    for text in reader.documents():
        stats["documents"] += 1
        for line in text.splitlines():
            if line.strip():
                stats["chars"] += len(line)
                yield line
        if stats["chars"] >= max_chars:
            break
    stats["skipped_rows"] = reader.stats["skipped_rows"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 epilog="Other arguments are Hydra overrides of configs/train.yaml, e.g. data=pile.")
    ap.add_argument("--out", required=True, help="output directory (tokenizer.model, tokenizer.json, ...)")
    ap.add_argument("--vocab-size", type=int, default=32000)
    ap.add_argument("--max-chars", type=float, default=2e9, help="stop reading the corpus after this many characters")
    ap.add_argument("--max-sentences", type=int, default=20_000_000,
                    help="lines sentencepiece samples for training (input_sentence_size)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    from fms_dyt.cli import load_config_or_report, parse_with_overrides
    from fms_dyt.errors import EXIT_CONFIG

    args, overrides = parse_with_overrides(ap, argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    import sentencepiece as spm

    from fms_dyt.data.tokenizer import write_hf_tokenizer

    cfg = load_config_or_report("tokenizer/train_tokenizer.py", overrides)
    if cfg is None:
        return EXIT_CONFIG
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stats = {"documents": 0, "chars": 0}
    t0 = time.perf_counter()
    with open(out / "tokenizer.model", "wb") as model:
        spm.SentencePieceTrainer.train(
            sentence_iterator=corpus_lines(cfg.data, cfg.seed, args.max_chars, stats), model_writer=model,
            vocab_size=args.vocab_size, input_sentence_size=args.max_sentences, shuffle_input_sentence=True,
            num_threads=args.threads, minloglevel=2, **LLAMA2_SPEC)
    write_hf_tokenizer(out / "tokenizer.model", out, add_bos=cfg.tokenizer.add_bos)
    info = {"vocab_size": args.vocab_size, "data": cfg.data.name, "data_path": cfg.data.path, **stats,
            "seconds": round(time.perf_counter() - t0, 1)}
    (out / "training.json").write_text(json.dumps(info, indent=1))
    print(f"wrote {out}: {json.dumps(info)}\nuse it with tokenizer.path={out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
