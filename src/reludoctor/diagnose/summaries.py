"""What was counted, summarised: one activation layer over the whole run
(:class:`LayerReport`) and every layer over one window of steps (:class:`Window`)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal

import numpy as np

from reludoctor.catalogue import activations

#: Marks a field kept in memory but not written to the JSON report.
TRANSIENT = {"transient": True}


@dataclass
class LayerReport:
    """One observed activation call site, summarised over the report's final span.

    ``dead_units`` are the units whose pre-activation never exceeded 0 for any sample seen.
    Per-unit arrays (``fire_rate``, ``dormancy``, ``max_preactivation``) are ``None`` when
    they were not measured (no sampled step) or the layer is wider than the report's
    per-unit limit.
    """

    name: str
    kind: str
    via: str
    units: int
    dead: int
    dead_fraction: float
    dead_units: list[int]
    samples: int
    source: str | None = None
    producer: str | None = None
    unit_dim: int = -1
    dormant_units: list[int] = field(default_factory=list)
    fire_rate: list[float] | None = None
    dormancy: list[float] | None = None
    max_preactivation: list[float] | None = None
    grad_norm: float | None = None
    zero_grad_units: list[int] | None = None
    nonfinite_units: int = 0
    #: Samples (rows of the batches) that reached the layer; ``samples`` counts the values
    #: each unit saw, which is more where a sample holds several positions (conv, sequences).
    inputs: int | None = None
    #: The first step in which a unit of this layer saw a NaN or +inf pre-activation.
    nonfinite_first_step: int | None = None
    update_ratio: float | None = None
    start_dead_fraction: float | None = None
    start_preact_mean: float | None = None
    start_preact_std: float | None = None
    #: Dead units held below 0 by a negative shift added last to their input; what sets it
    #: ("bias": a Linear/Conv bias, "norm_shift": a normalisation layer's beta,
    #: "running_stats": batch norm's running statistics in eval) and its mean over them.
    bias_held_units: list[int] | None = None
    held_by: Literal["bias", "norm_shift", "running_stats"] | None = None
    held_shift_mean: float | None = None
    #: Pre-activation histograms on shared bins: ``edges``, ``start`` (first batch) and
    #: ``end`` (last sampled step) counts; see
    #: :func:`reludoctor.diagnose.summarize.preactivation_histogram`.
    preact_histogram: dict[str, Any] | None = None

    @property
    def can_die(self) -> bool:
        """Whether this activation's units get no gradient when never positive (see
        :mod:`reludoctor.catalogue.activations`)."""
        return activations.can_die(self.kind)

    @property
    def alive(self) -> int:
        return self.units - self.dead

    @property
    def dormant(self) -> int:
        """Dormant units (ReDo's definition, mean |output| at most tau of the layer's mean),
        dead ones included: the count every view shows."""
        return len(set(self.dormant_units) | set(self.dead_units))

    @property
    def mean_fire_rate(self) -> float | None:
        if not self.fire_rate:
            return None
        return sum(self.fire_rate) / len(self.fire_rate)


@dataclass
class WindowLayer:
    """One layer's numbers in one window of steps (a row of the history)."""

    name: str
    units: int
    dead: int
    dead_fraction: float
    samples: int
    mean_fire_rate: float | None = None
    dormant: int | None = None
    grad_norm: float | None = None
    zero_grad_units: int | None = None
    nonfinite_units: int = 0
    update_ratio: float | None = None
    #: The activation's kind (``"relu"``...), as in :class:`LayerReport` (None in reports
    #: written before windows carried it).
    kind: str | None = None
    #: The values the window's histograms are drawn from (kept in memory for the views that
    #: log each window, not in the JSON report): pre-activations of the window's last sampled
    #: step, and each unit's gradient norm; None where not measured.
    preactivation_values: np.ndarray | None = field(
        default=None, repr=False, compare=False, metadata=TRANSIENT
    )
    unit_gradients: np.ndarray | None = field(
        default=None, repr=False, compare=False, metadata=TRANSIENT
    )


def kept_fields(record: Any) -> dict[str, Any]:
    """A summary's fields as plain data, without those kept in memory only.

    Example:
        >>> kept_fields(WindowLayer("fc", 4, 1, 0.25, 32, kind="relu"))["kind"]
        'relu'
        >>> "preactivation_values" in kept_fields(WindowLayer("fc", 4, 1, 0.25, 32))
        False
    """
    return {
        f.name: getattr(record, f.name) for f in fields(record) if not f.metadata.get("transient")
    }


@dataclass
class Window:
    """A span of training steps; ``complete`` is False for the window still open."""

    index: int
    start_step: int
    end_step: int
    complete: bool
    layers: list[WindowLayer]
    loss_mean: float | None = None
    loss_last: float | None = None
    loss_max: float | None = None
    loss_min: float | None = None
    loss_curve: list[float] = field(default_factory=list)
    loss_nonfinite: bool = False
    output_spread: float | None = None
    learning_rate: float | None = None

    @property
    def steps(self) -> int:
        return self.end_step - self.start_step
