"""The remedy catalogue: one declaration per remedy, and which remedies answer which finding.

This is the bottom layer: plain data, importing nothing from reludoctor (and no torch). The
findings, the rules, ``rd.treat`` and the report views all read it; the tables at the end are
computed from :data:`REMEDY_CATALOGUE`, never written by hand.

Example:
    >>> REMEDY_CATALOGUE["leaky_relu"].swap_to
    'leaky_relu'
    >>> CAUSE_REMEDIES["zero_init"]
    ('kaiming_init', 'revive_units')
    >>> rankings = [*CAUSE_REMEDIES.values(), *SYMPTOM_REMEDIES.values()]
    >>> {code for ranking in rankings for code in ranking} <= set(REMEDY_CATALOGUE)
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Remedy:
    """One remedy: what it is, the code change it asks for, and how reludoctor may use it.

    Example:
        >>> r = Remedy("elu", "use ELU", "swap_activation(model, 'elu')", swap_to="elu")
        >>> r.treatable, r.variants
        (False, ({},))
    """

    #: The stable code findings and reports name it by.
    code: str
    #: One line for the user.
    description: str
    #: The code change it asks for (a snippet the HTML report shows).
    code_change: str
    #: ``rd.treat`` can try it in place on a copy of the model and optimizer.
    treatable: bool = False
    #: The option sets ``rd.treat`` tries, one trial each.
    variants: tuple[dict[str, Any], ...] = ({},)
    #: The activation it swaps ReLU for (``swap_activation(model, swap_to)``), if it is a swap.
    swap_to: str | None = None
    #: Only fits a network with ReLU-family units (units that can die).
    rectifier_only: bool = False
    #: Changes the learning rate: only worth it when a finding says something about the rate.
    about_rate: bool = False


_SWAP = "from reludoctor.remedies import swap_activation\n"

#: Every remedy, in the order a user would usually try them.
REMEDY_CATALOGUE: dict[str, Remedy] = {
    remedy.code: remedy
    for remedy in (
        Remedy(
            "kaiming_init",
            "re-initialise ReLU layers with He (Kaiming) initialisation",
            "from reludoctor.remedies import kaiming_init\n"
            "kaiming_init(model)  # nn.init.kaiming_normal_(w, nonlinearity='relu'), zero biases",
            treatable=True,
            rectifier_only=True,
        ),
        Remedy(
            "leaky_relu",
            "use LeakyReLU so negative pre-activations still pass a gradient",
            _SWAP + "swap_activation(model, 'leaky_relu', negative_slope=0.01)"
            "  # nn.ReLU -> nn.LeakyReLU",
            treatable=True,
            swap_to="leaky_relu",
            rectifier_only=True,
        ),
        Remedy(
            "prelu",
            "use PReLU (a learned negative slope)",
            _SWAP + "swap_activation(model, 'prelu')",
            treatable=True,
            swap_to="prelu",
            rectifier_only=True,
        ),
        Remedy(
            "elu",
            "use ELU",
            _SWAP + "swap_activation(model, 'elu')",
            treatable=True,
            swap_to="elu",
            rectifier_only=True,
        ),
        Remedy(
            "selu",
            "use SELU with lecun_normal initialisation and AlphaDropout",
            _SWAP + "swap_activation(model, 'selu')"
            "  # also lecun_normal weights, Dropout -> AlphaDropout",
            treatable=True,
            swap_to="selu",
        ),
        Remedy(
            "batch_norm",
            "add batch normalisation before the activation",
            "from reludoctor.remedies import add_batch_norm\n"
            "add_batch_norm(model, optimizer)  # Linear -> BatchNorm1d -> ReLU (nn.Sequential)",
            treatable=True,
        ),
        Remedy(
            "lower_learning_rate",
            "lower the learning rate",
            "from reludoctor.remedies import lower_learning_rate\n"
            "lower_learning_rate(optimizer, factor=10)",
            treatable=True,
            variants=({"factor": 10.0}, {"factor": 100.0}),
            about_rate=True,
        ),
        Remedy(
            "adaptive_optimizer",
            "use an adaptive optimiser (Adam, RMSprop)",
            "optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)",
        ),
        Remedy(
            "normalize_inputs",
            "centre and scale the inputs",
            "mean, std = x_train.mean(0), x_train.std(0) + 1e-8  # training-set statistics\n"
            "x = (x - mean) / std  # for every split",
        ),
        Remedy(
            "skip_connections",
            "add skip (residual) connections",
            "def forward(self, x):\n    return x + self.block(x)  # a residual block",
        ),
        Remedy(
            "revive_units",
            "re-initialise the dead units in place (ReDo-style recycling)",
            "from reludoctor.revive import revive_units\n"
            "revive_units(model, doc, optimizer)  # or rd.watch(..., revive=True)",
            treatable=True,
            rectifier_only=True,
        ),
        Remedy(
            "reset_norm_shift",
            "set the normalisation layers' shift (beta) back to 0, or re-estimate batch norm's "
            "running statistics",
            "from reludoctor.remedies import reset_norm_shift\n"
            "reset_norm_shift(model)  # BatchNorm/GroupNorm/LayerNorm bias -> 0 before a ReLU",
            treatable=True,
        ),
    )
}

#: Remedies per cause, best first for that cause.
CAUSE_REMEDIES: dict[str, tuple[str, ...]] = {
    "zero_init": ("kaiming_init", "revive_units"),
    "poor_init_scale": ("kaiming_init", "batch_norm", "selu"),
    "negative_bias": ("kaiming_init", "revive_units", "leaky_relu", "batch_norm"),
    "negative_norm_shift": ("reset_norm_shift", "revive_units", "leaky_relu"),
    "high_learning_rate": ("lower_learning_rate", "adaptive_optimizer", "revive_units"),
    "unnormalized_inputs": ("normalize_inputs", "batch_norm", "selu", "leaky_relu"),
    "deep_without_normalization": ("batch_norm", "skip_connections", "kaiming_init", "selu"),
}
#: Remedies for a symptom when no cause is known.
SYMPTOM_REMEDIES: dict[str, tuple[str, ...]] = {
    "dead_units": ("revive_units", "leaky_relu", "kaiming_init", "lower_learning_rate"),
    "dying_units": ("lower_learning_rate", "revive_units", "leaky_relu"),
    "loss_plateau": ("revive_units", "leaky_relu", "kaiming_init"),
    "loss_diverging": ("lower_learning_rate", "normalize_inputs", "batch_norm"),
    "identical_outputs": ("kaiming_init", "lower_learning_rate", "leaky_relu"),
    "vanishing_gradients": ("batch_norm", "skip_connections", "kaiming_init"),
    "exploding_gradients": ("lower_learning_rate", "batch_norm", "kaiming_init"),
    "nonfinite_values": ("lower_learning_rate", "normalize_inputs", "batch_norm"),
}

# -- views computed from the catalogue ---------------------------------------------------------

#: Remedies ``rd.treat`` can try in place, in catalogue order; the others need the user's code.
TREATABLE: tuple[str, ...] = tuple(c for c, r in REMEDY_CATALOGUE.items() if r.treatable)
#: Remedies for units of a ReLU-family activation (a unit that can die).
RECTIFIER_REMEDIES: frozenset[str] = frozenset(
    c for c, r in REMEDY_CATALOGUE.items() if r.rectifier_only
)
#: Remedies that change the learning rate.
RATE_REMEDIES: frozenset[str] = frozenset(c for c, r in REMEDY_CATALOGUE.items() if r.about_rate)


def describe(code: str) -> str:
    """The remedy's one-line description, or ``code`` itself for a code the catalogue lacks.

    Example:
        >>> describe("lower_learning_rate")
        'lower the learning rate'
        >>> describe("pray")
        'pray'
    """
    remedy = REMEDY_CATALOGUE.get(code)
    return remedy.description if remedy else code
