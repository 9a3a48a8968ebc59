"""The Report: plain data that every view (console, JSON, HTML) reads, and nothing else."""

from __future__ import annotations

import functools
import json
import math
import os
import re
import types
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, TypedDict, Union, get_args, get_origin, get_type_hints

from reludoctor.diagnose.findings import KIND_ORDER, SEVERITY_ORDER, Finding
from reludoctor.diagnose.summaries import LayerReport, Window, kept_fields
from reludoctor.diagnose.thresholds import Thresholds
from reludoctor.errors import InputError
from reludoctor.files import atomic_write_text
from reludoctor.text import printable, short_number

#: Version of the JSON layout written by :meth:`Report.save_json`.
SCHEMA_VERSION = 1


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
    #: What was read from the model, optimizer and inputs
    #: (:class:`reludoctor.diagnose.facts.ModelFacts`).
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

    @property
    def dead_error_fraction(self) -> float:
        """The dead fraction from which a layer is an error (``Thresholds.dead_error_fraction``
        of the run that made the report): the views colour layers by it."""
        value = self.meta.get("dead_error_fraction")
        return Thresholds.dead_error_fraction if value is None else value

    def autopilot_lines(self) -> list[str]:
        """What ``rd.watch(repair=True)`` did, one sentence per action: when, what, why, and
        the loss of the window before it and of the window after it (empty without it).

        Example:
            >>> r = Report([], [], [], meta={"autopilot": [{"action": "revive", "step": 50,
            ...     "evidence": "outputs identical", "loss_before": 0.72,
            ...     "loss_after": 0.7, "verdict": "kept"}]})
            >>> r.autopilot_lines()
            ['step 50: revive (outputs identical): loss 0.72 -> 0.7, kept']
        """
        lines = []
        for action in self.meta.get("autopilot") or []:
            head = f"step {action.get('step', '?')}: {action.get('action', '?')}"
            why = f" ({action['evidence']})" if action.get("evidence") else ""
            if "skipped" in action:
                lines.append(f"{head} skipped: {action['skipped']}")
                continue
            if "verdict" not in action:
                lines.append(f"{head}{why}, judged next window")
                continue
            before, after = action.get("loss_before"), action.get("loss_after")
            loss = f"loss {short_number(before)} -> {short_number(after)}"
            lines.append(f"{head}{why}: {loss}, {action['verdict']}")
        return [printable(line) for line in lines]

    def mortal_dead_fraction(self) -> float | None:
        """Dead units over all units of the layers whose units can die (None: no such layer;
        which kinds can die: :mod:`reludoctor.catalogue.activations`)."""
        can_die = [layer for layer in self.layers if layer.can_die]
        units = sum(layer.units for layer in can_die)
        return sum(layer.dead for layer in can_die) / units if units else None

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
        """Errors first; within a severity, what could not be watched, then causes, then
        symptoms."""
        return sorted(
            self.findings,
            key=lambda f: (SEVERITY_ORDER[f.severity], KIND_ORDER[f.kind], f.layer or ""),
        )

    def error_codes(self) -> list[str]:
        """The codes of the findings at error level, worst first, each once."""
        return list(dict.fromkeys(f.code for f in self.sorted_findings() if f.severity == "error"))

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
                    {**kept_fields(w), "layers": [kept_fields(wl) for wl in w.layers]}
                    for w in self.windows
                ],
                "findings": [f.to_dict() for f in self.findings],
                "facts": dict(self.facts),
                "unjudged": [dict(u) for u in self.unjudged],
            }
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        """Rebuild a report from :meth:`to_dict` output, checking every field's type;
        :class:`InputError` naming the first wrong field when it is not one."""
        if not isinstance(data, dict) or "schema_version" not in data:
            raise InputError("not a reludoctor report: the 'schema_version' field is missing")
        _check_version(data["schema_version"])
        for key, item in data.items():
            _check_tree(item, printable(key)[:40], 1)
        for key in ("layers", "windows", "findings"):
            if key not in data:
                raise InputError(f"{CORRUPT}: the {key!r} field is missing; {REWRITE}")
        layers = _value(data["layers"], list[LayerReport], "layers")
        for index, layer in enumerate(layers):
            _check_layer(layer, f"layers[{index}]")
        meta = _value(data.get("meta", {}), dict[str, Any], "meta")
        for key, hint in META_TYPES.items():
            if key in meta:
                meta[key] = _value(meta[key], hint, f"meta.{key}")
        return cls(
            layers=layers,
            windows=_value(data["windows"], list[Window], "windows"),
            findings=_value(data["findings"], list[Finding], "findings"),
            meta=meta,
            facts=_value(data.get("facts", {}), dict[str, Any], "facts"),
            unjudged=_value(data.get("unjudged", []), list[dict[str, str]], "unjudged"),
        )

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
        except RecursionError:
            raise InputError(
                f"{path} is not a reludoctor report: its JSON is nested deeper than Python "
                "reads; pass the report.json that reludoctor wrote"
            ) from None
        except ValueError as error:  # JSONDecodeError, or a number too long to read
            raise InputError(f"{path} is not valid JSON: {error}") from error
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


# -- reading a report back: every field checked ---------------------------------------------
CORRUPT = "corrupt reludoctor report"
REWRITE = "pass a report.json that reludoctor wrote"
#: A report nests 6 levels deep; deeper input is refused before any view recurses into it.
MAX_DEPTH = 32
#: Whole numbers in a report fit in 64 bits (and convert to floats for the plots).
INT_LIMIT = 2**63
_SURROGATE = re.compile("[\ud800-\udfff]")


class _Ranks(TypedDict, total=False):
    world_size: int
    rank: int
    missing: list[int]
    missing_since_step: int | None


class _Histogram(TypedDict, total=False):
    edges: list[float]
    start: list[float] | None
    end: list[float] | None
    scale: Literal["linear", "asinh"]
    linear_width: float


#: The meta fields that the views read, and their types (other meta fields are free).
META_TYPES: dict[str, Any] = {
    "model": str,
    "created": str,
    "steps": int,
    "window": int,
    "sample_every": int,
    "dormancy_threshold": float,
    "dead_error_fraction": float,
    "autopilot": list[dict[str, Any]],
    "ranks": _Ranks,
}


def _check_version(version: object) -> None:
    """Refuse a schema version other than :data:`SCHEMA_VERSION`, compared as numbers."""
    number: float | None = None
    if isinstance(version, str) and re.fullmatch(r"\d{1,9}(\.\d{1,9})?", version.strip()):
        number = float(version)
    elif isinstance(version, (int, float)) and not isinstance(version, bool):
        number = float(version) if abs(version) < INT_LIMIT else None  # not NaN or inf
    if number is None:
        raise InputError(
            "not a reludoctor report: its schema_version should be a number, not "
            f"{_described(version)}; {REWRITE}"
        )
    if number > SCHEMA_VERSION:
        raise InputError(
            f"this report has schema version {printable(version)}, newer than the "
            f"{SCHEMA_VERSION} this reludoctor reads; upgrade reludoctor to read it"
        )
    if number < SCHEMA_VERSION:
        raise InputError(
            f"this report has schema version {printable(version)}, older than the "
            f"{SCHEMA_VERSION} this reludoctor reads; make the report again with this "
            "reludoctor"
        )


def _check_tree(value: Any, where: str, depth: int) -> None:
    """Refuse nesting deeper than :data:`MAX_DEPTH` and text that is not valid Unicode."""
    if depth > MAX_DEPTH:
        raise InputError(f"{CORRUPT}: {where} is nested more than {MAX_DEPTH} levels; {REWRITE}")
    if isinstance(value, str):
        if _SURROGATE.search(value):
            raise InputError(f"{CORRUPT}: {where} is not valid Unicode text; {REWRITE}")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_tree(key, where, depth + 1)
            _check_tree(item, f"{where}.{printable(key)[:40]}", depth + 1)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_tree(item, f"{where}[{index}]", depth + 1)


def _described(value: object) -> str:
    """``value`` as a reader of a message would want it named (JSON's words)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        shown = printable(value[:40]) + ("..." if len(value) > 40 else "")
        return f"the string {shown!r}"
    if isinstance(value, int):
        return f"the number {value}" if abs(value) < 10**15 else "a number that large"
    if isinstance(value, float):
        return f"the number {value:g}"
    return "a list" if isinstance(value, list) else "an object"


#: A JSON value of each type, in words: one of them, and several.
_NAMES: dict[Any, tuple[str, str]] = {
    int: ("a whole number", "whole numbers"),
    float: ("a number", "numbers"),
    str: ("a string", "strings"),
    bool: ("true or false", "true or false values"),
    type(None): ("null", "nulls"),
}


def _expected(hint: Any) -> str:
    """What a field of type ``hint`` should hold, in JSON's words."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_expected(arg) for arg in get_args(hint))
    if origin is Literal:
        return "one of " + ", ".join(repr(arg) for arg in get_args(hint))
    if origin in (list, tuple):
        return f"a list of {_NAMES.get(get_args(hint)[0], ('', 'objects'))[1]}"
    return _NAMES.get(hint, ("an object", ""))[0]


def _wrong(value: object, hint: Any, where: str) -> InputError:
    return InputError(
        f"{CORRUPT}: {where} should be {_expected(hint)}, not {_described(value)}; {REWRITE}"
    )


def _value(value: Any, hint: Any, where: str) -> Any:
    """``value`` read as type ``hint`` (dataclasses and TypedDicts built from objects; a JSON
    null in a number field is the NaN it was written for); :class:`InputError` otherwise."""
    origin = get_origin(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(hint)
        if value is None and type(None) in options:
            return None
        (inner,) = [arg for arg in options if arg is not type(None)]
        try:
            return _value(value, inner, where)
        except InputError:
            if isinstance(value, (list, dict)):
                raise  # the error names the wrong item inside
            raise _wrong(value, hint, where) from None
    if origin is Literal:
        if isinstance(value, str) and value in get_args(hint):
            return value
    elif origin in (list, tuple):
        if isinstance(value, list):
            items = [_value(v, get_args(hint)[0], f"{where}[{i}]") for i, v in enumerate(value)]
            return tuple(items) if origin is tuple else items
    elif origin is dict:
        if isinstance(value, dict):
            inner = get_args(hint)[1]
            return {k: _value(v, inner, f"{where}.{printable(k)[:40]}") for k, v in value.items()}
    elif is_dataclass(hint) or hasattr(hint, "__required_keys__"):
        if isinstance(value, dict):
            return _record(value, hint, where)
    elif hint is float:
        if value is None:
            return math.nan
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) < INT_LIMIT:
            return value
    elif isinstance(value, hint):
        return value
    raise _wrong(value, hint, where)


@functools.cache
def _fields(cls: type) -> tuple[dict[str, Any], frozenset[str]]:
    """A dataclass's or TypedDict's field types and the names it cannot do without."""
    hints = get_type_hints(cls)
    if not is_dataclass(cls):
        return hints, frozenset()
    required = {
        f.name
        for f in fields(cls)
        if f.default is MISSING and f.default_factory is MISSING
        and type(None) not in get_args(hints[f.name])
    }  # fmt: skip
    kept = [f for f in fields(cls) if not f.metadata.get("transient")]
    return {f.name: hints[f.name] for f in kept}, frozenset(required)


def _record(data: dict[str, Any], cls: type, where: str) -> Any:
    """An instance of the dataclass ``cls`` (or a checked dict for a TypedDict) from ``data``."""
    hints, required = _fields(cls)
    missing = sorted(required - data.keys())
    if missing:
        raise InputError(f"{CORRUPT}: {where} has no {missing[0]!r} field; {REWRITE}")
    checked = {k: _value(v, hints[k], f"{where}.{k}") for k, v in data.items() if k in hints}
    if not is_dataclass(cls):
        return {**data, **checked}  # a dict: its other keys are free
    unknown = sorted(data.keys() - hints.keys())
    if unknown:
        name = printable(unknown[0])[:40]
        raise InputError(f"{CORRUPT}: {where} has an unknown field {name!r}; {REWRITE}")
    return cls(**checked)


def _check_layer(layer: LayerReport, where: str) -> None:
    """The numbers of a layer that the views index or divide by are in range."""
    if layer.units < 0 or not 0 <= layer.dead <= layer.units:
        raise InputError(
            f"{CORRUPT}: {where} has {layer.dead} dead of {layer.units} units; {REWRITE}"
        )
    for name in ("dead_units", "dormant_units"):
        units = getattr(layer, name)
        if any(not 0 <= unit < layer.units for unit in units):
            raise InputError(
                f"{CORRUPT}: {where}.{name} should hold unit numbers from 0 to "
                f"{layer.units - 1}; {REWRITE}"
            )
    if layer.preact_histogram is not None:
        histogram = _value(layer.preact_histogram, _Histogram, f"{where}.preact_histogram")
        edges = histogram.get("edges")
        bins = [histogram.get("start"), histogram.get("end")]
        if edges is None or any(c is not None and len(c) != len(edges) - 1 for c in bins):
            raise InputError(
                f"{CORRUPT}: {where}.preact_histogram should have edges and one count fewer "
                f"than edges for start and end; {REWRITE}"
            )
        if histogram.get("scale") == "asinh" and not histogram.get("linear_width", 0) > 0:
            raise InputError(
                f"{CORRUPT}: {where}.preact_histogram.linear_width should be a number above "
                f"0; {REWRITE}"
            )
        layer.preact_histogram = histogram
