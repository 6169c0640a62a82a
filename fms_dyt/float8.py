"""FP8 training of the blocks' linear layers with torchao (``parallel.float8``), and the static
input scale of the layers that read a bounded norm's output, DyT's first
(``parallel.float8_dyt_static_scale``).

``convert`` swaps the blocks' ``nn.Linear`` layers for torchao's ``Float8Linear`` on the meta
device, before ``fully_shard`` and ``torch.compile`` (``fms_dyt.parallel.apply_parallelism``).
The output head and any layer with a dimension that is not a multiple of 16 (what FP8 matrix
multiplies need) stay in the compute dtype. A converted layer keeps its high-precision weight
under the same name, so checkpoints hold the same bf16/fp32 tensors with FP8 on or off and a run
resumes across the switch. With ``tensorwise``, FSDP2 all-gathers the weights in FP8 (half the
bytes of bf16) and their scales are computed for every layer at once after each optimizer step
(``watch_optimizer``), in one all-reduce instead of one per layer.

``scale_dyt_outputs`` (``parallel.float8_dyt_static_scale``, tensorwise only) uses what a DyT
layer guarantees, and every kind whose class declares ``bounded_by_gamma`` (fms_dyt/norms.py):
its output, γ·tanh(αx) (+ β) for DyT, is bounded per channel by |γ| (+ |β|), so the FP8
cast of the attention's and the FFN's input can take its scale from max|γ| of the norm (a
reduction over ``dim`` numbers) instead of the measured max of the activation, and the layers that
share that input (wq, wk, wv; w1, w3) share one cast. torchao's configuration has no static
scale (its ``ScalingType`` is dynamic or disabled); its ``Float8Linear`` does take an input that
is already FP8 as it is, so the norm's forward hook hands it one, built with torchao's
``hp_tensor_and_scale_to_float8`` (not in torchao's ``__all__``: pinned by tests/test_fp8.py).

torchao is imported only when ``parallel.float8`` is not ``off``: importing it prints a
warning, and an fms-dyt user who does not train in FP8 does not need it.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from fms_dyt.errors import ConfigError

RECIPES = ("rowwise", "tensorwise", "rowwise_with_gw_hp")  # torchao's recipe names
OFF = "off"
INSTALL = 'pip install -e ".[fp8]"'


def torchao_float8():
    """``torchao.float8``, or a ConfigError (exit 2) that names the install command."""
    try:
        import torchao.float8 as float8
    except ImportError as e:
        raise ConfigError(f"parallel.float8 needs torchao, which is not installed ({e}); "
                          f"run `{INSTALL}` or set parallel.float8=off") from None
    return float8


def converts(module: nn.Module, fqn: str) -> bool:
    """Whether ``convert`` gives the layer ``fqn`` FP8 matrix multiplies: a linear layer inside a
    transformer block whose input and output widths are both multiples of 16. Not the output head
    (its logits feed the loss directly, and torchtitan and torchao's recipes keep it in bf16 too).
    torchao's ``_auto_filter_for_recipe`` also leaves out layers below H100 speed thresholds; fms-dyt
    does not, so that a small CPU model tests the same FP8 numerics a 7B model trains with (every
    block layer of the paper's models is above those thresholds)."""
    if not isinstance(module, nn.Linear) or not fqn.startswith("layers."):
        return False
    out_features, in_features = module.weight.shape
    return out_features % 16 == 0 and in_features % 16 == 0


def convert(model: nn.Module, recipe: str) -> None:
    """Swap the block linears ``converts`` picks for torchao's ``Float8Linear`` with ``recipe``, in
    place (parameter names unchanged). Call before ``fully_shard`` and compile."""
    if recipe not in RECIPES:
        raise ConfigError(f"parallel.float8={recipe!r} is not one of {[OFF, *RECIPES]}")
    float8 = torchao_float8()
    if recipe == "tensorwise":  # FP8 all-gather of the weights: tensorwise scales only
        config = float8.Float8LinearConfig(enable_fsdp_float8_all_gather=True)
    else:
        config = float8.Float8LinearConfig.from_recipe_name(recipe)
    float8.convert_to_float8_training(model, module_filter_fn=converts, config=config)


def scale_dyt_outputs(model: nn.Module) -> int:
    """Cast each bounded block norm's output (DyT's, see above) to FP8 with the static scale of its
    bound, when every layer that reads it is an FP8 linear layer; returns how many norms do so."""
    float8 = torchao_float8()
    from torchao.float8.float8_training_tensor import GemmInputRole, hp_tensor_and_scale_to_float8

    def cast(norm, args, output, mm_config, dtype):
        bound = norm.weight.detach().abs()
        if getattr(norm, "bias", None) is not None:
            bound = bound + norm.bias.detach().abs()
        # torchao's own formula (float8_utils.amax_to_scale): float64, then float32
        scale = (torch.finfo(dtype).max / bound.max().double().clamp(min=1e-12)).float()
        return hp_tensor_and_scale_to_float8(output, scale, dtype, mm_config, GemmInputRole.INPUT)

    count = 0
    for block in model.layers:
        for norm, readers in ((block.attention_norm, (block.attention.wq, block.attention.wk, block.attention.wv)),
                              (block.ffn_norm, (block.feed_forward.w1, block.feed_forward.w3))):
            if norm.bounded_by_gamma and all(isinstance(getattr(r, "config", None), float8.Float8LinearConfig)
                                             for r in readers):
                norm.register_forward_hook(partial(cast, mm_config=readers[0].linear_mm_config,
                                                   dtype=readers[0].config.cast_config_input.target_dtype))
                count += 1
    return count


def converted(model: nn.Module) -> list[str]:
    """Names of the model's FP8 linear layers (its modules that carry a torchao float8 config)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and hasattr(m, "linear_mm_config")]


def gathers_in_fp8(model: nn.Module) -> bool:
    """Whether FSDP2 all-gathers some of the model's weights in FP8 (``tensorwise``)."""
    return any(getattr(m, "config", None) is not None and m.config.enable_fsdp_float8_all_gather
               for m in model.modules() if isinstance(m, nn.Linear))


def precompute_scales(model: nn.Module) -> None:
    """With FP8 all-gathers, compute every FP8 weight's scale now, in one all-reduce of one number
    per layer (instead of one all-reduce per layer inside each all-gather); nothing otherwise."""
    if gathers_in_fp8(model):
        torchao_float8().precompute_float8_dynamic_scale_for_fsdp(model)


def watch_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """With FP8 all-gathers, ``precompute_scales`` after each optimizer step. Loading a checkpoint
    must call it again: torch's ``set_state_dict`` runs one optimizer step on the weights as they
    were before the load (to create AdamW's state), which leaves their scales behind."""
    if gathers_in_fp8(model):
        optimizer.register_step_post_hook(lambda *_: precompute_scales(model))
