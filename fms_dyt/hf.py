"""fms-dyt models as Hugging Face ``transformers`` models, and LLaMA weight conversion.

``FmsDytForCausalLM`` wraps the fms-dyt ``Transformer`` so that ``AutoModelForCausalLM`` and
lm-eval's ``HFLM`` take it directly, and ``generate()`` works with a KV cache. This file,
``model.py``, ``norms.py`` and ``ops.py`` only use relative imports: ``fms_dyt.export`` copies them
beside exported weights, so the directory loads with ``trust_remote_code=True`` on machines
without fms-dyt.
"""

from __future__ import annotations

import logging
from dataclasses import asdict

import torch

# transformers imports torchao when it is installed; torchao 0.18 registers its enums with torch's
# pytree, which torch 2.14 logs as deprecated at that import: noise that ends every training run
# (the sample loads this module) and that no fms-dyt user can act on.
logging.getLogger("torch.utils._pytree").addFilter(
    lambda record: "is an Enum subclass and is now natively supported" not in record.getMessage())

from transformers import (  # noqa: E402
    AutoConfig, AutoModelForCausalLM, DynamicCache, GenerationMixin, LlamaConfig, PretrainedConfig, PreTrainedModel,
)
from transformers.modeling_outputs import CausalLMOutputWithPast  # noqa: E402

from .model import ModelArgs, Transformer  # noqa: E402
from .norms import NormArgs, norm_class  # noqa: E402


class FmsDytConfig(PretrainedConfig):
    model_type = "fms_dyt"

    def __init__(self, model: dict | None = None, norm: dict | None = None, **kwargs):
        self.model = dict(model or {})
        self.norm = dict(norm or {})
        args = ModelArgs(**self.model)
        # The standard names, read by generic tools (lm-eval takes max_position_embeddings).
        self.hidden_size, self.num_hidden_layers = args.dim, args.n_layers
        self.num_attention_heads, self.vocab_size = args.n_heads, args.vocab_size
        self.max_position_embeddings = args.max_seq_len
        kwargs.setdefault("bos_token_id", 1)
        kwargs.setdefault("eos_token_id", 2)
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)

    @classmethod
    def from_args(cls, args: ModelArgs, norm: NormArgs, **kwargs) -> "FmsDytConfig":
        return cls(model=asdict(args), norm=asdict(norm), **kwargs)

    def model_args(self) -> ModelArgs:
        return ModelArgs(**self.model)

    def norm_args(self) -> NormArgs:
        return NormArgs(**self.norm)


class FmsDytForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = FmsDytConfig
    base_model_prefix = "model"
    _no_split_modules = ["TransformerBlock"]

    def __init__(self, config: FmsDytConfig):
        super().__init__(config)
        self.model = Transformer(config.model_args(), config.norm_args())
        self.post_init()

    def _init_weights(self, module):
        # Weights come from fms-dyt checkpoints or Transformer.init_weights, never from here.
        pass

    def get_input_embeddings(self):
        return self.model.tok_embeddings

    def get_output_embeddings(self):
        return self.model.output

    def forward(self, input_ids: torch.LongTensor, attention_mask=None, position_ids=None, cache=None,
                use_cache=None, labels=None, **kwargs):
        """Logits (and loss with ``labels``) as transformers models return them.

        ``generate()`` passes a ``cache``, the ``position_ids`` and, for left-padded batches, the
        ``attention_mask`` (1: token, 0: padding) over the cached and the new tokens.
        """
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0
        mask = None
        if cache is not None or attention_mask is not None:
            mask = visibility_mask(attention_mask, past, input_ids)
        if position_ids is None and past:
            position_ids = torch.arange(past, past + input_ids.shape[1], device=input_ids.device)[None]
        logits = self.model(input_ids, cache, position_ids, mask)
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)


def visibility_mask(attention_mask, past: int, input_ids: torch.Tensor) -> torch.Tensor:
    """[batch, 1, seq, past + seq] bool: each new token sees the earlier non-padding tokens and itself.

    ``attention_mask`` [batch, past + seq] marks padding with 0 (None: no padding). A padding token
    also sees itself, so that no row is fully masked (which would give NaN).
    """
    batch, seq = input_ids.shape
    query = torch.arange(past, past + seq, device=input_ids.device)[:, None]
    key = torch.arange(past + seq, device=input_ids.device)[None, :]
    visible = (key <= query).expand(batch, seq, past + seq)
    if attention_mask is not None:
        visible = visible & attention_mask[:, None, :].bool()
    return (visible | (key == query))[:, None]


def register_auto_classes() -> None:
    AutoConfig.register(FmsDytConfig.model_type, FmsDytConfig, exist_ok=True)
    AutoModelForCausalLM.register(FmsDytConfig, FmsDytForCausalLM, exist_ok=True)


register_auto_classes()


# ---- plain LLaMA <-> fms-dyt ---------------------------------------------------------------------
# Our RoPE uses the rotate-half layout of Hugging Face checkpoints, so weights map one to one.
_LAYER_NAMES = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
_FMS_LAYER_NAMES = {v: k for k, v in _LAYER_NAMES.items()}
_FMS_TOP_NAMES = {v: k for k, v in _TOP_NAMES.items()}


def llama_name(name: str) -> str:
    """The ``LlamaForCausalLM`` name of an fms-dyt parameter."""
    if name.startswith("layers."):
        _, i, rest = name.split(".", 2)
        module, leaf = rest.rsplit(".", 1)
        return f"model.layers.{i}.{_LAYER_NAMES[module]}.{leaf}"
    module, leaf = name.rsplit(".", 1)
    return f"{_TOP_NAMES[module]}.{leaf}"


def llama_expressible(norm: NormArgs) -> bool:
    """Whether plain ``LlamaForCausalLM`` can express the model: a kind it computes (its class's
    ``llama_expressible``: RMSNorm) at every site, no embedding scalar."""
    return all(norm_class(kind).llama_expressible for kind in norm.kinds()) and not norm.embedding_scale


def require_llama_expressible(norm: NormArgs) -> None:
    """Refuse a model that plain ``LlamaForCausalLM`` cannot express (DyT, Derf, the embedding scalar)."""
    if not llama_expressible(norm):
        raise ValueError(
            f"--format llama needs norm=rmsnorm at every site without the embedding scalar (this model has "
            f"norm={norm.kind}, norm.final={norm.kind_at('final')}, embedding_scale={norm.embedding_scale}); "
            "plain LlamaForCausalLM cannot express it. Export with --format fms_dyt instead."
        )


def llama_config(args: ModelArgs, norm: NormArgs, **kwargs) -> LlamaConfig:
    """The ``LlamaConfig`` of an RMSNorm model without the embedding scalar."""
    require_llama_expressible(norm)
    return LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.ffn_dim,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
        num_key_value_heads=args.kv_heads, max_position_embeddings=args.max_seq_len,
        rms_norm_eps=args.norm_eps, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": args.rope_theta}, **kwargs,
    )


def args_from_llama(config: LlamaConfig) -> tuple[ModelArgs, NormArgs]:
    """fms-dyt model and norm settings equivalent to a ``LlamaConfig``."""
    if getattr(config, "tie_word_embeddings", False):
        raise ValueError("tied input/output embeddings are not supported: fms-dyt LLaMA has an untied head")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope_type={rope['rope_type']!r} is not supported (only the default LLaMA-2 RoPE)")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim * config.num_attention_heads != config.hidden_size:
        raise ValueError(f"head_dim={head_dim} x heads != hidden_size={config.hidden_size} is not supported")
    args = ModelArgs(
        dim=config.hidden_size, n_layers=config.num_hidden_layers, n_heads=config.num_attention_heads,
        n_kv_heads=config.num_key_value_heads, ffn_dim=config.intermediate_size,
        vocab_size=config.vocab_size, max_seq_len=config.max_position_embeddings,
        rope_theta=float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))),
        norm_eps=config.rms_norm_eps,
    )
    return args, NormArgs(kind="rmsnorm", eps=config.rms_norm_eps)


def to_llama_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {llama_name(k): v for k, v in state.items()}


def fms_name(name: str) -> str:
    """The fms-dyt name of a ``LlamaForCausalLM`` parameter."""
    if name.startswith("model.layers."):
        _, _, i, rest = name.split(".", 3)
        module, leaf = rest.rsplit(".", 1)
        return f"layers.{i}.{_FMS_LAYER_NAMES[module]}.{leaf}"
    module, leaf = name.rsplit(".", 1)
    return f"{_FMS_TOP_NAMES[module]}.{leaf}"


def from_llama_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {fms_name(k): v for k, v in state.items()}
