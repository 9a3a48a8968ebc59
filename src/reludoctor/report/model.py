"""The Report: plain data that every view (console, JSON, HTML) reads, and nothing else."""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from reludoctor.findings import SEVERITY_ORDER, Finding

#: Version of the JSON layout written by :meth:`Report.save_json`.
SCHEMA_VERSION = 1


#: Activations whose gradient is 0 for every negative pre-activation: only their units can die.
#: Leaky ReLU, PReLU, ELU, SELU, GELU ... still pass a gradient below 0, so a unit of theirs
#: that is never positive is stuck on the negative side, not dead.
ZERO_SLOPE_KINDS = frozenset({"relu", "relu6", "hardtanh"})


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
    #: The first step in which a unit of this layer saw a NaN or +inf pre-activation.
    nonfinite_first_step: int | None = None
    update_ratio: float | None = None
    start_dead_fraction: float | None = None
    start_preact_mean: float | None = None
    start_preact_std: float | None = None
    bias_held_units: list[int] | None = None
    #: Pre-activation histograms on shared bins: ``edges``, ``start`` (first batch) and
    #: ``end`` (last sampled step) counts; see :func:`reludoctor.tracker.preactivation_histogram`.
    preact_histogram: dict[str, Any] | None = None

    @property
    def can_die(self) -> bool:
        """Whether this activation's units get no gradient when never positive."""
        return self.kind in ZERO_SLOPE_KINDS

    @property
    def alive(self) -> int:
        return self.units - self.dead

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


@dataclass
class Report:
    """Everything reludoctor learned about one run or scan.

    Example:
        >>> r = Report(layers=[], windows=[], findings=[], meta={"source": "doctest"})
        >>> r.healthy
        True
    """

    layers: list[LayerReport]
    windows: list[Window]
    findings: list[Finding]
    meta: dict[str, Any] = field(default_factory=dict)
    #: What was read from the model, optimizer and inputs (:class:`reludoctor.facts.ModelFacts`).
    facts: dict[str, Any] = field(default_factory=dict)
    #: Rules that could not decide, and why: ``{"code": ..., "reason": ...}``.
    unjudged: list[dict[str, str]] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        """True when no finding has severity ``error``."""
        return not any(f.severity == "error" for f in self.findings)

    def layer(self, name: str) -> LayerReport:
        """The layer called ``name``; ``KeyError`` listing the known names otherwise."""
        for layer in self.layers:
            if layer.name == name:
                return layer
        known = ", ".join(repr(layer.name) for layer in self.layers) or "none"
        raise KeyError(f"no layer named {name!r} in this report; layers: {known}")

    def mortal_dead_fraction(self) -> float | None:
        """Dead units over all units of the layers whose units can die (None: no such layer)."""
        mortal = [layer for layer in self.layers if layer.can_die]
        units = sum(layer.units for layer in mortal)
        return sum(layer.dead for layer in mortal) / units if units else None

    def worst_layers(self, n: int | None = None) -> list[LayerReport]:
        """Layers by dead fraction, worst first (ties: more dead units first); layers whose
        activation passes a gradient below 0 (their units cannot die) come last."""
        ranked = sorted(
            self.layers,
            key=lambda lay: (not lay.can_die, -lay.dead_fraction, -lay.dead, lay.name),
        )
        return ranked if n is None else ranked[:n]

    @property
    def missing_ranks_note(self) -> str | None:
        """Under ``torch.distributed``, which ranks' counts are missing and since when (None
        when every rank's counts are in)."""
        ranks = self.meta.get("ranks") or {}
        if ranks.get("missing_since_step") is None:
            return None
        missing = ", ".join(map(str, ranks.get("missing") or [])) or "unknown"
        return (
            f"the counts of rank(s) {missing} of {ranks.get('world_size', '?')} are missing "
            f"from step {ranks['missing_since_step']} on: the windows from then count rank "
            f"{ranks.get('rank', '?')}'s samples only"
        )

    def sorted_findings(self) -> list[Finding]:
        """Errors first; within a severity, causes before symptoms."""
        return sorted(
            self.findings,
            key=lambda f: (SEVERITY_ORDER[f.severity], f.kind != "cause", f.layer or ""),
        )

    def causes(self) -> list[Finding]:
        """The findings that name a cause."""
        return [f for f in self.findings if f.kind == "cause"]

    def remedies(self) -> list[str]:
        """Remedy codes in the order the diagnosis ranks them for this run."""
        ranked: list[str] = []
        for finding in self.sorted_findings():
            ranked += [r for r in finding.remedies if r not in ranked]
        return ranked

    def to_dict(self) -> dict[str, Any]:
        """Plain data; NaN and infinities (JSON has none) become None."""
        return _finite_only(
            {
                "schema_version": SCHEMA_VERSION,
                "meta": dict(self.meta),
                "healthy": self.healthy,
                "layers": [asdict(layer) for layer in self.layers],
                "windows": [
                    {**asdict(w), "layers": [asdict(wl) for wl in w.layers]} for w in self.windows
                ],
                "findings": [f.to_dict() for f in self.findings],
                "facts": dict(self.facts),
                "unjudged": [dict(u) for u in self.unjudged],
            }
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        """Rebuild a report from :meth:`to_dict` output; ``ValueError`` when it is not one."""
        if not isinstance(data, dict) or "schema_version" not in data:
            raise ValueError("not a reludoctor report: the 'schema_version' field is missing")
        version = data["schema_version"]
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise ValueError(
                f"this report has schema version {version!r}, newer than the {SCHEMA_VERSION} "
                "this reludoctor reads; upgrade reludoctor to read it"
            )
        try:
            return cls(
                layers=[LayerReport(**layer) for layer in data["layers"]],
                windows=[
                    Window(**{**w, "layers": [WindowLayer(**wl) for wl in w["layers"]]})
                    for w in data["windows"]
                ],
                findings=[Finding.from_dict(f) for f in data["findings"]],
                meta=dict(data.get("meta") or {}),
                facts=dict(data.get("facts") or {}),
                unjudged=[dict(u) for u in data.get("unjudged") or []],
            )
        except (KeyError, TypeError) as error:
            raise ValueError(f"corrupt reludoctor report: {error}") from error

    def to_json(self, indent: int | None = 2) -> str:
        """JSON text; NaN and infinities (JSON has none) are written as null."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False, default=_json_default)

    def save_json(self, path: str | os.PathLike[str]) -> Path:
        """Write the report as JSON, atomically (a temporary file renamed into place)."""
        return atomic_write_text(path, self.to_json())

    def save_html(self, path: str | os.PathLike[str]) -> Path:
        """Write the self-contained HTML report (plots inline, nothing fetched), atomically.

        Example: ``doc.report().save_html("report.html")``; see :mod:`reludoctor.report.html`.
        """
        from reludoctor.report.html import save_html

        return save_html(self, path)

    @classmethod
    def load_json(cls, path: str | os.PathLike[str]) -> Report:
        """Read a report written by :meth:`save_json`."""
        text = Path(path).read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from error
        return cls.from_dict(data)


def _finite_only(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_only(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_only(v) for v in value]
    return value


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same directory.

    A failure leaves any previous file untouched and no partial file behind.
    """
    target = Path(path)
    directory = target.parent
    if not directory.is_dir():
        raise FileNotFoundError(
            f"cannot write {target}: the directory {directory} does not exist; create it first"
        )
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    try:
        os.chmod(tmp_name, 0o666 & ~_umask())  # mkstemp's 0600 is for secrets, not reports
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return target
