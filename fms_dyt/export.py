"""``python -m fms_dyt.export SOURCE OUT [--format llama|fms_dyt] [hydra overrides]``

SOURCE is a training run or checkpoint directory, a Hugging Face LLaMA directory, or ``init`` (a
freshly initialised model from the overrides, e.g. ``model=tiny norm=dyt``). Formats:

- ``llama``: a plain ``LlamaForCausalLM`` directory, loadable without custom code. Only RMSNorm
  models without the embedding scalar can be expressed this way.
- ``fms_dyt``: weights plus fms-dyt's model code, loadable anywhere with
  ``AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)``, for any norm; its
  ``generate()`` uses a KV cache.

The default is ``llama`` when the model allows it, else ``fms_dyt``. The tokenizer is written
beside the weights when one is known. A format the model cannot take and an OUT that already holds
files are refused before any weights are loaded; a failed export leaves no OUT behind.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from fms_dyt import hf
from fms_dyt.config import load_config, model_args, norm_args
from fms_dyt.errors import ConfigError, refuse
from fms_dyt.norms import NormArgs

# Files that make an exported directory self-contained (they import each other relatively).
_MODEL_CODE = ("hf.py", "model.py", "norms.py", "ops.py")


def _existing(source: str) -> Path:
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"SOURCE {source!r} does not exist (give a run dir, checkpoint, HF directory or `init`)")
    return path


def source_norm(source: str, overrides: list[str]) -> NormArgs:
    """The norm settings of SOURCE, read from its configuration alone (no weights are loaded)."""
    from fms_dyt.checkpoint import resolve_checkpoint

    if source == "init":
        return norm_args(load_config(overrides))
    path = _existing(source)
    config_json = path / "config.json"
    if config_json.is_file():  # an exported or Hugging Face directory
        try:
            config = json.loads(config_json.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_json} is not valid JSON ({e})") from None
        if config.get("model_type") == hf.FmsDytConfig.model_type:
            return NormArgs(**config["norm"])
        return NormArgs()  # plain LLaMA: RMSNorm, no embedding scalar
    return norm_args(OmegaConf.load(resolve_checkpoint(path) / "config.yaml"))


def load_pretrained(path: str | Path):
    """(FmsDytForCausalLM, tokenizer or None) from a run dir, a checkpoint or an exported directory."""
    from fms_dyt.inference import load_for_inference

    wrapped, cfg, _ = load_for_inference(path)
    if cfg is not None:
        return wrapped, _tokenizer(cfg)
    from transformers import AutoTokenizer

    try:
        return wrapped, AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return wrapped, None


def load_source(source: str, overrides: list[str]):
    """(Transformer, tokenizer or None) from a checkpoint, a Hugging Face directory or ``init``."""
    from fms_dyt.model import Transformer

    if source == "init":
        cfg = load_config(overrides)
        model = Transformer(model_args(cfg), norm_args(cfg))
        model.init_weights(cfg.seed)
        return model, _tokenizer(cfg)
    wrapped, tokenizer = load_pretrained(_existing(source))
    return wrapped.model, tokenizer


def _tokenizer(cfg):
    from fms_dyt.data import load_tokenizer

    return load_tokenizer(cfg.tokenizer)


def check_out(out: Path) -> None:
    """Refuse to write over an earlier export (an empty directory is fine)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"OUT {out} already exists and is not an empty directory; remove it or choose another OUT")


def export(model, out: Path, fmt: str | None = None, tokenizer=None) -> str:
    """Write ``model`` (an fms-dyt Transformer) to ``out``; returns the format used.

    Everything is written into a ``.<name>.partial`` directory beside ``out`` and renamed at the
    end, so a failed export leaves no ``out`` behind.
    """
    fmt = fmt or ("llama" if hf.llama_expressible(model.norm_args) else "fms_dyt")
    check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)  # left by an export that was killed
    partial.mkdir()
    try:
        _write(model, partial, fmt, tokenizer)
        os.replace(partial, out)  # POSIX rename also replaces an empty directory
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return fmt


def _write(model, out: Path, fmt: str, tokenizer) -> None:
    args, norm = model.args, model.norm_args
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    if fmt == "llama":
        from transformers import LlamaForCausalLM

        llama = LlamaForCausalLM(hf.llama_config(args, norm))
        # LLaMA has no output multiplier: a fixed one is folded into the head (same logits)
        state["output.weight"] = state["output.weight"] * args.output_multiplier
        llama.load_state_dict(hf.to_llama_state_dict(state))
        llama.save_pretrained(out)
    else:
        wrapped = hf.FmsDytForCausalLM(hf.FmsDytConfig.from_args(args, norm))
        wrapped.model.load_state_dict(state)
        wrapped.config.auto_map = {
            "AutoConfig": "hf.FmsDytConfig",
            "AutoModelForCausalLM": "hf.FmsDytForCausalLM",
        }
        wrapped.save_pretrained(out)
        for name in _MODEL_CODE:
            shutil.copy(Path(hf.__file__).with_name(name), out / name)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fms_dyt.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="run dir, checkpoints/step_<N>, Hugging Face LLaMA dir, or `init`")
    parser.add_argument("out", type=Path, help="output directory")
    parser.add_argument("--format", choices=("llama", "fms_dyt"), default=None)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (for SOURCE=init)")
    ns = parser.parse_intermixed_args(argv)
    try:
        # Refusals come before any weights are loaded.
        if ns.format == "llama":
            hf.require_llama_expressible(source_norm(ns.source, ns.overrides))
        check_out(ns.out)
        model, tokenizer = load_source(ns.source, ns.overrides)
        fmt = export(model, ns.out, ns.format, tokenizer)
    except (ConfigError, ValueError, FileNotFoundError, FileExistsError) as e:
        return refuse("fms_dyt.export", e)
    print(f"exported {ns.source} as {fmt} to {ns.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
