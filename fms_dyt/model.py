"""The LLaMA-2 transformer of fms-dyt, with pluggable norm layers.

Pre-norm blocks, rotary position embeddings (in the rotate-half layout used by Hugging Face
checkpoints), grouped-query attention through ``scaled_dot_product_attention``, a SwiGLU
feed-forward and an untied output head. With DyT, a learnable scalar initialised to √dim
multiplies the token embeddings. This file knows nothing of parallelism: see ``parallel.py``.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .norms import Norm, NormArgs, build_norm


@dataclass
class ModelArgs:
    """Shape of a LLaMA model (the field names are those of the ``model`` config group)."""

    dim: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: Optional[int] = None  # None: as many as n_heads (multi-head attention)
    ffn_dim: int = 688
    vocab_size: int = 32000
    max_seq_len: int = 4096
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    # A fixed (unlearned) multiplier on the final norm's output, i.e. on the logits: the alternative
    # to a larger norm.final_gamma0 that fms_dyt.study final-scale compares it with (docs/science.md)
    output_multiplier: float = 1.0

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


def rope_tables(head_dim: int, seq_len: int, theta: float, device=None) -> torch.Tensor:
    """cos and sin of the rotary angles, stacked: shape [2, seq_len, head_dim], fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return torch.stack([angles.cos(), angles.sin()])


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate x [batch, heads, seq, head_dim] by ``rope``: the cos and sin of x's own positions,
    [2, seq, head_dim], or [2, batch, 1, seq, head_dim] when each sequence has its own positions."""
    cos, sin = rope[0].to(x.dtype), rope[1].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx  # this layer's slot in a generation cache
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, cache=None, mask=None) -> torch.Tensor:
        """Causal self-attention; for generation, ``cache`` (e.g. a transformers ``DynamicCache``)
        keeps the keys and values of earlier tokens and ``mask`` [batch, 1, seq, cached + seq]
        (True: visible) says which of them each query sees."""
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=self.n_kv_heads != self.n_heads
        )
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) · w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, norm: NormArgs, layer_idx: int):
        super().__init__()
        self.attention_norm = build_norm(args.dim, "attn", norm)
        self.attention = Attention(args, layer_idx)
        self.ffn_norm = build_norm(args.dim, "ffn", norm)
        self.feed_forward = FeedForward(args.dim, args.ffn_dim)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, cache=None, mask=None) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), rope, cache, mask)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, norm: NormArgs):
        super().__init__()
        self.args, self.norm_args = args, norm
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        # One learnable scalar on the embeddings (DyT models; without it, activations start too small).
        self.embedding_scale = nn.Parameter(torch.ones(1)) if norm.embedding_scale else None
        self.layers = nn.ModuleList(TransformerBlock(args, norm, i) for i in range(args.n_layers))
        self.norm = build_norm(args.dim, "final", norm)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.register_buffer("rope", torch.empty(0), persistent=False)
        if self.tok_embeddings.weight.device.type != "meta":
            self.init_weights(seed=0)

    def forward(self, tokens: torch.Tensor, cache=None, positions=None, mask=None) -> torch.Tensor:
        """Logits [batch, seq, vocab] for token ids [batch, seq].

        Training passes tokens only. Generation also passes a ``cache`` of earlier keys and values,
        the tokens' ``positions`` [batch, seq] and the visibility ``mask`` (see ``Attention``).
        """
        if self.rope.device != tokens.device or self.rope.numel() == 0:
            # Built on the meta device by a loader that never called init_buffers (e.g. from_pretrained).
            self.init_buffers(tokens.device)
        end = tokens.shape[1] if positions is None else int(positions.max()) + 1
        if end > self.rope.shape[1]:
            raise ValueError(
                f"sequence of {end} tokens is longer than model.max_seq_len="
                f"{self.rope.shape[1]}; raise model.max_seq_len or shorten train.seq_len"
            )
        rope = self.rope[:, :end] if positions is None else self.rope[:, positions].unsqueeze(2)
        h = self.tok_embeddings(tokens)
        if self.embedding_scale is not None:
            h = h * self.embedding_scale.to(h.dtype)
        for layer in self.layers:
            h = layer(h, rope, cache, mask)
        h = self.norm(h)
        if self.args.output_multiplier != 1.0:
            h = h * self.args.output_multiplier
        return self.output(h)

    # ---- initialisation -------------------------------------------------------------------
    def initial_value(self, name: str, param: torch.Tensor, seed: int) -> torch.Tensor:
        """The full initial value of parameter ``name``, from (seed, name) alone.

        Independent of world size and of the order parameters are visited, so a sharded model
        materialised from the meta device gets the same weights as a single-process one.
        """
        shape, device = param.shape, param.device if param.device.type != "meta" else "cpu"
        leaf = name.rsplit(".", 1)[-1]
        owner = self.get_submodule(name.rsplit(".", 1)[0]) if "." in name else self
        if isinstance(owner, (nn.Linear, nn.Embedding)):
            g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            std = self.args.init_std
            value = torch.empty(shape, device=device, dtype=torch.float32)
            return nn.init.trunc_normal_(value, 0.0, std, -3 * std, 3 * std, generator=g)
        if name == "embedding_scale":
            return torch.full(shape, math.sqrt(self.args.dim), device=device)
        # Norm parameters: the layer owns its initial values (ones, zeros, α₀).
        return owner.initial_state(device)[leaf]

    def init_buffers(self, device=None) -> None:
        self.rope = rope_tables(self.args.head_dim, self.args.max_seq_len, self.args.rope_theta, device)

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Initialise every parameter of an unsharded model from the seed."""
        for name, p in self.named_parameters():
            p.copy_(self.initial_value(name, p, seed))
        self.init_buffers(self.tok_embeddings.weight.device)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameter counts by part (works on the meta device)."""
    parts = {"embedding": 0, "attention": 0, "ffn": 0, "norms": 0, "scalars": 0, "output": 0}
    # a norm's scalars as its class declares them (fms_dyt.norms), matched by identity
    scalars = {id(getattr(m, leaf)) for m in model.modules() if isinstance(m, Norm) for leaf in m.scalars}
    for name, p in model.named_parameters():
        if name.startswith("tok_embeddings"):
            part = "embedding"
        elif name.startswith("output"):
            part = "output"
        elif ".attention." in name:
            part = "attention"
        elif ".feed_forward." in name:
            part = "ffn"
        elif name == "embedding_scale" or id(p) in scalars:
            part = "scalars"
        else:
            part = "norms"
        parts[part] += p.numel()
    parts["total"] = sum(parts.values())
    return parts
