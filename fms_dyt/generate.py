"""``python -m fms_dyt.generate CKPT_OR_DIR --prompt "..." [--max-new-tokens N] [--temperature T --top-k K --seed S]``

Prints the continuation of a prompt by a trained model: CKPT_OR_DIR is a run directory (its newest
checkpoint), a ``checkpoints/step_<N>`` directory or a directory written by ``fms_dyt.export``.
Greedy by default; ``--temperature`` above 0 samples (optionally from the ``--top-k`` most likely
tokens), reproducibly for a given ``--seed``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from fms_dyt.errors import refuse

log = logging.getLogger("fms_dyt")

# The sample printed at the end of every training run. "def", not "def ": a SentencePiece tokenizer
# encodes a trailing space as a lone "▁" token, which training text (" def foo") never has.
SAMPLE_PROMPT, SAMPLE_TOKENS = "def", 30
# Above this size the sample is not worth rank 0 loading a full fp32 copy of the model into host memory.
SAMPLE_MAX_PARAMS = 1_000_000_000


def continuation(model, tokenizer, prompt: str, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None) -> str:
    """The text ``model`` (an ``FmsDytForCausalLM``) writes after ``prompt``; greedy at temperature 0."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(model.device)
    limit = model.config.max_position_embeddings
    if ids.shape[1] + max_new_tokens > limit:
        raise ValueError(f"the prompt ({ids.shape[1]} tokens) plus --max-new-tokens={max_new_tokens} exceeds the "
                         f"model's {limit} positions; shorten the prompt or lower --max-new-tokens")
    # top_k=0: no top-k filter unless asked for (transformers' own default would be 50).
    sampling = dict(do_sample=True, temperature=temperature, top_k=top_k or 0) if temperature > 0 else dict(do_sample=False)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, pad_token_id=pad, **sampling)
    # Decoded together with the prompt: SentencePiece drops a word's leading space at the start of a text.
    prompt_text = tokenizer.decode(ids[0], skip_special_tokens=True)
    text = tokenizer.decode(out[0], skip_special_tokens=True)
    if text.startswith(prompt_text):
        return text[len(prompt_text):]
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def print_final_sample(checkpoint: Path, n_params: int) -> None:
    """End of a training run (rank 0): a short greedy sample from the final checkpoint; never fatal."""
    if n_params > SAMPLE_MAX_PARAMS:
        print(f"sample: python -m fms_dyt.generate {checkpoint} --prompt {SAMPLE_PROMPT!r}", flush=True)
        return
    from fms_dyt.export import load_pretrained

    try:
        model, tokenizer = load_pretrained(checkpoint)
        text = continuation(model, _require(tokenizer, checkpoint), SAMPLE_PROMPT, SAMPLE_TOKENS)
    except Exception as e:  # the run itself succeeded; the sample is only a look at it
        log.warning("no sample from %s: %s: %s", checkpoint, type(e).__name__, e)
        return
    print(f"\nsample ({SAMPLE_TOKENS} greedy tokens after {SAMPLE_PROMPT!r}):\n{SAMPLE_PROMPT}{text}", flush=True)


def _require(tokenizer, path):
    if tokenizer is None:
        raise FileNotFoundError(f"{path} has no tokenizer files (export it again with fms_dyt.export, which writes them)")
    return tokenizer


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fms_dyt.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", type=Path, metavar="CKPT_OR_DIR", help="run dir, checkpoints/step_<N> or exported directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; above 0: sample")
    p.add_argument("--top-k", type=int, default=None, help="sample from the K most likely tokens (with --temperature)")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def _check(ns) -> None:
    if not ns.path.exists():
        raise FileNotFoundError(f"CKPT_OR_DIR {str(ns.path)!r} does not exist (give a run dir, "
                                "checkpoints/step_<N> or a directory written by fms_dyt.export)")
    if ns.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens={ns.max_new_tokens} must be at least 1")
    if ns.temperature < 0:
        raise ValueError(f"--temperature={ns.temperature} must be 0 (greedy) or positive")
    if ns.top_k is not None and (ns.top_k < 1 or ns.temperature == 0):
        raise ValueError(f"--top-k={ns.top_k} needs a value of at least 1 and --temperature above 0")


def main(argv: list[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    try:
        _check(ns)
        from fms_dyt.export import load_pretrained

        model, tokenizer = load_pretrained(ns.path)
        torch.manual_seed(ns.seed)
        text = continuation(model.to(ns.device), _require(tokenizer, ns.path), ns.prompt, ns.max_new_tokens,
                            ns.temperature, ns.top_k)
    except (ValueError, FileNotFoundError) as e:
        return refuse("fms_dyt.generate", e)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
