"""The report's figures, one function each; every line drawn for an arm carries the arm's name as its gid, and arms
a figure has nothing to show for are named in the figure's note, so no arm disappears silently."""

from __future__ import annotations

import math
from typing import Callable

from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter

from mor_ds.report.runs import Run, cumulative_flops, validation

FIGSIZE = (8.0, 4.8)
DPI = 100
NOTE_PREFIX = "not shown"
STEP_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")


def _colors(runs: list[Run]) -> dict[str, str]:
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray",
               "tab:olive", "tab:cyan"]
    return {run.name: palette[i % len(palette)] for i, run in enumerate(runs)}


def _note(fig: Figure, absent: dict[str, list[str]]) -> None:
    """Name the arms not drawn, by reason: {"no router": [arm, ...]}."""
    parts = [f"{why}: {', '.join(arms)}" for why, arms in absent.items() if arms]
    if parts:
        fig.text(0.01, 0.01, f"{NOTE_PREFIX} ({'; '.join(parts)})", fontsize=7, color="dimgray", ha="left",
                 va="bottom")


def _finish(fig: Figure, title: str) -> Figure:
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


def _tokens_axis(ax, fontsize: int | None = None) -> None:
    ax.set_xlabel("training tokens", fontsize=fontsize)
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))


def _line(ax, run: Run, xs, ys, color: str, **kwargs):
    (line,) = ax.plot(xs, ys, color=color, **kwargs)
    line.set_gid(run.name)
    return line


def _convention(runs: list[Run]) -> str:
    conventions = {r.cfg.train.flops_convention for r in runs}
    return conventions.pop() if len(conventions) == 1 else "exact"


def val_loss_vs_flops(runs: list[Run], colors: dict[str, str]) -> Figure:
    convention = _convention(runs)
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    ax = fig.subplots()
    absent = []
    for run in runs:
        flops = cumulative_flops(run, convention)
        points = [(f, r["val/loss"]) for f, r in zip(flops, run.records) if "val/loss" in r]
        final = validation(run)
        if not points and final is None:
            absent.append(run.name)
            continue
        if points:
            _line(ax, run, *zip(*points), colors[run.name], marker="o", ms=3, lw=1.4, label=run.name)
        if run.eval is not None and final is not None:
            _line(ax, run, [flops[-1]], [final["loss"]], colors[run.name], marker="*", ms=11, ls="none",
                  label=None if points else run.name)
    budgets = {r.budget for r in runs}
    for budget in sorted(budgets):
        if budget.startswith("flops=") and budget.endswith(f"({convention})"):
            ax.axvline(float(budget.split("=", 1)[1].split()[0]), color="black", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel(f"training FLOPs ({convention} convention)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.grid(alpha=0.3, which="both")
    if ax.get_lines():
        ax.legend(fontsize=8)
    _note(fig, {"no validation loss": absent})
    return _finish(fig, "Validation loss against training FLOPs (★ = mor-ds eval on all held-out windows; "
                        "dotted = budget)")


def train_loss_vs_tokens(runs: list[Run], colors: dict[str, str]) -> Figure:
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    ax = fig.subplots()
    tail = []
    for run in runs:
        xs, ys = run.series("loss")
        _line(ax, run, xs, ys, colors[run.name], lw=1.2, label=run.name)
        tail += ys[len(ys) // 10:]
    if tail:  # the first steps' loss (~ln vocab) would flatten every curve that matters
        low, high = min(tail), max(tail)
        ax.set_ylim(low - 0.05 * (high - low + 1e-9), high + 0.05 * (high - low + 1e-9))
    _tokens_axis(ax)
    ax.set_ylabel("train loss (LM, nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _finish(fig, "Training loss against tokens")


def _panels(n: int) -> tuple[Figure, list]:
    """A figure of n small panels, three to a row; the axes past n are hidden."""
    cols = min(3, max(n, 1))
    rows = math.ceil(max(n, 1) / cols)
    fig = Figure(figsize=(FIGSIZE[0], 2.8 * rows + 0.6), dpi=DPI)
    axes = list(fig.subplots(rows, cols, squeeze=False).flatten())
    for ax in axes[n:]:
        ax.set_axis_off()
    return fig, axes[:n]


def _panel_axes(ax, title: str, ylabel: str, legend_size: int) -> None:
    ax.set_title(title, fontsize=9)
    _tokens_axis(ax, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)


def depth_fractions(runs: list[Run], colors: dict[str, str]) -> Figure:
    from mor_ds.report.runs import target_fractions

    routed = [r for r in runs if r.routed]
    fig, axes = _panels(len(routed))
    for ax, run in zip(axes, routed):  # one panel per arm, one colour per recursion step
        for step, target in enumerate(target_fractions(run)):
            color = STEP_COLORS[step % len(STEP_COLORS)]
            xs, ys = run.series(f"depth_frac/{step}")
            _line(ax, run, xs, ys, color, lw=1.3, label=f"step {step} train")
            xs, ys = run.series(f"val/depth_frac/{step}")
            if xs:
                _line(ax, run, xs, ys, color, lw=1, ls="--", marker="o", ms=3, label=f"step {step} held-out")
            ax.axhline(target, color=color, ls=":", lw=1)
        ax.set_ylim(-0.03, 1.03)
        _panel_axes(ax, run.name, "fraction of tokens", legend_size=6)
    _note(fig, {"no router": [r.name for r in runs if not r.routed]})
    return _finish(fig, "Tokens reaching each recursion step: training (solid), held-out causal routing (dashed), "
                        "target (dotted)")


def router_weights(runs: list[Run], colors: dict[str, str]) -> Figure:
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    mean_ax, std_ax = fig.subplots(1, 2)
    routed = [r for r in runs if r.routed]
    for run in routed:
        for ax, key in ((mean_ax, "router_weight/mean"), (std_ax, "router_weight/std")):
            _line(ax, run, *run.series(key), colors[run.name], lw=1.2, label=run.name)
    for ax, what in ((mean_ax, "mean"), (std_ax, "std")):
        _tokens_axis(ax)
        ax.set_ylabel(f"router weight {what}")
        ax.grid(alpha=0.3)
        if routed:
            ax.legend(fontsize=8)
    _note(fig, {"no router": [r.name for r in runs if not r.routed]})
    return _finish(fig, "Router weights g of the routed tokens over training")


def aux_losses(runs: list[Run], colors: dict[str, str]) -> Figure:
    keys = sorted({k for r in runs for rec in r.records for k in rec if k.startswith("aux/")})
    fig, axes = _panels(len(keys))
    for ax, key in zip(axes, keys):
        for run in runs:
            xs, ys = run.series(key)
            if xs:
                _line(ax, run, xs, ys, colors[run.name], lw=1.2, label=run.name)
        _panel_axes(ax, key.removeprefix("aux/"), "loss (coefficient applied)", legend_size=7)
    _note(fig, {"no aux loss": [r.name for r in runs if not any(k.startswith("aux/") for k in r.last)]})
    return _finish(fig, "Router auxiliary losses over training")


def isoflop(runs: list[Run], colors: dict[str, str]) -> Figure:
    """Final validation loss against unique parameters, one series per budget: the isoFLOP picture."""
    from mor_ds.flops import param_counts

    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    ax = fig.subplots()
    absent = []
    for budget in dict.fromkeys(r.budget for r in runs):
        group = []
        for run in (r for r in runs if r.budget == budget):
            final = validation(run)
            if final is None:
                absent.append(run.name)
                continue
            group.append((param_counts(run.cfg).unique, final["loss"], run))
        group.sort(key=lambda item: item[0])
        if len(group) > 1:
            ax.plot([g[0] for g in group], [g[1] for g in group], color="lightgray", lw=1, zorder=0)
        for params, loss, run in group:
            _line(ax, run, [params], [loss], colors[run.name], marker="o", ms=7, ls="none", label=run.name)
            ax.annotate(run.name, (params, loss), textcoords="offset points", xytext=(5, 4), fontsize=7)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.xaxis.set_minor_formatter(EngFormatter(sep=""))
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("unique parameters")
    ax.set_ylabel("final validation loss (nats/token)")
    ax.grid(alpha=0.3, which="both")
    if ax.get_lines():
        ax.legend(fontsize=8)
    _note(fig, {"no validation loss": absent})
    return _finish(fig, "Final validation loss against unique parameters, per budget")


# file name -> (figure function, caption)
FIGURES: dict[str, tuple[Callable[[list[Run], dict[str, str]], Figure], str]] = {
    "val_loss_vs_flops.png": (val_loss_vs_flops, "validation loss against training FLOPs (log x)"),
    "isoflop.png": (isoflop, "final validation loss against unique parameters, per budget"),
    "train_loss_vs_tokens.png": (train_loss_vs_tokens, "training loss against tokens"),
    "depth_fractions.png": (depth_fractions, "fraction of tokens reaching each recursion step over training"),
    "router_weights.png": (router_weights, "router weight mean and std over training"),
    "aux_losses.png": (aux_losses, "auxiliary router losses over training"),
}


def build_figures(runs: list[Run]) -> dict[str, Figure]:
    """Every figure of the report for the runs that logged at least one step."""
    colors = _colors(runs)
    return {name: make(runs, colors) for name, (make, _) in FIGURES.items()}
