"""``python eval/zero_shot.py CKPT``: the paper's 15 zero-shot lm-eval tasks on an fms-dyt model.

The command line of ``fms_dyt.eval`` (``--help`` for its options); the evaluation lives there.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's fms_dyt first

from fms_dyt.eval.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
