"""fms_dyt.export: plain LLaMA and self-contained fms_dyt directories, logits equal across conversions."""

import json
import subprocess
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from omegaconf import OmegaConf

from fms_dyt.inference import load_for_inference
from fms_dyt.config import load_config
from fms_dyt.export import export, main as export_main
from fms_dyt.hf import FmsDytConfig
from fms_dyt.model import ModelArgs, Transformer
from fms_dyt.norms import NormArgs

TOKENS = torch.randint(0, 32000, (2, 21), generator=torch.Generator().manual_seed(0))
GQA_RMS = ["model=tiny", "norm=rmsnorm", "model.n_heads=4", "model.n_kv_heads=2", "seed=7"]

# Loads an exported directory in a fresh interpreter where `import fms_dyt` is impossible, and
# where starting a process (a compiler) or loading a shared library fails loudly.
NO_FMS = """
import ctypes, subprocess, sys, importlib.abc, torch
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "fms_dyt" or name.startswith("fms_dyt."):
            raise ImportError("fms_dyt is not installed here")
sys.meta_path.insert(0, Block())
from transformers import AutoModelForCausalLM, PreTrainedModel  # (their imports may load libraries)
def refuse(*args, **kwargs):
    raise AssertionError(f"loading the exported model ran native code: {args}")
subprocess.Popen.__init__ = ctypes.CDLL.__init__ = refuse
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
assert "fms_dyt" not in sys.modules
tokens = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save({"logits": m(tokens).logits, "generated": m.generate(tokens[:1], max_new_tokens=20, do_sample=False)},
               sys.argv[3])
"""


def _logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


def test_gqa_rmsnorm_llama_then_fms_dyt_same_logits(tmp_path):
    llama_dir, fms_dir = tmp_path / "llama", tmp_path / "fms"
    assert export_main(["init", str(llama_dir), "--format", "llama", *GQA_RMS]) == 0
    assert "auto_map" not in json.loads((llama_dir / "config.json").read_text())
    llama = LlamaForCausalLM.from_pretrained(llama_dir).eval()
    assert llama.config.num_key_value_heads == 2
    # Re-export the plain LLaMA directory (the Hugging Face import path) as fms_dyt.
    assert export_main([str(llama_dir), str(fms_dir), "--format", "fms_dyt"]) == 0
    remote = AutoModelForCausalLM.from_pretrained(fms_dir, trust_remote_code=True).eval()
    reference = _logits(llama)
    assert torch.allclose(_logits(remote), reference, atol=1e-4, rtol=0)
    imported, _, _ = load_for_inference(llama_dir)
    assert torch.allclose(_logits(imported), reference, atol=1e-4, rtol=0)
    assert (fms_dir / "tokenizer.model").is_file() or (fms_dir / "tokenizer.json").is_file()


def test_dyt_export_loads_without_fms_dyt_installed(tmp_path):
    out = tmp_path / "dyt"
    assert export_main(["init", str(out), "model=tiny", "norm=dyt", "seed=3"]) == 0
    ours, _, _ = load_for_inference(out)
    torch.save(TOKENS, tmp_path / "tokens.pt")
    subprocess.run([sys.executable, "-c", NO_FMS, str(out), str(tmp_path / "tokens.pt"), str(tmp_path / "logits.pt")],
                   check=True, cwd=tmp_path)
    theirs = torch.load(tmp_path / "logits.pt")
    assert torch.allclose(_logits(ours), theirs["logits"], atol=1e-4, rtol=0)
    assert ours.model.embedding_scale is not None
    # The exported code's generate() (KV cache) continues as the training forward does, greedily.
    ids = TOKENS[:1]
    with torch.no_grad():
        for _ in range(20):
            ids = torch.cat([ids, ours.model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(theirs["generated"], ids)


def test_llama_format_refused_for_dyt(tmp_path, capsys):
    assert export_main(["init", str(tmp_path / "x"), "--format", "llama", "norm=dyt"]) == 2
    assert "--format fms_dyt" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


DYT = NormArgs(kind="dyt", alpha_attn=1.0, alpha_ffn=1.0, alpha_final=1.0, embedding_scale=True)


def _weightless_sources(root):
    """A DyT run whose checkpoint and a DyT export whose directory hold configs but no weights."""
    run = root / "run"
    step = run / "checkpoints" / "step_4"
    step.mkdir(parents=True)
    dcp.save({}, checkpoint_id=str(step), no_dist=True)  # a valid DCP index of no tensors at all
    (step / "meta.json").write_text(json.dumps({"step": 4, "tokens_seen": 0, "world_size": 1}))
    (step / "config.yaml").write_text(OmegaConf.to_yaml(load_config(["model=tiny", "norm=dyt"]), resolve=True))
    exported = root / "exported"
    exported.mkdir()
    config = FmsDytConfig.from_args(ModelArgs(), DYT)
    config.save_pretrained(exported)
    return run, exported


def test_llama_refusal_reads_only_the_config_and_leaves_no_out(tmp_path, capsys):
    for source in _weightless_sources(tmp_path):
        out = tmp_path / f"out_{source.name}"
        # Loading would fail on the missing weights: exit 2 with the refusal shows nothing was loaded.
        assert export_main([str(source), str(out), "--format", "llama"]) == 2
        err = capsys.readouterr().err
        assert "norm=dyt" in err and "--format fms_dyt" in err
        assert not out.exists()


def test_failed_export_leaves_no_out_and_existing_out_is_kept(tmp_path, capsys):
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, ffn_dim=64, vocab_size=64), DYT)

    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        export(model, tmp_path / "out", "fms_dyt", BrokenTokenizer())
    assert list(tmp_path.iterdir()) == []  # neither OUT nor the partial directory beside it
    (tmp_path / "out").mkdir()
    assert export(model, tmp_path / "out", "fms_dyt") == "fms_dyt"  # an empty OUT is replaced
    assert (tmp_path / "out" / "config.json").is_file() and list(tmp_path.iterdir()) == [tmp_path / "out"]
    before = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert export_main(["init", str(tmp_path / "out"), "model=tiny"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before
