"""Findings: what the rules conclude, in the vocabulary the rest of reludoctor shares."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Severity = Literal["error", "warning", "info"]
#: A symptom of the run, a cause of dead units, or what the monitor could not see (coverage).
Kind = Literal["symptom", "cause", "coverage"]

SEVERITY_ORDER: dict[str, int] = {"error": 0, "warning": 1, "info": 2}
#: Within a severity: what the report cannot vouch for first, then causes, then symptoms.
KIND_ORDER: dict[str, int] = {"coverage": 0, "cause": 1, "symptom": 2}


@dataclass(frozen=True)
class Finding:
    """One conclusion about the run, with the numbers behind it.

    Example:
        >>> f = Finding("symptom", "dead_units", "error", "fc1:relu", "60% dead", {"dead": 3})
        >>> f.to_dict()["code"]
        'dead_units'
    """

    kind: Kind
    code: str
    severity: Severity
    layer: str | None
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)
    #: Codes of :data:`reludoctor.catalogue.remedies.REMEDY_CATALOGUE`, best first.
    remedies: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["remedies"] = list(self.remedies)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Finding:
        return cls(
            kind=data["kind"],
            code=data["code"],
            severity=data["severity"],
            layer=data.get("layer"),
            message=data["message"],
            evidence=dict(data.get("evidence") or {}),
            remedies=tuple(data.get("remedies") or ()),
        )
