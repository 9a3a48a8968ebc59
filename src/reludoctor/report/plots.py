"""The HTML report's figures: matplotlib drawings of a :class:`Report`, returned as inline SVG.

Each function takes the report (or its parts) and returns one ``<svg>`` element as text, or
None when the report holds nothing to draw. Text stays text in the SVG (searchable, sharp
in print) and matplotlib escapes it; layer names lose their control and bidi-override
characters, and their ``$`` is escaped so that it is not read as mathematics.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import FixedLocator, NullLocator

from reludoctor.diagnose.summaries import LayerReport, Window
from reludoctor.text import printable

if TYPE_CHECKING:
    from reludoctor.report.report import Report

ALIVE, DORMANT, DEAD = "#2f9e44", "#f08c00", "#d6336c"
START, END = "#adb5bd", "#1c7ed6"
MISSING = "#f1f3f5"  # heatmap cells with no value
#: Heatmaps' colour bars: above the map, so that their size does not grow with its height.
COLORBAR = {"location": "top", "shrink": 0.5, "aspect": 40}
#: Layer names longer than this are shortened in the middle on axes.
LABEL_CHARS = 36
#: Per-layer panels (unit grids, histograms) are drawn for at most this many layers.
PANELS = 6
#: A unit grid shows at most this many units of a layer.
GRID_UNITS = 4096
#: Up to this many layers, gradient norms are lines; above, a heatmap.
LINE_LAYERS = 10

STYLE = {
    "svg.fonttype": "none",
    "font.family": "sans-serif",
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "figure.dpi": 100,
}


@contextmanager
def _figure(width: float, height: float) -> Iterator[Figure]:
    # A bare Figure, not pyplot: the user's backend and open figures stay as they were.
    with matplotlib.rc_context(STYLE):
        yield Figure(figsize=(width, height), layout="constrained")


def _svg(fig: Figure) -> str:
    buffer = io.StringIO()
    with matplotlib.rc_context(STYLE):
        fig.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None})
    text = buffer.getvalue()
    return text[text.index("<svg") :]  # drop the XML prolog and doctype: inline in HTML


def short(name: str, limit: int = LABEL_CHARS) -> str:
    """``name`` as a label: shortened in the middle to ``limit`` characters, printable,
    ``$`` escaped."""
    if len(name) > limit:
        keep = limit - 1
        name = name[: keep - keep // 2] + "…" + name[-(keep // 2) :]
    return printable(name).replace("$", r"\$")


def _dead_in(window: Window, can_die: set[str]) -> int:
    return sum(wl.dead for wl in window.layers if wl.name in can_die)


def death_windows(report: Report) -> list[Window]:
    """Windows in which units died: more dead units (in layers whose units can die) than in the
    window before, or than on the first batch for the first window."""
    can_die = {layer.name for layer in report.layers if layer.can_die}
    before = sum(
        round((layer.start_dead_fraction or 0.0) * layer.units)
        for layer in report.layers
        if layer.can_die
    )
    died = []
    for window in report.windows:
        dead = _dead_in(window, can_die)
        if dead > before:
            died.append(window)
        before = dead
    return died


def _layer_axis(ax: Axes, names: Sequence[str]) -> None:
    step = max(1, math.ceil(len(names) / 40))  # at most ~40 labels
    ticks = list(range(0, len(names), step))
    ax.set_yticks(ticks, [short(names[i]) for i in ticks])


def _window_axis(ax: Axes, windows: Sequence[Window]) -> None:
    step = max(1, math.ceil(len(windows) / 12))
    ticks = list(range(0, len(windows), step))
    ax.set_xticks(ticks, [str(windows[i].end_step) for i in ticks])
    ax.set_xlabel("step (end of window)")


def _layer_matrix(report: Report, value: str) -> tuple[list[str], np.ndarray]:
    """Layers x windows matrix of a WindowLayer field (NaN where missing)."""
    names = [layer.name for layer in report.layers]
    row = {name: i for i, name in enumerate(names)}
    matrix = np.full((len(names), len(report.windows)), np.nan)
    for j, window in enumerate(report.windows):
        for wl in window.layers:
            number = getattr(wl, value)
            if wl.name in row and number is not None:
                matrix[row[wl.name], j] = number
    return names, matrix


def _height_for(layers: int) -> float:
    return min(2.0 + 0.16 * layers, 18.0)


def dead_heatmap(report: Report) -> str | None:
    """Layers (in model order) x windows, coloured by dead fraction."""
    if not report.windows or not report.layers:
        return None
    names, matrix = _layer_matrix(report, "dead_fraction")
    with _figure(9.5, _height_for(len(names))) as fig:
        ax = fig.add_subplot()
        cmap = matplotlib.colormaps["Reds"].with_extremes(bad=MISSING)
        image = ax.imshow(matrix, aspect="auto", cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        _layer_axis(ax, names)
        _window_axis(ax, report.windows)
        fig.colorbar(image, ax=ax, label="dead fraction", **COLORBAR)
        return _svg(fig)


def loss_curve(report: Report) -> str | None:
    """The loss over steps, with the windows where units died shaded."""
    xs: list[float] = []
    ys: list[float] = []
    for window in report.windows:
        curve = window.loss_curve
        if not curve:
            continue
        width = window.steps / len(curve)
        xs += [window.start_step + (i + 0.5) * width for i in range(len(curve))]
        ys += curve
    nonfinite = [w for w in report.windows if w.loss_nonfinite]
    if not xs and not nonfinite:
        return None
    died = death_windows(report)
    with _figure(9.5, 3.2) as fig:
        ax = fig.add_subplot()
        if xs:
            ax.plot(xs, ys, color=END, linewidth=1.5, label="loss (window means of steps)")
            positive = [y for y in ys if y > 0]
            if len(positive) == len(ys) and max(ys) / max(min(ys), 1e-300) > 100:
                ax.set_yscale("log")
        for i, window in enumerate(died):
            label = "units died in this window" if i == 0 else None
            ax.axvspan(window.start_step, window.end_step, color=DEAD, alpha=0.15, label=label)
        for i, window in enumerate(nonfinite):
            label = "loss inf/NaN" if i == 0 else None
            ax.axvspan(
                window.start_step,
                window.end_step,
                fill=False,
                hatch="//",
                color="#495057",
                linewidth=0,
                label=label,
            )
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend(loc="upper right", frameon=False)
        return _svg(fig)


def _panel_grid(panels: int) -> tuple[int, int]:
    """(columns, rows) for ``panels`` per-layer panels, at most three a row."""
    columns = min(3, panels)
    return columns, math.ceil(panels / columns)


def unit_grids(layers: Sequence[LayerReport]) -> str | None:
    """One grid of units per layer: alive, dormant (ReDo's tau), dead."""
    layers = [layer for layer in layers if layer.units][:PANELS]
    if not layers:
        return None
    columns, rows = _panel_grid(len(layers))
    cmap = ListedColormap([ALIVE, DORMANT, DEAD, "#ffffff"])
    with _figure(9.5, 2.4 * rows + 0.4) as fig:
        for index, layer in enumerate(layers):
            ax = fig.add_subplot(rows, columns, index + 1)
            shown = min(layer.units, GRID_UNITS)
            state = np.zeros(shown)
            dormant = [u for u in layer.dormant_units if u < shown]
            state[dormant] = 1
            state[[u for u in layer.dead_units if u < shown]] = 2
            width = math.ceil(math.sqrt(shown * 2))
            height = math.ceil(shown / width)
            cells = np.full(width * height, 3.0)
            cells[:shown] = state
            ax.imshow(
                cells.reshape(height, width),
                cmap=cmap,
                vmin=0,
                vmax=3,
                interpolation="nearest",
                aspect="equal",
            )
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            more = f", first {shown} shown" if shown < layer.units else ""
            dead = f" ({layer.dead} of them dead)" if layer.dead else ""
            ax.set_title(
                f"{short(layer.name, 30)}\n{layer.dormant} dormant{dead} of {layer.units}{more}",
                fontsize=9,
            )
        handles = [Rectangle((0, 0), 1, 1, color=c) for c in (ALIVE, DORMANT, DEAD)]
        fig.legend(
            handles,
            ["alive", "dormant, not dead", "dead"],
            loc="outside lower center",
            ncols=3,
            frameon=False,
        )
        return _svg(fig)


def preactivation_histograms(layers: Sequence[LayerReport]) -> str | None:
    """Pre-activations on the first batch and at the last sampled step, with 0 marked."""
    layers = [layer for layer in layers if layer.preact_histogram][:PANELS]
    if not layers:
        return None
    columns, rows = _panel_grid(len(layers))
    with _figure(9.5, 2.5 * rows + 0.4) as fig:
        for index, layer in enumerate(layers):
            histogram = layer.preact_histogram or {}
            edges = np.asarray(histogram["edges"])
            ax = fig.add_subplot(rows, columns, index + 1)
            for key, color, label in (("start", START, "first batch"), ("end", END, "latest")):
                counts = histogram.get(key)
                if counts is None:
                    continue
                total = max(sum(counts), 1)
                ax.stairs(
                    np.asarray(counts) / total,
                    edges,
                    color=color,
                    fill=key == "start",
                    alpha=0.6 if key == "start" else 1.0,
                    linewidth=1.4,
                    label=label,
                )
            if histogram.get("scale") == "asinh":
                width = histogram["linear_width"]
                ax.set_xscale("asinh", linear_width=width)
                ax.xaxis.set_major_locator(FixedLocator(_asinh_ticks(edges[0], edges[-1], width)))
                ax.xaxis.set_minor_locator(NullLocator())
            ax.axvline(0, color=DEAD, linewidth=1, linestyle="--")
            ax.set_title(f"{short(layer.name, 30)} ({layer.dead_fraction:.0%} dead)", fontsize=9)
            ax.set_yticks([])
            ax.tick_params(axis="x", labelsize=8)
        handles, labels = fig.axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncols=2, frameon=False)
        return _svg(fig)


def gradient_norms(report: Report) -> str | None:
    """Gradient norm of each layer's weights over the windows: lines, or a heatmap when many."""
    names, matrix = _layer_matrix(report, "grad_norm")
    if not report.windows or np.isnan(matrix).all():
        return None
    if len(report.windows) == 1:
        return _gradient_bars(names, matrix[:, 0], report.windows[0])
    if len(names) <= LINE_LAYERS:
        with _figure(9.5, 3.2) as fig:
            ax = fig.add_subplot()
            steps = [w.end_step for w in report.windows]
            for name, row in zip(names, matrix, strict=True):
                if not np.isnan(row).all():
                    ax.plot(steps, row, marker="o", markersize=3, linewidth=1.2, label=short(name))
            _gradient_scale(ax.yaxis, ax.set_yscale, matrix)
            ax.set_xlabel("step (end of window)")
            ax.set_ylabel("gradient norm")
            fig.legend(loc="outside right upper", frameon=False, fontsize=8)
            return _svg(fig)
    with _figure(9.5, _height_for(len(names))) as fig:
        ax = fig.add_subplot()
        with np.errstate(divide="ignore", invalid="ignore"):
            logs = np.where(matrix > 0, np.log10(matrix), np.nan)
        cmap = matplotlib.colormaps["viridis"].with_extremes(bad=MISSING)
        image = ax.imshow(logs, aspect="auto", cmap=cmap, interpolation="nearest")
        _layer_axis(ax, names)
        _window_axis(ax, report.windows)
        fig.colorbar(
            image, ax=ax, label="log10 gradient norm (grey: 0 or not measured)", **COLORBAR
        )
        return _svg(fig)


def _gradient_bars(names: Sequence[str], norms: np.ndarray, window: Window) -> str:
    """One window: each layer's gradient norm as a bar (a line of one point says nothing)."""
    shown = [(name, norm) for name, norm in zip(names, norms, strict=True) if np.isfinite(norm)]
    with _figure(9.5, _height_for(len(shown))) as fig:
        ax = fig.add_subplot()
        values = np.array([norm for _, norm in shown])
        ax.barh(range(len(shown)), values, color=ALIVE, height=0.6)
        for row, value in enumerate(values):
            ax.annotate(f" {value:.3g}", (value, row), va="center", fontsize=8)
        _layer_axis(ax, [name for name, _ in shown])
        ax.invert_yaxis()
        _gradient_scale(ax.xaxis, ax.set_xscale, values)
        ax.set_xlabel(f"gradient norm (one window, to step {window.end_step})")
        return _svg(fig)


def _gradient_scale(axis: Any, set_scale: Callable[..., None], values: np.ndarray) -> None:
    """A log scale where norms span over 100x; symlog when some are exactly 0 (dead layers
    stay on the axis), with ticks only at 0 and whole decades so labels never crowd."""
    finite = values[np.isfinite(values)]
    positive = finite[finite > 0]
    if not positive.size or finite.max() <= 100 * positive.min():
        return
    if finite.min() > 0:
        set_scale("log")
        return
    threshold = 10.0 ** math.floor(math.log10(float(positive.min())))
    set_scale("symlog", linthresh=threshold, linscale=0.3)
    decades = range(int(math.log10(threshold)), math.ceil(math.log10(float(finite.max()))) + 1)
    ticks = [0.0, *(10.0**d for d in decades)]
    if len(ticks) > 8:  # many decades: every other one
        ticks = [0.0, *ticks[1::2]]
    axis.set_major_locator(FixedLocator(ticks))
    axis.set_minor_locator(NullLocator())


def _asinh_ticks(low: float, high: float, linear_width: float, per_side: int = 3) -> list[float]:
    """Ticks for an asinh axis from ``low`` to ``high``: 0 and whole decades, none closer to
    0 than 3 linear widths, at most ``per_side`` a side (every other decade, and so on)."""
    ticks = [0.0]
    for sign, end in ((-1.0, -low), (1.0, high)):
        if end <= 3 * linear_width:
            continue
        first = math.ceil(math.log10(3 * linear_width))
        decades = list(range(first, math.floor(math.log10(end)) + 1))
        step = max(1, math.ceil(len(decades) / per_side))
        ticks += [sign * 10.0**d for d in decades[::-1][::step]]
    return sorted(ticks)
