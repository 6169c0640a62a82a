"""python -m fms_dyt.data: look at the data before launching a big job.

    python -m fms_dyt.data preview [overrides] [--windows N]
    python -m fms_dyt.data scan [overrides] --world-size W [--json]

Overrides are the training command's Hydra overrides (``data=local data.path=/pile/train
data.num_workers=2 train.seq_len=4096``): the same configs/train.yaml is composed and validated.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fms_dyt.data", description="Preview or scan the training data.")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("preview", help="decode the first windows; subset mix and document lengths")
    p.add_argument("--windows", type=int, default=2, help="windows to print (default 2)")
    p.add_argument("--mix-windows", type=int, default=64, help="windows the subset mix is measured on")
    p.add_argument("--chars", type=int, default=300, help="characters printed per document piece")
    s = sub.add_parser("scan", help="run one epoch for every rank x worker; report coverage as JSON or text")
    s.add_argument("--world-size", type=int, required=True, help="number of ranks to simulate")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    # The command line's entry point composes the training config; the data package itself never does.
    from fms_dyt.cli import load_config_or_report, parse_with_overrides
    from fms_dyt.errors import EXIT_CONFIG, EXIT_ERROR, refuse

    args, overrides = parse_with_overrides(ap, argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from fms_dyt.data.scan import preview, scan

    cfg = load_config_or_report("python -m fms_dyt.data", overrides)
    if cfg is None:
        return EXIT_CONFIG
    common = dict(seq_len=cfg.train.seq_len, micro_batch_size=cfg.train.micro_batch_size, seed=cfg.seed)
    try:
        if args.command == "preview":
            print(preview(cfg.data, cfg.tokenizer, windows=args.windows, mix_windows=args.mix_windows,
                          chars=args.chars, **common))
            return 0
        if args.world_size < 1:
            raise ValueError(f"--world-size={args.world_size} must be >= 1")
        report = scan(cfg.data, cfg.tokenizer, world_size=args.world_size, **common)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        return refuse("python -m fms_dyt.data", e)
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key:>22}: {value}")
    ok = report["duplicates"] == 0 and report["missing"] == 0
    if not args.json:
        print("every document exactly once" if ok else "PROBLEM: documents repeated or missing")
    return 0 if ok else EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
