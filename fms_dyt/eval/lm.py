"""The model side of an evaluation: a checkpoint loaded for inference, wrapped in lm-eval's ``HFLM``."""

from __future__ import annotations

from pathlib import Path

from fms_dyt.eval import EvalError


def pick_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"--device {name}: CUDA is not available here (use --device cpu)")
    return device


def pick_dtype(name: str, device):
    import torch

    if name == "auto":
        use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if use_bf16 else torch.float32
    return getattr(torch, name)


def load_model(ckpt: Path):
    """(model, tokenizer, info) for a run dir, a step dir or an exported directory."""
    from fms_dyt.inference import load_for_inference

    try:
        model, cfg, meta = load_for_inference(ckpt)
    except (FileNotFoundError, ValueError) as e:
        raise EvalError(f"cannot load CKPT {ckpt}: {e}") from None
    exported = (ckpt / "config.json").is_file()
    if exported:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(ckpt)
        except (OSError, ValueError) as e:
            raise EvalError(
                f"{ckpt} has no usable tokenizer ({e}); export it again from a training checkpoint, "
                "which writes the tokenizer beside the weights"
            ) from None
        run_dir = None
    else:
        from fms_dyt.data import load_tokenizer

        tokenizer = load_tokenizer(cfg.tokenizer)
        if not (ckpt / "meta.json").is_file():
            run_dir = ckpt
        else:  # a step directory: its run, unless it was copied out of one
            run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None
    info = {
        "path": str(ckpt.resolve()),
        "kind": "exported" if exported else "training",
        "run_dir": str(run_dir.resolve()) if run_dir is not None else None,
        "step": meta.get("step"),
        "tokens_seen": meta.get("tokens_seen"),
        "training_config": _plain(cfg),
    }
    return model, tokenizer, info


def _plain(cfg):
    if cfg is None:
        return None
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)


def prepare_tokenizer(tokenizer, bos_id: int, eos_id: int | None):
    """Make ``add_special_tokens=True`` prepend BOS (and nothing else), as training did."""
    probe = "fms-dyt"
    ids = tokenizer(probe, add_special_tokens=True)["input_ids"]
    if ids[:1] != [bos_id] and hasattr(tokenizer, "add_bos_token"):
        tokenizer.add_bos_token = True
        ids = tokenizer(probe, add_special_tokens=True)["input_ids"]
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    if ids != [bos_id, *plain]:
        raise EvalError(
            f"the tokenizer encodes {probe!r} with special tokens as {ids}, not BOS ({bos_id}) + {plain}: "
            f"evaluation would not see text as training did (BOS first, no EOS); fix the tokenizer's "
            f"add_bos_token/add_eos_token settings"
        )
    if eos_id is not None and tokenizer.eos_token_id not in (None, eos_id):
        raise EvalError(f"tokenizer EOS id {tokenizer.eos_token_id} differs from the model's {eos_id}")
    return tokenizer


def make_lm(model, tokenizer, batch_size, max_batch_size: int, accelerator=None):
    """lm-eval's ``HFLM`` around our model; with an ``accelerate`` accelerator, data parallel."""
    from lm_eval.models.huggingface import HFLM

    kwargs = dict(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size,
                  max_batch_size=max_batch_size, add_bos_token=True)
    if accelerator is None or accelerator.num_processes == 1:
        return HFLM(**kwargs)

    class DataParallelHFLM(HFLM):
        """HFLM sets up data parallelism only for models it loads itself. Its public ``rank`` and
        ``world_size`` (by which the evaluator splits requests and gathers) and ``accelerator``
        (by which it gathers and waits) are given here from the running processes instead."""

        @property
        def rank(self) -> int:
            return accelerator.process_index

        @property
        def world_size(self) -> int:
            return accelerator.num_processes

    lm = DataParallelHFLM(**kwargs)
    lm.accelerator = accelerator
    return lm
