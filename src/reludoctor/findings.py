"""Findings: what the rules conclude, in the vocabulary the rest of reludoctor shares."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Severity = Literal["error", "warning", "info"]
Kind = Literal["symptom", "cause"]

SEVERITY_ORDER: dict[str, int] = {"error": 0, "warning": 1, "info": 2}

#: Remedy codes, in the order a user would usually try them.
REMEDIES: dict[str, str] = {
    "kaiming_init": "re-initialise ReLU layers with He (Kaiming) initialisation",
    "leaky_relu": "use LeakyReLU so negative pre-activations still pass a gradient",
    "prelu": "use PReLU (a learned negative slope)",
    "elu": "use ELU",
    "selu": "use SELU with lecun_normal initialisation and AlphaDropout",
    "batch_norm": "add batch normalisation before the activation",
    "lower_learning_rate": "lower the learning rate",
    "adaptive_optimizer": "use an adaptive optimiser (Adam, RMSprop)",
    "normalize_inputs": "centre and scale the inputs",
    "skip_connections": "add skip (residual) connections",
    "revive_units": "re-initialise the dead units in place (ReDo-style recycling)",
}


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
