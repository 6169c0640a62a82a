"""Inputs and outputs of a model's norm layers on a batch, for the input/output maps (paper Figures 2 and 4).

Forward hooks on the norm modules take each layer's input; the output before the γ scale is the
module's own ``normalize(x)`` (x / rms(x) for RMSNorm, tanh(αx) for DyT, erf(αx + s) for Derf), so the map shows what
the normalization does and not the learned per-channel scale.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from fms_dyt.analysis.runs import AnalysisError, Run
from fms_dyt.norms import norm_sites

log = logging.getLogger("fms_dyt.analyze")

SITE_TITLES = {"attn": "attention norm", "ffn": "FFN norm"}


@dataclass
class NormCapture:
    """One norm layer seen on the sampled tokens: inputs x and outputs before γ, both [tokens, dim]."""

    site: str  # "attn/<layer>", "ffn/<layer>" or "final"
    x: torch.Tensor
    y: torch.Tensor
    alpha: Optional[float]  # a point-wise norm's α (DyT, Derf); None for norms without one
    shift: Optional[float]  # Derf's s; None for norms without one
    # A point-wise norm's function over the range of x: (grid, normalize(grid)) and its formula
    curve: Optional[tuple[torch.Tensor, torch.Tensor, str]]
    sequences: torch.Tensor  # [tokens] the batch row of each sampled token
    positions: torch.Tensor  # [tokens] its position in that row
    token_ids: torch.Tensor  # [tokens]

    @property
    def title(self) -> str:
        if self.site == "final":
            return "final norm"
        kind, layer = self.site.split("/")
        return f"layer {layer} · {SITE_TITLES[kind]}"


def default_sites(n_layers: int) -> list[str]:
    """Attention and FFN norms of the first, middle and last layer, then the final norm (forward order)."""
    depths = sorted({0, n_layers // 2, n_layers - 1})
    return [f"{kind}/{d}" for d in depths for kind in ("attn", "ffn")] + ["final"]


def parse_sites(spec: Optional[str], n_layers: int) -> list[str]:
    """Site names from ``--sites`` such as ``attn:0,ffn:mid,attn:last,final`` (None: the defaults)."""
    if not spec:
        return default_sites(n_layers)
    named = {"first": 0, "mid": n_layers // 2, "last": n_layers - 1}
    sites = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        if item == "final":
            sites.append("final")
            continue
        kind, _, depth = item.partition(":")
        if kind not in SITE_TITLES or not depth:
            raise AnalysisError(f"--sites item {item!r}: write attn:<layer>, ffn:<layer> or final "
                                "(layer: a number, first, mid or last)")
        try:
            layer = named[depth] if depth in named else int(depth)
        except ValueError:
            raise AnalysisError(f"--sites item {item!r}: layer {depth!r} is not a number, first, mid or last") from None
        if layer < 0:
            layer += n_layers
        if not 0 <= layer < n_layers:
            raise AnalysisError(f"--sites item {item!r}: the model has layers 0..{n_layers - 1}")
        sites.append(f"{kind}/{layer}")
    return list(dict.fromkeys(sites))


@torch.no_grad()
def capture_norm_io(transformer: nn.Module, tokens: torch.Tensor, sites: list[str], max_tokens: int = 512,
                    seed: int = 0) -> list[NormCapture]:
    """Run ``tokens`` [batch, seq] through the model; keep the chosen sites on ``max_tokens`` random tokens.

    The same token positions are kept at every site, so the panels of one figure show the same tokens.
    """
    modules = norm_sites(transformer)
    unknown = [s for s in sites if s not in modules]
    if unknown:
        raise AnalysisError(f"norm sites {unknown} do not exist in this model (it has {len(transformer.layers)} layers)")
    batch, seq = tokens.shape
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(batch * seq, generator=g)[:max_tokens].sort().values
    device = next(transformer.parameters()).device
    captured: dict[str, NormCapture] = {}

    def hook_for(site):
        def hook(module, args, output):
            x = args[0].reshape(-1, args[0].shape[-1])[rows.to(args[0].device)].float()
            alpha, shift = getattr(module, "alpha", None), getattr(module, "shift", None)
            curve = None
            if module.pointwise:  # its class says so (fms_dyt.norms.Norm)
                grid = torch.linspace(x.min().item(), x.max().item(), 400, device=x.device)
                curve = (grid.cpu(), module.normalize(grid).float().cpu(), module.formula)
            captured[site] = NormCapture(
                site=site, x=x.cpu(), y=module.normalize(x).cpu(),
                alpha=float(alpha.item()) if alpha is not None else None,
                shift=float(shift.item()) if shift is not None else None, curve=curve,
                sequences=rows // seq, positions=rows % seq, token_ids=tokens.reshape(-1)[rows].cpu(),
            )
        return hook

    handles = [modules[s].register_forward_hook(hook_for(s)) for s in sites]
    try:
        transformer(tokens.to(device))
    finally:
        for h in handles:
            h.remove()
    return [captured[s] for s in sites]


def checkpoint_alphas(transformer: nn.Module) -> Optional[dict]:
    """α of every DyT layer (attn and ffn lists by depth; final, None when the final norm has no α)
    and the embedding scalar; None unless the blocks are DyT."""
    modules = norm_sites(transformer)
    if not all(hasattr(m, "alpha") for site, m in modules.items() if site != "final"):
        return None
    n = len(transformer.layers)
    scale, final = transformer.embedding_scale, getattr(modules["final"], "alpha", None)
    return {
        "attn": [modules[f"attn/{i}"].alpha.item() for i in range(n)],
        "ffn": [modules[f"ffn/{i}"].alpha.item() for i in range(n)],
        "final": final.item() if final is not None else None,
        "embedding_scale": scale.item() if scale is not None else None,
    }


def analysis_batch(run: Run, source: str, batch_size: int, seq_len: Optional[int], vocab_size: int,
                   seed: int = 0) -> tuple[torch.Tensor, str, bool]:
    """Token ids [batch, seq] for the input/output maps, a sentence saying where they came from, and
    whether they are the run's data.

    ``source``: ``run`` (the run's own data loader, as configured in its config.yaml), ``random``
    (uniform token ids, seeded) or ``auto`` (the run's data, else random tokens, saying why).
    """
    if source not in ("auto", "run", "random"):
        raise AnalysisError(f"--batch={source!r} is not one of auto, run, random")
    train_len = run.cfg.train.seq_len if run.cfg is not None else None
    seq_len = seq_len or min(train_len or 512, 512)
    why = "--batch random"
    if source != "random":
        if run.cfg is None:
            why = f"{run.given} is an exported model without a data config"
            if source == "run":
                raise AnalysisError(f"--batch run: {why}; use --batch random")
        else:
            try:
                return _run_batch(run, batch_size, seq_len), (
                    f"{batch_size} sequences of {seq_len} tokens from the run's data "
                    f"(data={run.cfg.data.name}, the first batch its loader yields with seed {run.cfg.seed})"), True
            except Exception as e:  # any failure to build the run's loader; auto falls back and says so
                if source == "run":
                    raise AnalysisError(f"--batch run: the run's data loader failed ({type(e).__name__}: {e}); "
                                        "fix the data config or use --batch random") from e
                why = f"the run's data loader failed: {type(e).__name__}: {e}"
                log.warning("%s: %s; using random tokens instead", run.name, why)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (batch_size, seq_len), generator=g)
    return tokens, f"{batch_size} sequences of {seq_len} uniformly random token ids ({why})", False


def token_namer(run: Run):
    """id -> the tokenizer's piece for it (e.g. '▁the'), from the run's tokenizer; None when it cannot load."""
    try:
        from fms_dyt.data import load_tokenizer

        tokenizer = load_tokenizer(run.cfg.tokenizer)
    except Exception as e:  # legends then show token ids; nothing else depends on the tokenizer
        log.warning("%s: tokenizer not loaded (%s: %s); map legends show token ids", run.name, type(e).__name__, e)
        return None
    return lambda token_id: tokenizer.convert_ids_to_tokens(int(token_id))


def _run_batch(run: Run, batch_size: int, seq_len: int) -> torch.Tensor:
    from fms_dyt.data import build_dataloader

    loader = build_dataloader(run.cfg.data, run.cfg.tokenizer, seq_len=seq_len, micro_batch_size=batch_size,
                              seed=run.cfg.seed, rank=0, world_size=1)
    inputs, _ = next(iter(loader))
    return inputs
