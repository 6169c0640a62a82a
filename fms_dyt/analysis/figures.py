"""The figures of ``python -m fms_dyt.analyze``, drawn with matplotlib's object API (no display needed).

Each function returns a ``matplotlib.figure.Figure``. Data series carry ``gid="series"`` and guide
lines (α₀, initial values, zero) ``gid="reference"``, so callers and tests can tell them apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from fms_dyt.analysis.activations import NormCapture

STYLE = {
    "font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "legend.fontsize": 9,
    "xtick.labelsize": 10, "ytick.labelsize": 10, "figure.titlesize": 13,
    "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False,
}
RUN_COLORS = matplotlib.colormaps["tab10"].colors
HIGHLIGHT_COLORS = ("#d62728", "#1f77b4", "#2ca02c", "#ff7f0e")  # the coloured groups of an input/output map
DEPTH_CMAP = "viridis"
CLIP_FRACTION = 0.1  # loss axes leave out the first 10% of training, where the loss falls from ln(vocab)


def style():
    """The rc settings every fms-dyt figure is drawn and saved with."""
    return matplotlib.rc_context(STYLE)


def run_color(index: int):
    return RUN_COLORS[index % len(RUN_COLORS)]


@dataclass
class Curve:
    label: str
    color: tuple
    tokens: np.ndarray
    values: np.ndarray


def token_unit(max_tokens: float) -> tuple[float, str]:
    """Divisor and name that keep token counts readable on an axis."""
    for div, name in ((1e12, "trillions"), (1e9, "billions"), (1e6, "millions"), (1e3, "thousands")):
        if max_tokens >= div:
            return div, name
    return 1.0, ""


def tokens_label(unit: str) -> str:
    return f"tokens seen ({unit})" if unit else "tokens seen"


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average over ``window`` points; the window shrinks at the ends (no lag, no padding)."""
    n = len(values)
    if window <= 1 or n < 3:
        return values.astype(float)
    half = window // 2
    csum = np.concatenate([[0.0], np.cumsum(values, dtype=float)])
    lo = np.clip(np.arange(n) - half, 0, n)
    hi = np.clip(np.arange(n) + half + 1, 0, n)
    return (csum[hi] - csum[lo]) / (hi - lo)


def default_window(n: int) -> int:
    """About 1/20 of the logged points, odd, at least 3 (short runs of under 9 points are not smoothed)."""
    return max(3, n // 20) | 1 if n >= 9 else 1


def _after_start(curve: Curve, values: np.ndarray) -> np.ndarray:
    keep = curve.tokens >= CLIP_FRACTION * curve.tokens.max()
    return values[keep] if keep.any() else values


def _padded(lo: float, hi: float, pad: float = 0.05) -> tuple[float, float]:
    span = (hi - lo) or abs(hi) or 1.0
    return lo - pad * span, hi + pad * span


def loss_figure(curves: Sequence[Curve], window: Optional[int] = None, quantity: str = "training loss",
                title: str = "Training loss: smoothed (lines) and logged (points)") -> Figure:
    """A loss (``quantity``) against tokens for every run; below, each run's smoothed loss minus the first run's."""
    with style():
        two = len(curves) > 1
        fig = Figure(figsize=(10, 7.5 if two else 5), layout="constrained")
        axes = fig.subplots(2, 1, sharex=True, height_ratios=[2, 1]) if two else [fig.subplots()]
        div, unit = token_unit(max(c.tokens.max() for c in curves))
        ax = axes[0]
        smoothed, lows, highs = [], [], []
        for c in curves:
            w = window or default_window(len(c.values))
            s = smooth(c.values, w)
            smoothed.append(s)
            ax.scatter(c.tokens / div, c.values, s=9, color=c.color, alpha=0.3, linewidths=0, rasterized=True,
                       gid="series")
            ax.plot(c.tokens / div, s, color=c.color, lw=2, label=c.label, gid="series")
            tail = _after_start(c, s)
            lows.append(tail.min())
            highs.append(tail.max())
        ax.set_ylim(*_padded(min(lows), max(highs)))
        ax.set_ylabel(f"{quantity} (nats/token)")
        ax.set_title(title)
        ax.legend(loc="upper right")
        if two:
            _difference_panel(axes[1], curves, smoothed, div)
        axes[-1].set_xlabel(tokens_label(unit))
    return fig


def _difference_panel(ax, curves: Sequence[Curve], smoothed: list[np.ndarray], div: float) -> None:
    ref, ref_s = curves[0], smoothed[0]
    ax.axhline(0.0, color=ref.color, lw=1.2, ls="--", gid="reference", label=f"{ref.label} (reference)")
    spans = []
    for c, s in zip(curves[1:], smoothed[1:]):
        inside = (c.tokens >= ref.tokens.min()) & (c.tokens <= ref.tokens.max())
        t = c.tokens[inside]
        diff = s[inside] - np.interp(t, ref.tokens, ref_s)
        ax.plot(t / div, diff, color=c.color, lw=2, gid="series", label=c.label)
        if len(t):
            late = diff[t >= CLIP_FRACTION * ref.tokens.max()]
            spans.append(np.abs(late if len(late) else diff).max())
    limit = max(spans, default=0.0) * 1.1 or 0.1
    ax.set_ylim(-limit, limit)
    ax.set_ylabel("Δ loss vs reference (nats/token)")
    ax.set_title(f"Difference to the first run ({ref.label}); below zero: lower loss")


def alpha_training_figure(label: str, tokens_by_key: dict[str, tuple[np.ndarray, np.ndarray]],
                          n_layers: int, alpha0: dict[str, float], initial_scale: Optional[float]) -> Figure:
    """One DyT or Derf run: α of each layer over training (attention; FFN and final) and the embedding scalar.

    ``tokens_by_key`` maps metric names (``alpha/attn/<i>``, ``alpha/ffn/<i>``, ``alpha/final``,
    ``embedding_scale``) to (tokens seen, value) arrays; missing keys are left out of the plot.
    """
    with style():
        has_scale = "embedding_scale" in tokens_by_key
        fig = Figure(figsize=(16 if has_scale else 11.5, 4.6), layout="constrained")
        axes = fig.subplots(1, 3 if has_scale else 2)
        biggest = max(t.max() for t, _ in tokens_by_key.values())
        div, unit = token_unit(biggest)
        cmap = matplotlib.colormaps[DEPTH_CMAP]
        norm = matplotlib.colors.Normalize(vmin=0, vmax=max(n_layers - 1, 1))
        for ax, site, title in ((axes[0], "attn", "α of the attention norms"),
                                (axes[1], "ffn", "α of the FFN norms and the final norm")):
            for i in range(n_layers):
                key = f"alpha/{site}/{i}"
                if key in tokens_by_key:
                    t, v = tokens_by_key[key]
                    ax.plot(t / div, v, color=cmap(norm(i)), lw=1.4, gid="series")
            if alpha0[site] is not None:  # None: this site is not DyT (only the final norm is)
                ax.axhline(alpha0[site], color="grey", lw=1, ls=":", gid="reference", label=f"α₀ = {alpha0[site]:g}")
            if site == "ffn" and "alpha/final" in tokens_by_key:
                t, v = tokens_by_key["alpha/final"]
                ax.plot(t / div, v, color="black", lw=2.2, ls="--", gid="series", label="final norm")
                if alpha0["final"] != alpha0["ffn"]:
                    ax.axhline(alpha0["final"], color="black", lw=1, ls=":", gid="reference",
                               label=f"final α₀ = {alpha0['final']:g}")
            ax.set_title(title)
            ax.set_xlabel(tokens_label(unit))
            ax.set_ylabel("α (scale inside tanh or erf)")
            ax.legend(loc="best")
        bar = fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes[:2], pad=0.01, aspect=30)
        bar.set_label("layer (0 = first)")
        if n_layers <= 12:
            bar.set_ticks(range(n_layers))
        if has_scale:
            ax = axes[2]
            t, v = tokens_by_key["embedding_scale"]
            ax.plot(t / div, v, color="tab:purple", lw=2, gid="series", label="embedding scalar")
            if initial_scale is not None:
                ax.axhline(initial_scale, color="grey", lw=1, ls=":", gid="reference",
                           label=f"initial √d = {initial_scale:.3g}")
            ax.set_title("Learnable embedding scalar")
            ax.set_xlabel(tokens_label(unit))
            ax.set_ylabel("scale on token embeddings")
            ax.legend(loc="best")
        fig.suptitle(f"{label}: learned α over training")
    return fig


@dataclass
class DepthAlphas:
    label: str
    color: tuple
    attn: list[float]
    ffn: list[float]
    final: Optional[float]  # None when the final norm is not DyT


def alpha_depth_figure(runs: Sequence[DepthAlphas]) -> Figure:
    """α at the analysed checkpoint against depth, one colour per DyT run; the final norm sits after the last layer."""
    with style():
        fig = Figure(figsize=(9, 5), layout="constrained")
        ax = fig.subplots()
        deepest = 0
        for r in runs:
            depth = np.arange(len(r.attn))
            deepest = max(deepest, len(r.attn))
            ax.plot(depth, r.attn, color=r.color, marker="o", ms=5, lw=1.8, gid="series")
            ax.plot(depth, r.ffn, color=r.color, marker="s", ms=5, lw=1.8, ls="--", gid="series")
            if r.final is not None:
                ax.plot([len(r.attn)], [r.final], color=r.color, marker="*", ms=14, ls="none", gid="series")
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], color=r.color, lw=3, label=r.label) for r in runs] + [
            Line2D([], [], color="black", marker="o", lw=1.8, label="attention norm"),
            Line2D([], [], color="black", marker="s", lw=1.8, ls="--", label="FFN norm"),
            Line2D([], [], color="black", marker="*", ms=12, ls="none", label="final norm"),
        ]
        ax.legend(handles=handles, loc="best")
        ticks = list(range(0, deepest, max(1, math.ceil(deepest / 16))))
        ax.set_xticks(ticks + [deepest], [str(t) for t in ticks] + ["final"])
        ax.set_xlabel("layer (0 = first)")
        ax.set_ylabel("α (scale inside tanh or erf)")
        ax.set_title("Learned α against depth (at the analysed checkpoint)")
    return fig


def norm_io_figure(label: str, captures: Sequence[NormCapture], color_by: str, points: int = 4000,
                   groups: int = 4, seed: int = 0, token_name: Optional[Callable[[int], str]] = None) -> Figure:
    """Norm input against output before γ, one panel per site, as in the paper's Figures 2 and 4.

    Grey: a random ``points`` of all sampled elements. Coloured (``color_by``), the same in every
    panel: all channels of ``groups`` tokens spread over the range of their RMS (named by
    ``token_name`` when given), or all sampled tokens of the channels with the largest inputs and
    one median channel. Point-wise panels carry their function (tanh(αx), erf(αx + s)), drawn under the
    coloured points.
    """
    if color_by not in ("token", "channel"):
        raise ValueError(f"color_by={color_by!r}: use 'token' or 'channel'")
    rng = np.random.default_rng(seed)
    picks = shared_picks(captures, color_by, groups)
    with style():
        cols = min(4, len(captures))
        rows = math.ceil(len(captures) / cols)
        fig = Figure(figsize=(4.3 * cols, 3.9 * rows + 1.0), layout="constrained")
        axes = fig.subplots(rows, cols, squeeze=False).ravel()
        for ax, cap in zip(axes, captures):
            x, y = cap.x.numpy(), cap.y.numpy()
            flat = rng.choice(x.size, size=min(points, x.size), replace=False)
            ax.scatter(x.ravel()[flat], y.ravel()[flat], s=3, color="0.6", alpha=0.35, linewidths=0,
                       rasterized=True, gid="series", label="all elements (random sample)")
            for j, (color, i) in enumerate(zip(HIGHLIGHT_COLORS, picks)):
                xs, ys = (x[i], y[i]) if color_by == "token" else (x[:, i], y[:, i])
                name = _group_name(cap, i, color_by, token_name)
                if color_by == "channel" and j == len(picks) - 1:
                    name += " (median)"
                keep = rng.choice(xs.size, size=min(600, xs.size), replace=False)
                ax.scatter(xs[keep], ys[keep], s=7, color=color, alpha=0.85, linewidths=0, rasterized=True,
                           zorder=2.5, gid="series", label=name)
            title = cap.title
            if cap.curve is not None:
                grid, values, formula = cap.curve
                ax.plot(grid.numpy(), values.detach().numpy(), color="black", lw=1, zorder=1.5, gid="series",
                        label=f"{formula}, values in each title")
                title += f" (α = {cap.alpha:.3g}" + (f", s = {cap.shift:.3g})" if cap.shift is not None else ")")
            ax.set_title(title)
            ax.set_xlabel("input x")
            ax.set_ylabel("output before γ")
        for ax in axes[len(captures):]:
            ax.set_visible(False)
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 3), markerscale=2.5)
        what = ("by token: every channel of 4 tokens spread over the range of RMS" if color_by == "token" else
                "by channel: the 3 channels with the largest inputs and a median one")
        fig.suptitle(f"{label}: norm input vs output\ncoloured {what}")
    return fig


def shared_picks(captures: Sequence[NormCapture], color_by: str, k: int) -> list[int]:
    """Tokens (or channels) to colour in every panel of a figure, scored over all panels together.

    Each site's token RMS (channel max |x|) is divided by its median there, so every site weighs alike.
    """
    score = 0.0
    for cap in captures:
        x = cap.x.numpy().astype(np.float64)
        v = np.sqrt((x ** 2).mean(axis=1)) if color_by == "token" else np.abs(x).max(axis=0)
        score = score + v / (np.median(v) or 1.0)
    order = np.argsort(score)
    if color_by == "token":  # lowest to highest RMS, evenly spread
        picks = [int(order[round(q * (len(order) - 1))]) for q in np.linspace(0, 1, k)]
    else:  # the largest, then a typical one
        picks = [int(c) for c in order[::-1][: k - 1]] + [int(order[len(order) // 2])]
    return list(dict.fromkeys(picks))


def _group_name(cap: NormCapture, i: int, color_by: str, token_name) -> str:
    if color_by == "channel":
        return f"channel {i}"
    tid = int(cap.token_ids[i])
    what = repr(token_name(tid)) if token_name else f"token id {tid}"
    return f"{what} (sequence {int(cap.sequences[i])}, position {int(cap.positions[i])})"


# Panels of the telemetry figure, in this order; other quantities (a kind's own scalars) follow.
TELEMETRY_PANELS = {
    "input_rms": ("input RMS of each norm (log scale)", "RMS of the norm's input"),
    "saturated": ("fraction of inputs saturated", "fraction with |preactivation| > saturated_above"),
    "alpha": ("α of each norm", "α (scale inside the squashing function)"),
    "gamma_abs": ("mean |γ| of each norm", "mean |γ| (output scale)"),
}


def telemetry_figure(label: str, series: dict[str, dict[str, tuple[Sequence[int], Sequence[float]]]],
                     n_layers: int) -> Figure:
    """One run's telemetry over steps: a panel per quantity (``series``: quantity -> site -> (steps,
    values)), one line per norm coloured by depth; attention norms solid, FFN norms dashed, the
    final norm black."""
    quantities = [q for q in TELEMETRY_PANELS if q in series] + sorted(q for q in series if q not in TELEMETRY_PANELS)
    with style():
        cols = min(2, len(quantities))
        rows = math.ceil(len(quantities) / cols)
        fig = Figure(figsize=(6.5 * cols + 1, 4.3 * rows + 0.6), layout="constrained")
        axes = fig.subplots(rows, cols, squeeze=False).ravel()
        cmap = matplotlib.colormaps[DEPTH_CMAP]
        depth = matplotlib.colors.Normalize(vmin=0, vmax=max(n_layers - 1, 1))
        for ax, quantity in zip(axes, quantities):
            title, ylabel = TELEMETRY_PANELS.get(quantity, (f"{quantity} of each norm", quantity))
            for site, (steps, values) in series[quantity].items():
                if site == "final":
                    ax.plot(steps, values, color="black", lw=2.2, ls="--", gid="series", label="final norm")
                else:
                    kind, layer = site.split("/")
                    ax.plot(steps, values, color=cmap(depth(int(layer))), lw=1.4, ls="-" if kind == "attn" else "--",
                            gid="series")
            if quantity == "input_rms":
                ax.set_yscale("log")
            if quantity == "saturated":
                ax.set_ylim(-0.02, 1.02)
            if "final" in series[quantity]:
                ax.legend(loc="best")
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
        for ax in axes[len(quantities):]:
            ax.set_visible(False)
        bar = fig.colorbar(matplotlib.cm.ScalarMappable(norm=depth, cmap=cmap), ax=axes.tolist(), pad=0.01, aspect=40)
        bar.set_label("layer (0 = first); attention norm solid, FFN norm dashed")
        if n_layers <= 12:
            bar.set_ticks(range(n_layers))
        fig.suptitle(f"{label}: telemetry of the norm sites on a fixed micro-batch")
    return fig
