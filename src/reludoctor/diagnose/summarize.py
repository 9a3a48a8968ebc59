"""Summaries of what the tracker counted: each window's numbers per layer
(:class:`~reludoctor.diagnose.summaries.Window`) and each layer's over the run
(:class:`~reludoctor.diagnose.summaries.LayerReport`): dead, dormant and held units, rates,
gradient norms and histograms. The tracker hands its counts over; this module judges them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from reludoctor.diagnose.summaries import LayerReport, Window, WindowLayer
from reludoctor.probe.counters import Snapshot, merge
from reludoctor.probe.probes import Site, norm_shift
from reludoctor.probe.tracker import LayerState, WindowCounts

#: ReDo (Sokar et al. 2023) calls a unit dormant when its mean |activation| divided by its
#: layer's mean is at most tau; 0.025 is the value the paper uses for its Atari agents.
DORMANCY_THRESHOLD = 0.025
#: Layers wider than this keep summaries but no per-unit lists in the report.
UNIT_DETAIL_LIMIT = 65_536
#: Bins of the report's pre-activation histograms.
HISTOGRAM_BINS = 40
#: A histogram whose span exceeds this many times its values' median size gets asinh bins.
WIDE_RANGE = 50.0


class Summarizer:
    """Turns counts into summaries: ``tracker.summarize`` is its :meth:`window`.

    Example:
        >>> from reludoctor.probe.tracker import Tracker
        >>> summarizer = Summarizer()
        >>> tracker = Tracker(window=10, sample_every=1, summarize=summarizer.window)
        >>> summarizer.layer_reports(tracker.layers, [])
        []
    """

    def __init__(
        self,
        dormancy_threshold: float = DORMANCY_THRESHOLD,
        unit_detail_limit: int = UNIT_DETAIL_LIMIT,
    ) -> None:
        self.dormancy_threshold = dormancy_threshold
        self.unit_detail_limit = unit_detail_limit

    def settings(self) -> dict[str, Any]:
        """What the report's ``meta`` keeps of how units were judged."""
        return {"dormancy_threshold": self.dormancy_threshold}

    def window(self, counts: WindowCounts) -> Window:
        """A window's summary from its counts."""
        return Window(
            index=counts.index,
            start_step=counts.start_step,
            end_step=counts.end_step,
            complete=counts.complete,
            layers=[self.window_layer(layer, snap) for layer, snap in counts.layers],
            output_spread=counts.output_spread,
            learning_rate=counts.learning_rate,
            **counts.loss,
        )

    def window_layer(self, layer: LayerState, snap: Snapshot) -> WindowLayer:
        """One layer's numbers over a window, with the values its histograms are drawn from."""
        stats = _unit_stats(snap, self.dormancy_threshold)
        return WindowLayer(
            name=layer.site.name,
            units=layer.units,
            dead=int(stats["dead"].sum()),
            dead_fraction=float(stats["dead"].mean()) if layer.units else 0.0,
            samples=int(snap["positions"]),
            mean_fire_rate=_mean(stats["fire_rate"]),
            dormant=None if stats["dormant"] is None else int(stats["dormant"].sum()),
            grad_norm=stats["grad_norm"],
            zero_grad_units=None if stats["zero_grad"] is None else int(stats["zero_grad"].sum()),
            nonfinite_units=int(stats["nonfinite"].sum()),
            update_ratio=stats["update_ratio"],
            kind=layer.site.kind,
            preactivation_values=snap["values"],
            unit_gradients=_unit_gradients(snap),
        )

    def layer_reports(
        self, layers: list[LayerState], open_snapshots: list[Snapshot]
    ) -> list[LayerReport]:
        """Per-layer summary over the last closed window merged with the open one."""
        reports = []
        for layer, open_snap in zip(layers, open_snapshots, strict=True):
            snap = merge(layer.last, open_snap if open_snap["positions"] else None) or open_snap
            stats = _unit_stats(snap, self.dormancy_threshold)
            detail = layer.units <= self.unit_detail_limit
            dead_units = np.flatnonzero(stats["dead"]).tolist()
            zero_grad = stats["zero_grad"]
            site = layer.site
            held, held_by, shift_mean = _bias_held(site, snap["max_pre"], stats["dead"])
            reports.append(
                LayerReport(
                    name=site.name,
                    kind=site.kind,
                    via=site.via,
                    units=layer.units,
                    dead=len(dead_units),
                    dead_fraction=len(dead_units) / layer.units,
                    dead_units=dead_units,
                    samples=int(snap["positions"]),
                    inputs=int(snap["rows"]),
                    source=site.source,
                    producer=site.producer,
                    unit_dim=layer.unit_dim,
                    dormant_units=[]
                    if stats["dormant"] is None
                    else np.flatnonzero(stats["dormant"]).tolist(),
                    fire_rate=_listed(stats["fire_rate"], detail),
                    dormancy=_listed(stats["dormancy"], detail),
                    max_preactivation=_listed(snap["max_pre"], detail and bool(snap["positions"])),
                    grad_norm=stats["grad_norm"],
                    zero_grad_units=None
                    if zero_grad is None
                    else np.flatnonzero(zero_grad).tolist(),
                    nonfinite_units=int(stats["nonfinite"].sum()),
                    nonfinite_first_step=_step(snap["nonfinite_first"]),
                    update_ratio=stats["update_ratio"],
                    start_dead_fraction=layer.start["dead_fraction"],
                    start_preact_mean=_finite(layer.start["preact_mean"]),
                    start_preact_std=_finite(layer.start["preact_std"]),
                    bias_held_units=held,
                    held_by=held_by,
                    held_shift_mean=shift_mean,
                    preact_histogram=preactivation_histogram(layer.start_values, snap["values"]),
                )
            )
        return reports


def _unit_stats(snap: Snapshot, dormancy_threshold: float) -> dict[str, Any]:
    """Per-unit arrays derived from one snapshot."""
    max_pre = snap["max_pre"]
    seen = snap["positions"] > 0
    # A unit with no finite value (its maximum is -inf) is not known to be dead.
    dead = (max_pre <= 0) & np.isfinite(max_pre) if seen else np.zeros(max_pre.shape, bool)
    sampled = snap["sampled_positions"]
    fire_rate = dormancy = dormant = None
    if sampled:
        fire_rate = snap["fire_count"] / sampled
        mean_abs = snap["abs_sum"].astype(np.float64) / sampled
        finite = mean_abs[np.isfinite(mean_abs)]
        layer_mean = float(finite.mean()) if finite.size else 0.0
        if layer_mean > 0 and math.isfinite(layer_mean):
            dormancy = mean_abs / layer_mean
        else:
            dormancy = np.zeros_like(mean_abs)
        dormant = dormancy <= dormancy_threshold
    update_ratio = _finite(float(snap["update_ratio"])) if snap["update_samples"] else None
    grad_norm = zero_grad = None
    if snap["grad_samples"]:
        total_sq = float(snap["grad_sq"]) + float(snap["grad_row_sq"].sum(dtype=np.float64))
        grad_norm = _finite(math.sqrt(max(total_sq, 0.0) / snap["grad_samples"]))
        if snap["grad_row_samples"]:
            zero_grad = snap["grad_row_max"] == 0
    nonfinite = snap["nonfinite"] > 0
    return {
        "nonfinite": nonfinite,
        "dead": dead,
        "fire_rate": fire_rate,
        "dormancy": dormancy,
        "dormant": dormant,
        "grad_norm": grad_norm,
        "zero_grad": zero_grad,
        "update_ratio": update_ratio,
    }


def _unit_gradients(snap: Snapshot) -> np.ndarray | None:
    """Each unit's gradient norm (root mean square over the sampled steps), if measured."""
    if not snap["grad_row_samples"]:
        return None
    return np.sqrt(snap["grad_row_sq"] / snap["grad_row_samples"])


def preactivation_histogram(
    start: np.ndarray | None, end: np.ndarray | None, bins: int = HISTOGRAM_BINS
) -> dict[str, Any] | None:
    """Histograms of the first batch's pre-activations and the last sampled step's, on shared
    bins spanning 0 and the middle 99% of both (values beyond go to the outer bins).

    When that span is over ``WIDE_RANGE`` times the values' typical size (a run whose
    pre-activations blew up), the bins are even in asinh(x / typical size) instead, so the
    shape near 0 and the far tail both show; ``scale`` says which (with its ``linear_width``).
    """
    samples = [v[np.isfinite(v)] for v in (start, end) if v is not None]
    samples = [v for v in samples if v.size]
    if not samples:
        return None
    both = np.concatenate(samples)
    lo, hi = np.quantile(both, [0.005, 0.995])
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if hi - lo <= 0:
        lo, hi = -1.0, 1.0
    typical = float(np.median(np.abs(both)))
    scale: dict[str, Any] = {"scale": "linear"}
    if typical > 0 and hi - lo > WIDE_RANGE * typical:
        ends = np.arcsinh(np.array([lo, hi]) / typical)
        edges = np.sinh(np.linspace(ends[0], ends[1], bins + 1)) * typical
        scale = {"scale": "asinh", "linear_width": float(f"{typical:.6g}")}
    else:
        edges = np.linspace(lo, hi, bins + 1)

    def counts(values: np.ndarray | None) -> list[int] | None:
        if values is None:
            return None
        finite = np.clip(values[np.isfinite(values)], lo, hi)
        return np.histogram(finite, edges)[0].tolist()

    return {
        "edges": [float(f"{e:.6g}") for e in edges],
        "start": counts(start),
        "end": counts(end),
        **scale,
    }


def _bias_held(
    site: Site, max_pre: np.ndarray, dead: np.ndarray
) -> tuple[list[int] | None, str | None, float | None]:
    """Dead units held below 0 by a negative shift added last to their input, what sets it
    (``"bias"``, ``"norm_shift"``, ``"running_stats"``) and its mean over them.

    Without the shift ``b`` their input term reached above 0 (the pre-activation's maximum
    minus ``b`` is the largest value of the rest). A Linear/Conv bias counts when it lies
    beyond the range a default initialisation draws from, -1/sqrt(fan_in); a normalisation
    layer's shift (default 0) when it is negative.
    """
    bias, weight = site.bias, site.weight
    beta = None
    if bias is not None and weight is not None and bias.shape == max_pre.shape:
        b = bias.detach().float().cpu().numpy()
        fan_in = weight[0].numel()
        floor, source = -1.0 / math.sqrt(max(fan_in, 1)), "bias"
    else:
        shift = norm_shift(site)
        if shift is None or shift[0].shape != max_pre.shape:
            return None, None, None
        b, beta = (part.cpu().numpy() for part in shift)
        floor, source = 0.0, "norm_shift"
    with np.errstate(invalid="ignore"):  # NaN maxima are not held by anything
        held = dead & (b < floor) & (max_pre - b > 0)
    units = np.flatnonzero(held)
    if not units.size:
        return [], source, None
    mean = float(b[units].mean())
    if beta is not None and not float(beta[units].mean()) <= 0.5 * mean:
        source = "running_stats"  # beta explains less than half of the shift
    return units.tolist(), source, mean


def _step(value: Any) -> int | None:
    """A step kept in a float counter (inf: none)."""
    value = float(value)
    return int(value) if math.isfinite(value) else None


def _finite(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def _mean(values: np.ndarray | None) -> float | None:
    """Mean of the finite values (a unit that saw NaN has no fire rate)."""
    if values is None:
        return None
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else None


def _listed(values: np.ndarray | None, keep: bool) -> list[float | None] | None:
    if values is None or not keep:
        return None
    listed: list[float | None] = np.round(values.astype(np.float64), 6).tolist()
    finite = np.isfinite(values)
    if not finite.all():  # JSON has no NaN or infinity
        for index in np.flatnonzero(~finite).tolist():
            listed[index] = None
    return listed
