"""The torch and Keras names of activation kinds agree with the activation catalogue."""

from __future__ import annotations

import math

import pytest
from torch import nn

from reludoctor.catalogue.activations import (
    ACTIVATION_CATALOGUE,
    CAN_DIE,
    INIT_NAMES,
    KERAS_KINDS,
    SWAP_KINDS,
    WATCHED,
)
from reludoctor.fix.remedies import _GAIN_NAMES, CAN_DIE_MODULES, SWAP_TARGETS
from reludoctor.probe.targets import (
    ACTIVATION_MODULES,
    ATEN_TARGETS,
    FUNCTIONAL_TARGETS,
    TENSOR_TARGETS,
    UNWATCHED_ACTIVATION_MODULES,
)


def test_every_watched_kind_is_in_the_catalogue() -> None:
    tables = (ACTIVATION_MODULES, FUNCTIONAL_TARGETS, TENSOR_TARGETS, ATEN_TARGETS)
    seen = {kind for table in tables for kind in table.values()}
    assert seen == WATCHED
    assert set(UNWATCHED_ACTIVATION_MODULES.values()) == set(ACTIVATION_CATALOGUE) - WATCHED
    assert set(KERAS_KINDS.values()) <= WATCHED


def test_torch_tables_follow_the_catalogue() -> None:
    assert list(SWAP_TARGETS) == list(SWAP_KINDS)
    assert set(CAN_DIE_MODULES) == {nn.ReLU, nn.ReLU6}
    assert {ACTIVATION_MODULES[cls] for cls in CAN_DIE_MODULES} == CAN_DIE - {"hardtanh"}
    assert _GAIN_NAMES[nn.PReLU] == "leaky_relu" and _GAIN_NAMES[nn.Tanh] == "tanh"


# RReLU's random slope and SELU's LeCun gain are reludoctor's own choices.
@pytest.mark.parametrize("kind", sorted(set(INIT_NAMES) - {"rrelu", "selu"}))
def test_gain_matches_torch(kind: str) -> None:
    """The catalogue's gain is ``nn.init``'s for its name (and slope, for a leaky kind)."""
    activation = ACTIVATION_CATALOGUE[kind]
    slope = activation.negative_slope if activation.init_name == "leaky_relu" else None
    expected = nn.init.calculate_gain(activation.init_name, slope)  # type: ignore[arg-type]
    assert math.isclose(activation.gain, expected)
