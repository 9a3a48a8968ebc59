"""Property tests: the report against a brute-force reference built from every pre-activation.

Each model stores a copy of every pre-activation it computes; the reference then applies the
definitions directly: a unit is dead over a span of steps when its largest pre-activation in
that span is <= 0, and its fire rate is the fraction of sampled positions where it was > 0.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import reludoctor as rd

SETTINGS = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


class Recording(nn.Module):
    """Base: ``record(name, pre)`` keeps a copy of each pre-activation, one list per layer."""

    def __init__(self, names: list[str]) -> None:
        super().__init__()
        self.seen: dict[str, list[torch.Tensor]] = {name: [] for name in names}

    def record(self, name: str, pre: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.seen[name].append(pre.detach().clone())
        return pre


class Dense(Recording):
    """A module ReLU and a functional ReLU, with biases spread so some units die."""

    def __init__(self, n_in: int, hidden: int, n_out: int, shift: float) -> None:
        super().__init__(["act", "fc2:relu"])
        self.fc1 = nn.Linear(n_in, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, n_out)
        with torch.no_grad():
            for fc in (self.fc1, self.fc2):
                fc.bias.uniform_(-2.0, 1.0).add_(shift)

    def forward(self, x):
        h = self.act(self.record("act", self.fc1(x)))
        return F.relu(self.record("fc2:relu", self.fc2(h)))


class Conv(Recording):
    def __init__(self, c_in: int, c_out: int, shift: float) -> None:
        super().__init__(["relu"])
        self.conv = nn.Conv2d(c_in, c_out, 2)
        self.relu = nn.ReLU()
        with torch.no_grad():
            self.conv.bias.uniform_(-2.0, 1.0).add_(shift)

    def forward(self, x):
        return self.relu(self.record("relu", self.conv(x)))


def run(model: Recording, steps: int, make_input, lr: float, **watch_kwargs) -> rd.Report:
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    with rd.watch(model, **watch_kwargs) as doc:
        for _ in range(steps):
            opt.zero_grad()
            out = model(make_input())
            loss = out.square().mean()
            loss.backward()
            opt.step()
            doc.step(loss=loss)
    return doc.report()


def span_start(steps: int, window: int) -> int:
    """First step the layer summary covers: the last closed window's (then the open one)."""
    return max(0, (steps // window - 1) * window)


def per_unit(pre: torch.Tensor, unit_dim: int) -> torch.Tensor:
    """Pre-activations as (positions, units)."""
    return pre.movedim(unit_dim, -1).reshape(-1, pre.shape[unit_dim])


def check_layer(report, name, pres, steps, window, sample_every, unit_dim):
    """Compare one layer of ``report`` with the reference built from ``pres`` (one per step)."""
    assert len(pres) == steps
    start = span_start(steps, window)
    span = torch.cat([per_unit(p, unit_dim) for p in pres[start:steps]])
    layer = report.layer(name)

    expected_dead = torch.nonzero(span.amax(0) <= 0).flatten().tolist()
    assert layer.dead_units == expected_dead
    assert layer.dead == len(expected_dead)
    assert layer.units == span.shape[1]
    assert layer.unit_dim == unit_dim
    assert layer.samples == span.shape[0]
    assert layer.max_preactivation == pytest.approx(span.amax(0).tolist(), abs=1e-6)

    sampled = [i for i in range(start, steps) if i % sample_every == 0]
    if not sampled:
        assert layer.fire_rate is None
    else:
        fired = torch.cat([per_unit(pres[i], unit_dim) for i in sampled]) > 0
        assert layer.fire_rate == pytest.approx(fired.double().mean(0).tolist(), abs=1e-6)

    # Every window, closed or open, against the same definition over its own steps.
    index = [lay.name for lay in report.layers].index(name)
    assert [(w.start_step, w.end_step) for w in report.windows] == [
        (s, min(s + window, steps)) for s in range(0, steps, window)
    ]
    for w in report.windows:
        own = torch.cat([per_unit(p, unit_dim) for p in pres[w.start_step : w.end_step]])
        assert w.complete is (w.end_step - w.start_step == window)
        assert w.layers[index].name == name
        assert w.layers[index].dead == int((own.amax(0) <= 0).sum())
        assert w.layers[index].samples == own.shape[0]


common = {
    "seed": st.integers(0, 2**31 - 1),
    "steps": st.integers(1, 7),
    "window": st.integers(1, 4),
    "sample_every": st.integers(1, 3),
    "batch": st.integers(1, 6),
    "shift": st.sampled_from([-1.0, -0.5, 0.0, 0.5]),
    "lr": st.sampled_from([0.0, 0.05]),
}


@SETTINGS
@given(
    n_in=st.integers(1, 5),
    hidden=st.integers(1, 10),
    n_out=st.integers(1, 6),
    **common,
)
def test_dense_matches_brute_force(
    n_in, hidden, n_out, seed, steps, window, sample_every, batch, shift, lr
):
    torch.manual_seed(seed)
    model = Dense(n_in, hidden, n_out, shift)
    report = run(
        model,
        steps,
        lambda: torch.randn(batch, n_in),
        lr,
        window=window,
        sample_every=sample_every,
    )
    assert [layer.name for layer in report.layers] == ["act", "fc2:relu"]
    for name, pres in model.seen.items():
        check_layer(report, name, pres, steps, window, sample_every, unit_dim=1)


@SETTINGS
@given(
    c_in=st.integers(1, 3),
    c_out=st.integers(1, 6),
    side=st.integers(2, 5),
    **common,
)
def test_conv_matches_brute_force(
    c_in, c_out, side, seed, steps, window, sample_every, batch, shift, lr
):
    torch.manual_seed(seed)
    model = Conv(c_in, c_out, shift)
    report = run(
        model,
        steps,
        lambda: torch.randn(batch, c_in, side, side),
        lr,
        window=window,
        sample_every=sample_every,
    )
    assert [layer.name for layer in report.layers] == ["relu"]
    check_layer(report, "relu", model.seen["relu"], steps, window, sample_every, unit_dim=1)


@SETTINGS
@given(
    hidden=st.integers(1, 12),
    seed=st.integers(0, 2**31 - 1),
    steps=st.integers(1, 6),
    batch=st.integers(1, 8),
    shift=st.sampled_from([-1.0, 0.0, 0.5]),
)
def test_fire_rate_every_step_matches_brute_force(hidden, seed, steps, batch, shift):
    """With sample_every=1 and one window, fire_rate is the firing fraction over all steps."""
    torch.manual_seed(seed)
    model = Dense(3, hidden, 2, shift)
    report = run(model, steps, lambda: torch.randn(batch, 3), 0.0, window=100, sample_every=1)
    for name, pres in model.seen.items():
        everything = torch.cat(pres)
        layer = report.layer(name)
        assert layer.samples == steps * batch
        assert layer.fire_rate == pytest.approx(
            (everything > 0).double().mean(0).tolist(), abs=1e-6
        )
        assert layer.dead_units == torch.nonzero(everything.amax(0) <= 0).flatten().tolist()
