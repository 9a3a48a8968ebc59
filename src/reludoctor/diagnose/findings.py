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
    "reset_norm_shift": (
        "set the normalisation layers' shift (beta) back to 0, or re-estimate batch norm's "
        "running statistics"
    ),
}

#: The code change each remedy asks for (``reludoctor.fix.remedies`` where it can act in place).
REMEDY_CODE: dict[str, str] = {
    "kaiming_init": (
        "from reludoctor.fix.remedies import kaiming_init\n"
        "kaiming_init(model)  # nn.init.kaiming_normal_(w, nonlinearity='relu'), zero biases"
    ),
    "leaky_relu": (
        "from reludoctor.fix.remedies import swap_activation\n"
        "swap_activation(model, 'leaky_relu', negative_slope=0.01)  # nn.ReLU -> nn.LeakyReLU"
    ),
    "prelu": "from reludoctor.fix.remedies import swap_activation\nswap_activation(model, 'prelu')",
    "elu": "from reludoctor.fix.remedies import swap_activation\nswap_activation(model, 'elu')",
    "selu": (
        "from reludoctor.fix.remedies import swap_activation\n"
        "swap_activation(model, 'selu')  # also lecun_normal weights, Dropout -> AlphaDropout"
    ),
    "batch_norm": (
        "from reludoctor.fix.remedies import add_batch_norm\n"
        "add_batch_norm(model, optimizer)  # Linear -> BatchNorm1d -> ReLU (nn.Sequential)"
    ),
    "lower_learning_rate": (
        "from reludoctor.fix.remedies import lower_learning_rate\n"
        "lower_learning_rate(optimizer, factor=10)"
    ),
    "adaptive_optimizer": "optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)",
    "normalize_inputs": (
        "mean, std = x_train.mean(0), x_train.std(0) + 1e-8  # training-set statistics\n"
        "x = (x - mean) / std  # for every split"
    ),
    "skip_connections": "def forward(self, x):\n    return x + self.block(x)  # a residual block",
    "revive_units": (
        "from reludoctor.fix.revive import revive_units\n"
        "revive_units(model, doc, optimizer)  # or rd.watch(..., revive=True)"
    ),
    "reset_norm_shift": (
        "from reludoctor.fix.remedies import reset_norm_shift\n"
        "reset_norm_shift(model)  # BatchNorm/GroupNorm/LayerNorm bias -> 0 before a ReLU"
    ),
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
