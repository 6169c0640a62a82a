"""Loading a trained or exported model in one process, for evaluation, analysis and export.

A training checkpoint (DCP shards, resharded on load) or an exported Hugging Face directory
(``--format llama`` or ``fms_dyt``) becomes an ``FmsDytForCausalLM`` on the CPU.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

from fms_dyt.checkpoint import resolve_checkpoint
from fms_dyt.config import model_args, norm_args
from fms_dyt.hf import FmsDytConfig, FmsDytForCausalLM, args_from_llama, from_llama_state_dict


def load_for_inference(path: str | Path):
    """Load a run dir, a ``checkpoints/step_<N>`` dir or an exported directory in one process.

    Returns ``(model, cfg, meta)``: an ``FmsDytForCausalLM`` in eval mode on the CPU, the resolved
    training config (None for exported directories) and the checkpoint's meta (step, tokens seen).
    """
    path = Path(path)
    if (path / "config.json").is_file():  # an exported (Hugging Face) directory
        hf_cfg = AutoConfig.from_pretrained(path, trust_remote_code=True)
        if isinstance(hf_cfg, LlamaConfig):
            llama = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            model = FmsDytForCausalLM(FmsDytConfig.from_args(*args_from_llama(hf_cfg)))
            model.model.load_state_dict(from_llama_state_dict(llama.state_dict()))
        else:
            model = FmsDytForCausalLM.from_pretrained(path, dtype=torch.float32)
        return model.eval(), None, {}
    ckpt = resolve_checkpoint(path)
    cfg = OmegaConf.load(ckpt / "config.yaml")
    with torch.device("meta"):  # no random init of weights that are about to be overwritten
        model = FmsDytForCausalLM(FmsDytConfig.from_args(model_args(cfg), norm_args(cfg)))
    model.to_empty(device="cpu")
    state = {"model": model.model.state_dict()}
    with warnings.catch_warnings():  # DCP says it runs without a process group: that is the point
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(ckpt), no_dist=True)
    model.model.load_state_dict(state["model"])
    model.model.init_buffers()
    meta = json.loads((ckpt / "meta.json").read_text())
    return model.eval(), cfg, meta
