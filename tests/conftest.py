"""Shared tiny-model harness: plant dead units, run watched training steps, check for leaks.

Import the helpers with ``from conftest import ...`` (pytest puts this directory on the path).
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Iterable
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter

import pytest
import torch
import torch.nn.functional as F
from hypothesis import settings
from torch import nn

import reludoctor as rd

# Property tests draw the same examples on every run, so CI is never red by chance; set
# HYPOTHESIS_PROFILE=explore to search new ground.
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

#: Bias that keeps a unit's pre-activation far below 0 whatever its (small) input term is.
DEAD_BIAS = -1e4

#: Every functional activation reludoctor may swap, captured before any test ran.
ORIGINAL_FUNCTIONS: dict[tuple[Any, str], Any] = {
    **{
        (F, name): getattr(F, name)
        for name in (
            "relu",
            "relu_",
            "relu6",
            "leaky_relu",
            "leaky_relu_",
            "elu",
            "elu_",
            "celu",
            "selu",
            "gelu",
            "silu",
            "mish",
            "hardswish",
            "hardtanh",
            "prelu",
            "rrelu",
        )
    },
    **{
        (torch, name): getattr(torch, name)
        for name in ("relu", "relu_", "selu", "prelu", "rrelu", "add")
    },
}
#: Tensor methods are inherited from the C base class; they are not in ``vars(torch.Tensor)``.
ORIGINAL_METHODS: dict[str, Any] = {
    name: getattr(torch.Tensor, name)
    for name in ("relu", "relu_", "add", "add_", "__add__", "__iadd__", "__radd__")
}
INHERITED_METHODS = {name for name in ORIGINAL_METHODS if name not in vars(torch.Tensor)}


def swapped_globals() -> list[str]:
    """Names of functions or methods that are not the originals right now."""
    bad = [
        f"{getattr(owner, '__name__', owner)}.{name}"
        for (owner, name), original in ORIGINAL_FUNCTIONS.items()
        if getattr(owner, name) is not original
    ]
    bad += [
        f"Tensor.{name}"
        for name, original in ORIGINAL_METHODS.items()
        if getattr(torch.Tensor, name) is not original
        or (name in INHERITED_METHODS and name in vars(torch.Tensor))
    ]
    from reludoctor.probe import probes

    if probes._PATCHER is not None:  # default arguments swapped in users' methods
        bad += [f"defaults of {f.__qualname__}" for f in probes._PATCHER.defaults]
    return bad


def leftovers(model: nn.Module) -> list[str]:
    """Everything reludoctor may have left on ``model`` (empty when it is clean)."""
    found = []
    if "forward" in model.__dict__:
        found.append("instance-level forward on the model")
    for name, module in model.named_modules():
        for attr in (
            "_forward_hooks",
            "_forward_pre_hooks",
            "_forward_hooks_with_kwargs",
            "_backward_hooks",
            "_backward_pre_hooks",
        ):
            if getattr(module, attr, None):
                found.append(f"{attr} on module {name!r}")
    for name, param in model.named_parameters():
        if getattr(param, "_post_accumulate_grad_hooks", None):
            found.append(f"post-accumulate-grad hook on parameter {name!r}")
        if getattr(param, "_backward_hooks", None):
            found.append(f"backward hook on parameter {name!r}")
    glob = nn.modules.module
    for attr in ("_global_forward_hooks", "_global_forward_pre_hooks"):
        if getattr(glob, attr, None):
            found.append(f"global {attr}")
    return found + swapped_globals()


@pytest.fixture(autouse=True)
def _no_global_leak():
    """Every test must leave the functional namespaces and Tensor as it found them."""
    assert not swapped_globals(), "a previous test leaked wrappers"
    yield
    gc.collect()
    assert not swapped_globals(), f"wrappers still installed after the test: {swapped_globals()}"


def layer_report(
    name: str = "fc:relu", units: int = 10, dead: Iterable[int] = (), **fields: Any
) -> rd.LayerReport:
    """A hand-made layer summary with ``dead`` as its dead units (for rules and views)."""
    dead = list(dead)
    fields.setdefault("via", "functional")
    fields.setdefault("kind", "relu")
    return rd.LayerReport(
        name=name,
        units=units,
        dead=len(dead),
        dead_fraction=len(dead) / units,
        dead_units=dead,
        samples=100,
        **fields,
    )


def plant_dead(
    layer: nn.Module, dead: Iterable[int], *, alive_bias: float | None = None, scale: float = 1.0
) -> list[int]:
    """Make ``dead`` output units of a Linear/Conv unable to fire (bias ``DEAD_BIAS``).

    ``alive_bias`` (when given) is put on every other unit so it fires on most inputs;
    ``scale`` multiplies the weights (a small scale makes ``alive_bias`` dominate, so healthy
    units fire on every input). Returns the planted indices, sorted.
    """
    dead = sorted(set(dead))
    with torch.no_grad():
        if scale != 1.0:
            layer.weight.mul_(scale)
        if alive_bias is not None:
            layer.bias.fill_(alive_bias)
        if dead:
            layer.bias[dead] = DEAD_BIAS
    return dead


def identity_relu(units: int = 4) -> nn.Sequential:
    """Linear with identity weights and zero bias, then ReLU: the pre-activation is the input.

    Its activation layer is named ``"1"``; tests choose exactly which units fire by the input.
    """
    model = nn.Sequential(nn.Linear(units, units), nn.ReLU())
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(units))
        model[0].bias.zero_()
    return model


def train(
    model: nn.Module,
    doc: rd.Monitor | None,
    steps: int,
    make_input: Callable[[int], torch.Tensor],
    *,
    lr: float | None = None,
    loss_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[float]:
    """``steps`` training steps on ``make_input(step)``; ``doc.step(loss=...)`` after each.

    With ``lr`` None the weights never change (forward and backward only: the same as
    ``lr=0`` but immune to non-finite gradients); otherwise plain SGD with that rate.
    Returns the losses (as floats) in order.
    """
    loss_fn = loss_fn or (lambda out: out.float().square().mean())
    opt = torch.optim.SGD(model.parameters(), lr=lr) if lr is not None else None
    losses = []
    for i in range(steps):
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model(make_input(i)))
        loss.backward()
        if opt is not None:
            opt.step()
        losses.append(float(loss.detach()))
        if doc is not None:
            doc.step(loss=loss)
    return losses


def randn_input(*shape: int) -> Callable[[int], torch.Tensor]:
    """A ``make_input`` for :func:`train`: fresh standard-normal batches of ``shape``."""
    return lambda _step: torch.randn(*shape)


def run_watched(
    model: nn.Module,
    steps: int,
    make_input: Callable[[int], torch.Tensor],
    *,
    lr: float | None = None,
    loss_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    **watch_kwargs: Any,
) -> rd.Report:
    """Train ``model`` for ``steps`` steps under ``rd.watch`` and return the final report.

    The monitor is closed before the report is made, and the model is checked to be clean.
    """
    with rd.watch(model, **watch_kwargs) as doc:
        train(model, doc, steps, make_input, lr=lr, loss_fn=loss_fn)
    assert doc.closed
    assert not leftovers(model), leftovers(model)
    return doc.report()
