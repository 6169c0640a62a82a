"""Telemetry of the norm sites: what makes a DyT run stall, measured during training.

Every ``logging.telemetry_interval`` steps (and at the last step) the model runs forward once,
without gradients, on one fixed micro-batch, the same inputs every time so values compare over
steps. Forward hooks on every norm site (``attn/<layer>``, ``ffn/<layer>``, ``final``) record,
as metric keys ``telemetry/<quantity>/<site>``:

- ``input_rms``: RMS of the norm's input over the whole micro-batch (every kind, RMSNorm too);
- ``saturated``: point-wise norms only, the fraction of input elements with
  ``|layer.preactivation(x)| > layer.saturated_above`` (DyT: |αx| > 2, where tanh passes 7% of
  its peak gradient);
- ``gamma_abs``: point-wise norms only, the mean |γ| of the layer's ``weight``;
- ``<name>``: point-wise norms only, each of the layer's scalars (its class's ``scalars``) by its
  own name (DyT: ``alpha``; a kind with a learnable shift logs it the same way).

A layer is point-wise when its class says so (``Norm.pointwise``, fms_dyt/norms.py); nothing here
knows the kinds by name.
``telemetry/time_s`` is what the pass cost. Rank 0 warns, once per site and condition, when a
point-wise site stays more than 90% saturated (with its input RMS steady, see plateau_steps) or a
site's input RMS has grown more than 100x since the first pass of this process (docs/analysis.md).
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Optional

import torch
from torch import nn

from fms_dyt.metrics import read_metrics
from fms_dyt.norms import norm_sites
from fms_dyt.parallel import on_rank0

log = logging.getLogger("fms_dyt")

# Warnings (thresholds from the quickstart's runs, docs/analysis.md): a point-wise site more than
# 90% saturated at every pass of a plateau window (plateau_steps) over which its input RMS stayed
# within PLATEAU_CHANGE (stuck, not a transient rise or a recovery); a site's input RMS above
# GROWTH_WARNING times its value at this process's first pass.
SATURATED_WARNING = 0.9  # trapped layers: 95-100%; the healthy quickstart's deepest: ~60% (|αx| > 2)
PLATEAU_CHANGE = 0.1
GROWTH_WARNING = 100.0
HINT = ("with DyT-like norms, start the final norm's scale larger (norm.final_gamma0=auto: the logit scale of "
        "the paper's width-4096 model), or use a scale-free final norm (norm.final=rmsnorm); then probe α₀ "
        "(norm.alpha_attn, norm.alpha_ffn); docs/science.md, \"The output scale\"")


def fixed_batch(cfg) -> torch.Tensor:
    """The inputs of every telemetry pass: the first ``train.micro_batch_size`` windows of the run's
    data read by one reader (rank 0 of 1, no workers), so they do not depend on the world size,
    ``data.num_workers`` or a resume. In a run, rank 0 alone reads them (:meth:`Telemetry.for_run`)."""
    from fms_dyt.data.config import DataConfig, as_config
    from fms_dyt.data.pipeline import PackedLoader

    one_reader = replace(as_config(cfg.data, DataConfig), num_workers=0, readers=None)
    loader = PackedLoader(one_reader, cfg.tokenizer, seq_len=cfg.train.seq_len,
                          micro_batch_size=cfg.train.micro_batch_size, seed=cfg.seed, rank=0, world_size=1)
    inputs, _ = next(iter(loader))
    loader.close()
    return inputs


def _full(p: torch.Tensor) -> torch.Tensor:
    """A whole parameter; an FSDP2 shard is gathered (a collective: every rank calls it)."""
    return p.full_tensor() if hasattr(p, "full_tensor") else p


@torch.no_grad()
def measure(model: nn.Module, inputs: torch.Tensor) -> dict[str, float]:
    """One telemetry pass of ``model`` on ``inputs`` [batch, seq]: the values by metric key.

    Under FSDP2 every rank must call it (the forward gathers parameters)."""
    sites = norm_sites(model)
    stats: dict[str, torch.Tensor] = {}  # kept on the device; read back once, at the end

    def hook_for(site: str):
        def hook(layer, args, output):
            x = args[0].float()
            stats[f"telemetry/input_rms/{site}"] = x.pow(2).mean().sqrt()
            if layer.pointwise:
                saturated = layer.preactivation(x).abs() > layer.saturated_above
                stats[f"telemetry/saturated/{site}"] = saturated.float().mean()
        return hook

    handles = [layer.register_forward_hook(hook_for(site)) for site, layer in sites.items()]
    try:
        with torch.compiler.set_stance("force_eager"):  # compiled blocks run as written, hooks included
            model(inputs.to(next(model.parameters()).device))
    finally:
        for handle in handles:
            handle.remove()
    for site, layer in sites.items():
        if not layer.pointwise:
            continue
        stats[f"telemetry/gamma_abs/{site}"] = _full(layer.weight).float().abs().mean()
        for name in layer.scalars:
            stats[f"telemetry/{name}/{site}"] = _full(getattr(layer, name)).float().reshape(())
    return dict(zip(stats, torch.stack(list(stats.values())).tolist()))


class Telemetry:
    """A run's telemetry: when a pass is due, the pass, and the warnings (``warn``: rank 0)."""

    def __init__(self, inputs: torch.Tensor, interval: int, total_steps: int, warn: bool):
        self.inputs, self.interval, self.total_steps, self.warn = inputs, interval, total_steps, warn
        self.first_rms: dict[str, tuple[int, float]] = {}  # site -> (step, input RMS) of the run's first pass
        # site -> (step, input RMS, saturated) of the passes in the saturation warning's window
        self.history: dict[str, list[tuple[int, float, float]]] = {}
        self.warned: set[tuple[str, str]] = set()
        self.replaying = False

    def replay(self, records: Iterable[dict]) -> None:
        """Take up the warnings' baselines and windows from the passes a resumed run logged, so a
        growth is still measured from the run's first pass; nothing is warned while replaying."""
        self.replaying = True
        try:
            for record in records:
                values = {k: v for k, v in record.items() if k.startswith("telemetry/")}
                if values:
                    self._check(values, record["step"])
        finally:
            self.replaying = False

    @classmethod
    def for_run(cls, cfg, total_steps: int, is_main: bool, resumed: bool) -> Optional["Telemetry"]:
        """None when ``logging.telemetry_interval`` is null; a resumed run's warnings go on from its
        ``metrics.jsonl`` (rank 0, the one that warns). Every rank calls it (rank 0 reads the batch
        and broadcasts it; its error is raised on every rank)."""
        interval = cfg.logging.telemetry_interval
        if interval is None:
            return None
        # rank 0 reads, every rank gets the batch (a few KB, pickled): not 1,024 loaders opening the
        # same first file (with data=pile, the same hub stream)
        telemetry = cls(on_rank0(lambda: fixed_batch(cfg)), interval, total_steps, is_main)
        if resumed and is_main:
            telemetry.replay(read_metrics(Path(cfg.run_dir) / "metrics.jsonl").records)
        return telemetry

    @property
    def plateau_steps(self) -> int:
        """The window of the saturation warning: a tenth of the run, at least two intervals (the
        quickstart's early transient of saturation lasts about a quarter of it)."""
        return max(2 * self.interval, self.total_steps // 10)

    def due(self, step: int) -> bool:
        return step % self.interval == 0 or step == self.total_steps

    def __call__(self, model: nn.Module, step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        values = measure(model, self.inputs)
        values["telemetry/time_s"] = time.perf_counter() - t0
        if self.warn:
            self._check(values, step)
        return values

    def _check(self, values: dict[str, float], step: int) -> None:
        for key, rms in values.items():
            quantity, _, site = key[len("telemetry/"):].partition("/")
            if quantity != "input_rms":
                continue
            first_step, first = self.first_rms.setdefault(site, (step, rms))
            if rms > GROWTH_WARNING * first:
                self._warn_once(site, "growth", "step %d: the input RMS of norm %s has grown %.0fx since step %d "
                                "(%.3g -> %.3g): the residual stream is running away; %s",
                                step, site, rms / first, first_step, first, rms, HINT)
            saturated = values.get(f"telemetry/saturated/{site}")
            if saturated is None:
                continue
            history = self.history.setdefault(site, [])
            history.append((step, rms, saturated))
            start = step - self.plateau_steps
            while len(history) > 1 and history[1][0] <= start:  # keep one pass at or before the window's start
                history.pop(0)
            levels = [r for _, r, _ in history]
            stuck = history[0][0] <= start and all(s > SATURATED_WARNING for _, _, s in history) and \
                max(levels) < (1 + PLATEAU_CHANGE) * min(levels)
            if stuck:
                self._warn_once(site, "saturated", "step %d: %.0f%% of the inputs of norm %s are saturated, at every "
                                "pass since step %d with a steady input RMS (%.3g): the layer passes almost no "
                                "gradient; %s", step, 100 * saturated, site, history[0][0], rms, HINT)

    def _warn_once(self, site: str, condition: str, message: str, *args) -> None:
        if not self.replaying and (site, condition) not in self.warned:
            self.warned.add((site, condition))
            log.warning("telemetry: " + message, *args)
