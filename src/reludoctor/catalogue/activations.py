"""The activation catalogue: one declaration per activation kind, and the tables read from it.

This is the bottom layer: plain data, importing nothing from reludoctor (and no torch). Kinds
are named as reludoctor names them (``"relu"``, ``"leaky_relu"``, ``"silu"`` ...); which torch
class or function is which kind is torch's business and stays in
:mod:`reludoctor.probe.probes`. The tables at the end are computed from
:data:`ACTIVATION_CATALOGUE`, never written by hand: a new kind is one more entry here (and
its torch class in ``probes.py``).

Example:
    >>> ACTIVATION_CATALOGUE["relu6"].can_die, ACTIVATION_CATALOGUE["gelu"].can_die
    (True, False)
    >>> sorted(CAN_DIE)
    ['hardtanh', 'relu', 'relu6']

A unit can die only where the gradient is 0 for every negative input (no negative slope), and
the units of every kind with no negative slope can die:

    >>> all(a.negative_slope == 0 for a in ACTIVATION_CATALOGUE.values() if a.can_die)
    True
    >>> CAN_DIE == {k for k, a in ACTIVATION_CATALOGUE.items() if a.negative_slope == 0}
    True
    >>> NON_NEGATIVE <= CAN_DIE
    True

The swaps the remedies offer lead away from dying units; only ``"relu"`` itself (to swap a
ReLU6 for a plain ReLU) is a swap target whose units can die:

    >>> [k for k in SWAP_KINDS if can_die(k)], [k for k in KERAS_SWAP_KINDS if can_die(k)]
    (['relu'], [])
    >>> from reludoctor.catalogue.remedies import REMEDY_CATALOGUE
    >>> swaps = {r.swap_to for r in REMEDY_CATALOGUE.values() if r.swap_to}
    >>> swaps <= set(SWAP_KINDS) and not any(can_die(k) for k in swaps)
    True
    >>> all(k in ACTIVATION_CATALOGUE[k].keras_names for k in KERAS_SWAP_KINDS)
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: The He gain of a rectifier, ``nn.init.calculate_gain("relu")``.
_HE = math.sqrt(2.0)


def _leaky_gain(negative_slope: float) -> float:
    """``nn.init.calculate_gain("leaky_relu", negative_slope)``."""
    return math.sqrt(2.0 / (1 + negative_slope**2))


@dataclass(frozen=True)
class Activation:
    """One activation kind: its initialisation gain, whether its units can die, and the swaps
    and Keras names that stand for it.

    Example:
        >>> a = Activation("softplus", gain=1.0, negative_slope=None)
        >>> a.can_die, a.swap_target, a.keras_names
        (False, False, ())
    """

    #: reludoctor's name of the kind (a layer report's ``kind``).
    name: str
    #: Gain for He initialisation: std = gain / sqrt(fan_in) keeps the signal's scale through
    #: a layer (PyTorch's ``nn.init.calculate_gain``; ReLU: sqrt(2)).
    gain: float
    #: The gradient for a negative input, for a kind that is linear below 0 (PyTorch's
    #: default; 0: none); ``None`` where it varies with the input (ELU, GELU ...).
    negative_slope: float | None
    #: The gradient is 0 for every negative input, so a unit that is never positive gets no
    #: gradient and stays dead. Leaky ReLU, PReLU, ELU, SELU, GELU ... still pass a gradient
    #: below 0: a unit of theirs that is never positive is stuck, not dead.
    can_die: bool = False
    #: A rectifier's output: never negative, and positive exactly where the input is, so the
    #: output is its own magnitude and a positive output is a firing.
    non_negative: bool = False
    #: The ``nonlinearity`` ``nn.init`` knows it by (``kaiming_init``'s gain); ``None``: the
    #: init remedies and ``add_batch_norm`` do not take it for the activation after a layer.
    init_name: str | None = None
    #: ``swap_activation`` (PyTorch) can put it in place of a ReLU.
    swap_target: bool = False
    #: Keras activation functions (by ``__name__``) of this kind.
    keras_names: tuple[str, ...] = ()
    #: The Keras ``swap_activation`` can put it in (by its Keras name, the kind's own).
    keras_swap_target: bool = False
    #: reludoctor watches it (a kind known only for its gain is not watched).
    watched: bool = True
    #: Watched only as the body of this kind's module, never as a call of its own.
    body_of: str | None = None


#: Every activation kind. The order is the swaps' order of preference: first the kinds that
#: keep a gradient below 0 (the smallest change from ReLU first), then those whose units can
#: die, then kinds reludoctor does not watch.
ACTIVATION_CATALOGUE: dict[str, Activation] = {
    a.name: a
    for a in (
        Activation(
            "leaky_relu",
            _leaky_gain(0.01),
            0.01,
            init_name="leaky_relu",
            swap_target=True,
            keras_names=("leaky_relu",),
            keras_swap_target=True,
        ),
        Activation("prelu", _leaky_gain(0.25), 0.25, init_name="leaky_relu", swap_target=True),
        # a random slope in [1/8, 1/3] while training, their mean in eval
        Activation("rrelu", _HE, (1 / 8 + 1 / 3) / 2, init_name="leaky_relu"),
        Activation(
            "elu",
            _HE,
            None,
            init_name="relu",
            swap_target=True,
            keras_names=("elu",),
            keras_swap_target=True,
        ),
        # SELU wants lecun_normal: std = 1 / sqrt(fan_in)
        Activation(
            "selu",
            1.0,
            None,
            init_name="selu",
            swap_target=True,
            keras_names=("selu",),
            keras_swap_target=True,
        ),
        Activation("celu", _HE, None, init_name="relu", swap_target=True),
        Activation(
            "gelu",
            _HE,
            None,
            init_name="relu",
            swap_target=True,
            keras_names=("gelu",),
            keras_swap_target=True,
        ),
        Activation(
            "silu",
            _HE,
            None,
            init_name="relu",
            keras_names=("silu", "swish"),
            keras_swap_target=True,
        ),
        Activation("mish", _HE, None),
        Activation("hardswish", _HE, None),
        Activation(
            "relu",
            _HE,
            0.0,
            can_die=True,
            non_negative=True,
            init_name="relu",
            swap_target=True,  # puts a plain ReLU in place of a ReLU6
            keras_names=("relu",),
        ),
        Activation(
            "relu6",
            _HE,
            0.0,
            can_die=True,
            non_negative=True,
            init_name="relu",
            keras_names=("relu6",),
        ),
        # ReLU6 is hardtanh(x, 0, 6)
        Activation("hardtanh", _HE, 0.0, can_die=True, body_of="relu6"),
        Activation("tanh", 5 / 3, None, init_name="tanh", watched=False),
        # never negative, but positive below 0 too: not a rectifier
        Activation("sigmoid", 1.0, None, init_name="sigmoid", watched=False),
    )
}

# -- views computed from the catalogue ---------------------------------------------------------

#: He gain of each kind.
HE_GAINS: dict[str, float] = {k: a.gain for k, a in ACTIVATION_CATALOGUE.items()}
#: Kinds whose units can die (gradient 0 for every negative input).
CAN_DIE: frozenset[str] = frozenset(k for k, a in ACTIVATION_CATALOGUE.items() if a.can_die)
#: Kinds whose output is never negative and positive where the input is: |output| is the output.
NON_NEGATIVE: frozenset[str] = frozenset(
    k for k, a in ACTIVATION_CATALOGUE.items() if a.non_negative
)
#: The ``nonlinearity`` name ``nn.init`` knows each kind by, for the kinds it knows.
INIT_NAMES: dict[str, str] = {
    k: a.init_name for k, a in ACTIVATION_CATALOGUE.items() if a.init_name is not None
}
#: Kinds the PyTorch ``swap_activation`` can put in, in order of preference.
SWAP_KINDS: tuple[str, ...] = tuple(k for k, a in ACTIVATION_CATALOGUE.items() if a.swap_target)
#: Kinds (and Keras names) the Keras ``swap_activation`` can put in, in order of preference.
KERAS_SWAP_KINDS: tuple[str, ...] = tuple(
    k for k, a in ACTIVATION_CATALOGUE.items() if a.keras_swap_target
)
#: Keras activation functions (by ``__name__``) that reludoctor watches, and the kind of each.
KERAS_KINDS: dict[str, str] = {
    name: k for k, a in ACTIVATION_CATALOGUE.items() for name in a.keras_names
}
#: Kinds reludoctor watches.
WATCHED: frozenset[str] = frozenset(k for k, a in ACTIVATION_CATALOGUE.items() if a.watched)


def he_gain(kind: str) -> float:
    """The kind's He gain; sqrt(2) (ReLU's) for a kind the catalogue lacks.

    Example:
        >>> he_gain("selu"), he_gain("relu") == he_gain("swish") == math.sqrt(2)
        (1.0, True)
    """
    return HE_GAINS.get(kind, _HE)


def can_die(kind: str | None) -> bool:
    """Whether units of this kind can die (no gradient below 0); False for an unknown kind or
    none.

    Example:
        >>> can_die("relu"), can_die("leaky_relu"), can_die("swish")
        (True, False, False)
    """
    return kind in CAN_DIE


def body_only(kind: str) -> bool:
    """Whether the kind is watched only as the body of another kind's module.

    Example:
        >>> body_only("hardtanh"), body_only("relu6")
        (True, False)
    """
    activation = ACTIVATION_CATALOGUE.get(kind)
    return activation is not None and activation.body_of is not None
