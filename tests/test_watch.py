"""rd.watch on tiny models: planted dead units, naming, transparency, clean-up, edge cases."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    DEAD_BIAS,
    ORIGINAL_FUNCTIONS,
    ORIGINAL_METHODS,
    identity_relu,
    leftovers,
    plant_dead,
    randn_input,
    run_watched,
    swapped_globals,
    train,
)
from torch import nn

import reludoctor as rd
from reludoctor.probe.counters import COUNTERS

THIS_FILE = os.path.abspath(__file__)

# -- models ---------------------------------------------------------------------------------


class Functional(nn.Module):
    """``form(self.fc1(x))``: one functional activation applied to a Linear's output."""

    def __init__(self, form, in_features: int = 8, units: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, units)
        self.form = form

    def forward(self, x):
        return self.form(self.fc1(x))


class ConvFunctional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        return F.relu(self.conv(x))


class Loop(nn.Module):
    def __init__(self, width: int = 8, depth: int = 3) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x):
        for layer in self.layers:
            x = F.relu(layer(x))
        return x


class Reused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 12)
        self.fc2 = nn.Linear(12, 10)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.fc2(self.relu(self.fc1(x))))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.fc(x))


class Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = Block()
        self.head = nn.Linear(8, 6)

    def forward(self, x):
        return F.relu(self.head(self.encoder(x)))


class Mixed(nn.Module):
    """Module ReLU, in-place module ReLU and several functional forms in one forward."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(16, 16)
        self.act_inplace = nn.ReLU(inplace=True)
        self.fc3 = nn.Linear(16, 16)
        self.fc4 = nn.Linear(16, 16)
        self.fc5 = nn.Linear(16, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        x = self.act(self.fc1(x))
        x = self.act_inplace(self.fc2(x))
        x = F.relu(self.fc3(x))
        x = self.fc4(x).relu_()
        x = F.leaky_relu(self.fc5(x), 0.05)
        return self.out(x)


MIXED_LAYERS = {"act", "act_inplace", "fc3:relu", "fc4:relu", "fc5:leaky_relu"}


def conv_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 2 * 2, 10),
        nn.ReLU(),
        nn.Linear(10, 3),
    )


# -- 1. planted dead units are found exactly ------------------------------------------------

MODULE_ACTIVATIONS = {
    "ReLU": (nn.ReLU, "relu"),
    "ReLU-inplace": (lambda: nn.ReLU(inplace=True), "relu"),
    "ReLU6": (nn.ReLU6, "relu6"),
    "LeakyReLU": (lambda: nn.LeakyReLU(0.1), "leaky_relu"),
    "PReLU": (nn.PReLU, "prelu"),
    "ELU": (nn.ELU, "elu"),
    "SELU": (nn.SELU, "selu"),
    "GELU": (nn.GELU, "gelu"),
    "SiLU": (nn.SiLU, "silu"),
}

# Each form is looked up at call time (F.relu captured early would be the unwatched original).
FUNCTIONAL_FORMS = {
    "F.relu": (lambda t: F.relu(t), "relu"),
    "F.relu-inplace": (lambda t: F.relu(t, inplace=True), "relu"),
    "torch.relu": (lambda t: torch.relu(t), "relu"),
    "torch.relu_": (lambda t: torch.relu_(t), "relu"),
    "Tensor.relu": (lambda t: t.relu(), "relu"),
    "Tensor.relu_": (lambda t: t.relu_(), "relu"),
    "F.leaky_relu": (lambda t: F.leaky_relu(t, 0.1), "leaky_relu"),
    "F.gelu": (lambda t: F.gelu(t), "gelu"),
    "F.silu": (lambda t: F.silu(t), "silu"),
    "F.elu": (lambda t: F.elu(t), "elu"),
    "F.selu": (lambda t: F.selu(t), "selu"),
}

PLANTED = [1, 4, 5, 11]
STEPS, BATCH = 4, 64


@pytest.mark.parametrize("case", list(MODULE_ACTIVATIONS))
def test_planted_dead_units_module_activation(case):
    make, kind = MODULE_ACTIVATIONS[case]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), make())
    dead = plant_dead(model[0], PLANTED, alive_bias=0.5)

    report = run_watched(model, STEPS, randn_input(BATCH, 8))

    assert [layer.name for layer in report.layers] == ["1"]  # seen once, not twice
    layer = report.layer("1")
    assert layer.dead_units == dead
    assert (layer.kind, layer.via, layer.producer) == (kind, "module", "0")
    assert layer.units == 16
    assert layer.unit_dim == 1
    assert layer.dead == len(dead)
    assert layer.dead_fraction == pytest.approx(len(dead) / 16)
    assert layer.samples == STEPS * BATCH
    # What is recorded is the input of the activation, not its (possibly in-place) output.
    assert all(layer.max_preactivation[u] < DEAD_BIAS / 2 for u in dead)


@pytest.mark.parametrize("case", list(FUNCTIONAL_FORMS))
def test_planted_dead_units_functional_form(case):
    form, kind = FUNCTIONAL_FORMS[case]
    torch.manual_seed(1)
    model = Functional(form)
    dead = plant_dead(model.fc1, PLANTED, alive_bias=0.5)

    report = run_watched(model, STEPS, randn_input(BATCH, 8))

    assert [layer.name for layer in report.layers] == [f"fc1:{kind}"]
    layer = report.layers[0]
    assert layer.dead_units == dead
    assert (layer.kind, layer.via, layer.producer) == (kind, "functional", "fc1")
    assert (layer.units, layer.unit_dim, layer.samples) == (16, 1, STEPS * BATCH)
    assert all(layer.max_preactivation[u] < DEAD_BIAS / 2 for u in dead)
    path, _, line = layer.source.rpartition(":")
    assert os.path.abspath(path) == THIS_FILE and line.isdigit()


def test_functional_call_written_in_forward():
    """The common spelling ``F.relu(self.fc(x))`` inside a nested module's forward."""
    torch.manual_seed(2)
    model = Nested()
    enc_dead = plant_dead(model.encoder.fc, [0, 7], alive_bias=1.0, scale=0.01)
    head_dead = plant_dead(model.head, [2, 3, 4], alive_bias=1.0, scale=0.01)

    report = run_watched(model, 3, randn_input(32, 8))

    assert [layer.name for layer in report.layers] == ["encoder.act", "head:relu"]
    assert report.layer("encoder.act").dead_units == enc_dead
    assert report.layer("encoder.act").producer == "encoder.fc"
    assert report.layer("head:relu").dead_units == head_dead
    assert report.layer("head:relu").via == "functional"


@pytest.mark.parametrize("functional", [False, True], ids=["module", "functional"])
def test_planted_dead_channels_conv(functional):
    torch.manual_seed(3)
    if functional:
        model, name = ConvFunctional(), "conv:relu"
        conv = model.conv
    else:
        model, name = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()), "1"
        conv = model[0]
    dead = plant_dead(conv, [0, 5, 6], alive_bias=0.5)
    steps, batch, side = 3, 8, 6

    report = run_watched(model, steps, randn_input(batch, 3, side, side))

    layer = report.layer(name)
    assert layer.dead_units == dead
    assert layer.units == 8  # channels, not width
    assert layer.unit_dim == 1
    assert layer.samples == steps * batch * side * side


def test_loop_over_layers_gives_one_layer_per_iteration():
    torch.manual_seed(4)
    model = Loop()
    planted = {
        "layers.0:relu": plant_dead(model.layers[0], [0, 3], alive_bias=0.5),
        "layers.1:relu": plant_dead(model.layers[1], [1, 2, 6], alive_bias=1.0, scale=0.01),
        "layers.2:relu": plant_dead(model.layers[2], [], alive_bias=1.0, scale=0.01),
    }

    report = run_watched(model, 3, randn_input(64, 8))

    assert [layer.name for layer in report.layers] == list(planted)
    for name, dead in planted.items():
        layer = report.layer(name)
        assert layer.dead_units == dead, name
        assert layer.producer == name.split(":")[0]
        assert layer.samples == 3 * 64
    # Same source line for all three; told apart by which call of it they are.
    assert len({layer.source for layer in report.layers}) == 1


def test_module_reused_in_one_forward_gives_two_layers():
    torch.manual_seed(5)
    model = Reused()
    first = plant_dead(model.fc1, [2, 9], alive_bias=0.5)
    second = plant_dead(model.fc2, [0, 1, 8], alive_bias=1.0, scale=0.01)

    report = run_watched(model, 3, randn_input(64, 8))

    assert [layer.name for layer in report.layers] == ["relu", "relu#2"]
    assert report.layer("relu").dead_units == first
    assert report.layer("relu#2").dead_units == second
    assert (report.layer("relu").units, report.layer("relu#2").units) == (12, 10)
    assert (report.layer("relu").producer, report.layer("relu#2").producer) == ("fc1", "fc2")


def test_mixed_model_layer_names_and_no_false_dead():
    torch.manual_seed(6)
    model = Mixed()
    dead = plant_dead(model.fc1, [3], alive_bias=0.5)
    for fc in (model.fc2, model.fc3, model.fc4, model.fc5):
        plant_dead(fc, [], alive_bias=1.0, scale=0.01)
    report = run_watched(model, 2, randn_input(64, 8))
    assert {layer.name for layer in report.layers} == MIXED_LAYERS
    assert report.layer("act").dead_units == dead
    for name in MIXED_LAYERS - {"act"}:
        assert report.layer(name).dead_units == [], name


# -- 3. the monitor changes nothing ---------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "shape"),
    [(Mixed, (16, 8)), (conv_net, (4, 3, 8, 8))],
    ids=["mixed", "conv"],
)
def test_outputs_and_gradients_bit_identical(make, shape):
    torch.manual_seed(7)
    plain = make()
    watched = copy.deepcopy(plain)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (plain, watched)]
    with rd.watch(watched, window=2, sample_every=1) as doc:
        for step in range(5):
            x = torch.randn(*shape)
            results = []
            for model, opt in zip((plain, watched), opts, strict=True):
                opt.zero_grad(set_to_none=True)
                out = model(x.clone())
                loss = out.square().mean()
                loss.backward()
                grads = [p.grad.clone() for p in model.parameters()]
                opt.step()
                results.append((out.detach(), grads))
            doc.step(loss=loss)
            (out_a, grads_a), (out_b, grads_b) = results
            assert torch.equal(out_a, out_b), f"outputs differ at step {step}"
            for i, (ga, gb) in enumerate(zip(grads_a, grads_b, strict=True)):
                assert torch.equal(ga, gb), f"gradient {i} differs at step {step}"
    for pa, pb in zip(plain.parameters(), watched.parameters(), strict=True):
        assert torch.equal(pa, pb)
    for ba, bb in zip(plain.buffers(), watched.buffers(), strict=True):
        assert torch.equal(ba, bb)
    assert doc.report().layers  # it did watch


# -- 4. nothing left behind ------------------------------------------------------------------


def test_nothing_left_after_close():
    torch.manual_seed(8)
    model = Mixed()
    doc = rd.watch(model, sample_every=1)
    train(model, doc, 2, randn_input(8, 8))
    # While watched there is something to remove (so the checks below can fail).
    assert "forward" in model.__dict__
    assert any(p._post_accumulate_grad_hooks for p in model.parameters())
    assert torch.Tensor.relu is not ORIGINAL_METHODS["relu"]
    doc.close()
    assert doc.closed
    assert not leftovers(model), leftovers(model)
    for (owner, name), original in ORIGINAL_FUNCTIONS.items():
        assert getattr(owner, name) is original, name
    assert F.relu is ORIGINAL_FUNCTIONS[(F, "relu")]
    assert torch.relu is ORIGINAL_FUNCTIONS[(torch, "relu")]
    assert torch.Tensor.relu is ORIGINAL_METHODS["relu"]
    assert torch.Tensor.relu_ is ORIGINAL_METHODS["relu_"]
    doc.close()  # twice is harmless
    assert not leftovers(model)
    # The model still trains, and is no longer counted.
    samples = doc.report().layer("act").samples
    train(model, None, 1, randn_input(8, 8))
    assert doc.report().layer("act").samples == samples


def test_own_instance_forward_is_restored():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    own = model.forward  # a bound method stored on the instance by the user
    model.forward = own
    with rd.watch(model) as doc:
        model(torch.randn(2, 4))
        assert model.__dict__["forward"] is not own
    assert model.__dict__["forward"] is own
    assert doc.report().layers[0].samples == 2


class Exploding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.explode = True
        self.wrapped_inside: bool | None = None

    def forward(self, x):
        h = F.relu(self.fc(x))
        if self.explode:
            self.wrapped_inside = F.relu is not ORIGINAL_FUNCTIONS[(F, "relu")]
            raise RuntimeError("boom")
        return h


def test_exception_inside_forward_leaves_nothing():
    torch.manual_seed(9)
    model = Exploding()
    dead = plant_dead(model.fc, [1, 6], alive_bias=0.5)
    with pytest.raises(RuntimeError, match="boom"), rd.watch(model, sample_every=1) as doc:
        with pytest.raises(RuntimeError, match="boom"):
            model(torch.randn(4, 8))  # the very first forward: discovery hooks are in place
        assert model.wrapped_inside is True
        # Before close: the per-forward wrappers and discovery hooks are gone already.
        for (owner, name), original in ORIGINAL_FUNCTIONS.items():
            assert getattr(owner, name) is original, name
        assert not any(m._forward_hooks for m in model.modules())
        # ... and the monitor still works for the next forwards.
        model.explode = False
        train(model, doc, 3, randn_input(32, 8))
        model.explode = True
        model(torch.randn(4, 8))
    assert not leftovers(model), leftovers(model)
    layer = doc.report().layer("fc:relu")
    assert layer.dead_units == dead
    assert layer.producer == "fc"


# -- 5. misuse -------------------------------------------------------------------------------


def test_watching_twice_raises():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with rd.watch(model):
        with pytest.raises(RuntimeError, match="already watched"):
            rd.watch(model)
        model(torch.randn(2, 4))  # the first monitor is unharmed
    with rd.watch(model) as again:  # allowed once the first is closed
        model(torch.randn(3, 4))
    assert again.report().layers[0].samples == 3
    assert not leftovers(model)


@pytest.mark.parametrize("bad", ["not a model", 3, [nn.ReLU()]])
def test_watch_non_module_raises_type_error(bad):
    with pytest.raises(TypeError, match=type(bad).__qualname__):
        rd.watch(bad)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"window": 0},
        {"window": -3},
        {"window": "x"},
        {"window": 2.5},
        {"window": True},
        {"sample_every": 0},
        {"sample_every": "10"},
    ],
)
def test_bad_settings_raise_value_error(kwargs):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        rd.watch(model, **kwargs)
    assert not leftovers(model)
    rd.watch(model).close()  # a failed watch did not leave the model marked as watched


def test_step_with_non_scalar_loss_raises():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with rd.watch(model, window=2) as doc:
        with pytest.raises(ValueError, match=r"\(3,\)"):
            doc.step(loss=torch.ones(3))
        assert doc.steps == 0  # the refused step did not count
        model(torch.randn(2, 4))
        doc.step(loss=torch.tensor(2.0))
        doc.step(loss=torch.tensor(4.0))
    assert doc.report().windows[0].loss_mean == pytest.approx(3.0)


def test_step_accepts_one_element_losses_of_any_shape():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with rd.watch(model, window=3) as doc:
        model(torch.randn(2, 4))
        doc.step(loss=torch.tensor([2.0]))
        doc.step(loss=torch.tensor(4.0))
        doc.step(loss=torch.tensor([[6.0]]))
    window = doc.report().windows[0]
    assert (window.loss_mean, window.loss_last, window.loss_max) == (4.0, 6.0, 6.0)


# -- 6. nothing to watch ---------------------------------------------------------------------


def test_model_without_activations_warns_and_reports_nothing():
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    report = None
    with rd.watch(model) as doc:
        train(model, doc, 2, randn_input(3, 4))
        with pytest.warns(RuntimeWarning, match="no ReLU"):
            report = doc.report()
    assert report.layers == []
    assert report.findings == []
    assert report.healthy


# -- 7. non-finite values --------------------------------------------------------------------


@pytest.mark.parametrize("sample_every", [1, 10])
def test_nonfinite_preactivations_are_counted_not_fatal(sample_every):
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU())
    dead = plant_dead(model[0], [0, 7], alive_bias=0.5)
    with torch.no_grad():
        model[0].weight[[2, 5]] = math.nan  # units 2 and 5: NaN pre-activations
        model[0].bias[3] = math.inf  # unit 3: +inf pre-activations

    report = run_watched(model, 4, randn_input(16, 6), sample_every=sample_every, window=3)

    layer = report.layer("1")
    assert layer.nonfinite_units == 3
    assert set(dead) <= set(layer.dead_units) <= set(dead) | {2, 5}
    assert layer.samples == 4 * 16  # the last closed window (3 steps) and the open one (1)
    report.to_json()  # non-finite values do not break the JSON view


def test_nan_loss_does_not_crash():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with rd.watch(model, window=2) as doc:
        for loss in (1.0, math.nan, 2.0):
            model(torch.randn(2, 4))
            doc.step(loss=loss)
    report = doc.report()
    assert report.windows[0].loss_mean is None  # not NaN
    assert report.windows[1].loss_mean == 2.0
    report.to_json()


def test_nan_on_unsampled_step_counted_across_windows():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(3))
        model[0].bias.zero_()

    def make_input(step):
        x = torch.randn(8, 3)
        if step == 4:  # in the open window; the last closed window, steps 2-3, is finite
            x[0, 1] = math.nan
        return x

    torch.manual_seed(11)
    with rd.watch(model, window=2, sample_every=100) as doc:
        train(model, doc, 5, make_input)
    report = doc.report()
    assert report.windows[-1].layers[0].nonfinite_units > 0  # the open window does see it
    assert report.layer("1").nonfinite_units > 0


# -- 8. eval mode ----------------------------------------------------------------------------


@pytest.mark.parametrize("count_eval", [False, True])
def test_eval_forwards_counted_only_when_asked(count_eval):
    torch.manual_seed(12)
    model = identity_relu(4)
    train_batch, eval_batch, steps = 16, 5, 3
    eval_x = -torch.rand(eval_batch, 4)
    eval_x[:, [0, 2]] = torch.rand(eval_batch, 2) + 0.1  # units 0 and 2 fire in eval only

    with rd.watch(model, count_eval=count_eval) as doc:
        train(model, doc, steps, lambda _: -torch.rand(train_batch, 4))  # nothing fires
        model.eval()
        with torch.no_grad():
            model(eval_x)
        model.train()

    layer = doc.report().layer("1")
    if count_eval:
        assert layer.dead_units == [1, 3]
        assert layer.samples == steps * train_batch + eval_batch
    else:
        assert layer.dead_units == [0, 1, 2, 3]
        assert layer.samples == steps * train_batch


def test_eval_only_model_is_not_seen():
    model = identity_relu(4).eval()
    with rd.watch(model) as doc:
        model(torch.randn(2, 4))
        with pytest.warns(RuntimeWarning):
            assert doc.report().layers == []


# -- 9. windows ------------------------------------------------------------------------------


def test_windows_ranges_losses_and_span():
    torch.manual_seed(13)
    model = identity_relu(4)
    window, steps, batch = 5, 12, 6

    def make_input(step):
        x = -torch.rand(batch, 4)  # nothing fires ...
        x[:, 2] = 1.0  # ... but unit 2, always
        if step < window:
            x[0, 0] = 1.0  # unit 0 only in the first window
        if step == 7:
            x[3, 1] = 1.0  # unit 1 once in the second (the last closed) window
        if step == 11:
            x[5, 3] = 1.0  # unit 3 once in the open window
        return x

    closed = []
    losses = []
    with rd.watch(model, window=window, on_window=closed.append) as doc:
        for i in range(steps):
            loss = model(make_input(i)).sum() + i * 0.25
            loss.backward()
            losses.append(float(loss.detach()))
            result = doc.step(loss=loss)
            assert (result is not None) == ((i + 1) % window == 0)
        report = doc.report()

    assert [(w.index, w.start_step, w.end_step, w.complete) for w in report.windows] == [
        (0, 0, 5, True),
        (1, 5, 10, True),
        (2, 10, 12, False),
    ]
    assert [w.steps for w in report.windows] == [5, 5, 2]
    assert closed == report.windows[:2]
    for w in report.windows:
        span = losses[w.start_step : w.end_step]
        assert w.loss_mean == pytest.approx(sum(span) / len(span), rel=1e-6)
        assert w.loss_last == pytest.approx(span[-1], rel=1e-6)
        assert w.loss_max == pytest.approx(max(span), rel=1e-6)
    # Per window: which units never fired in it.
    assert [w.layers[0].dead for w in report.windows] == [2, 2, 2]
    assert [w.layers[0].samples for w in report.windows] == [5 * batch, 5 * batch, 2 * batch]
    # The layer summary covers the last closed window plus the open one: steps 5..11.
    layer = report.layer("1")
    assert layer.dead_units == [0]
    assert layer.samples == 7 * batch


def test_windows_without_open_window():
    model = identity_relu(3)
    with rd.watch(model, window=5) as doc:
        train(model, doc, 10, randn_input(2, 3))
    assert [(w.start_step, w.end_step, w.complete) for w in doc.report().windows] == [
        (0, 5, True),
        (5, 10, True),
    ]
    assert doc.report().layer("1").samples == 5 * 2


def test_report_midway_does_not_disturb_counting():
    torch.manual_seed(14)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
    dead = plant_dead(model[0], [0, 9], alive_bias=0.5)
    with rd.watch(model, window=4) as doc:
        train(model, doc, 3, randn_input(32, 8))
        first = doc.report()
        again = doc.report()
        train(model, doc, 3, randn_input(32, 8))
    assert first.layers == again.layers
    assert first.layer("1").samples == 3 * 32
    final = doc.report()
    assert final.layer("1").samples == 6 * 32
    assert final.layer("1").dead_units == dead
    assert doc.steps == 6


# -- 13. gradient statistics -----------------------------------------------------------------


def test_gradient_stats_match_reference():
    torch.manual_seed(15)
    model = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 1))
    dead = plant_dead(model[0], [2, 5, 10], alive_bias=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    squared_norms = []
    with rd.watch(model, sample_every=1) as doc:
        for _ in range(4):
            opt.zero_grad(set_to_none=True)
            loss = model(torch.randn(32, 8)).sum()
            loss.backward()
            squared_norms.append(float(model[0].weight.grad.double().square().sum()))
            opt.step()
            doc.step(loss=loss)
    layer = doc.report().layer("1")
    assert layer.grad_norm is not None
    assert layer.grad_norm == pytest.approx(math.sqrt(sum(squared_norms) / 4), rel=1e-4)
    assert layer.zero_grad_units == dead


def test_no_gradient_stats_without_backward():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with rd.watch(model, sample_every=1) as doc:
        with torch.no_grad():
            model(torch.randn(3, 4))
        doc.step()
    layer = doc.report().layer("1")
    assert layer.grad_norm is None
    assert layer.zero_grad_units is None


# -- 14. deep copies -------------------------------------------------------------------------


def test_deepcopy_of_watched_model_runs_and_is_not_counted():
    torch.manual_seed(16)
    model = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 1))
    dead = plant_dead(model[0], [1, 4], alive_bias=0.5)
    squared_norms = []
    with rd.watch(model, sample_every=1) as doc:
        twin = copy.deepcopy(model)
        with torch.no_grad():
            twin[0].bias.fill_(5.0)  # the twin's units all fire: counting it would show
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            twin.zero_grad(set_to_none=True)
            x = torch.randn(16, 8)
            model(x).sum().backward()
            squared_norms.append(float(model[0].weight.grad.double().square().sum()))
            y = twin(x * 100)
            expected = type(twin).forward(twin, x * 100)
            assert torch.equal(y, expected)
            y.sum().backward()
            doc.step()
    layer = doc.report().layer("1")
    assert [lay.name for lay in doc.report().layers] == ["1"]
    assert layer.samples == 3 * 16
    assert layer.dead_units == dead
    assert layer.grad_norm == pytest.approx(math.sqrt(sum(squared_norms) / 3), rel=1e-4)
    assert not leftovers(model)
    assert not swapped_globals()
    twin(torch.randn(2, 8))  # still runs after the original's monitor is closed


# -- 15. sampled statistics ------------------------------------------------------------------


class Activation(nn.Module):
    """Identity weights, then ``act``: the pre-activation is exactly the input."""

    def __init__(self, units: int, act: nn.Module) -> None:
        super().__init__()
        self.fc = nn.Linear(units, units)
        self.act = act
        with torch.no_grad():
            self.fc.weight.copy_(torch.eye(units))
            self.fc.bias.zero_()

    def forward(self, x):
        return self.act(self.fc(x))


@pytest.mark.parametrize(
    "act",
    [nn.LeakyReLU(0.1), nn.GELU(), nn.ELU(), nn.SiLU(), nn.PReLU(init=-0.5), nn.ReLU6()],
    ids=lambda act: type(act).__name__,
)
def test_fire_rate_counts_positive_preactivations_for_every_kind(act):
    """A unit fires where its pre-activation is > 0, even when the output is > 0 elsewhere
    (a PReLU with a negative slope) or is never exactly 0 (GELU, ELU, SiLU)."""
    torch.manual_seed(12)
    inputs = [torch.randn(16, 5) for _ in range(3)]
    model = Activation(5, act)
    report = run_watched(model, 3, lambda step: inputs[step], sample_every=1)
    layer = report.layer("act")
    expected = (torch.cat(inputs) > 0).double().mean(0)
    assert layer.fire_rate == pytest.approx(expected.tolist(), abs=1e-6)


def test_large_activations_sample_leading_rows_but_count_every_row():
    """Rates come from the batch's first rows once an activation is large; deadness from all."""
    from reludoctor.probe.tracker import SAMPLED_ELEMENTS

    units, batch = 512, 2 * SAMPLED_ELEMENTS // 512  # twice the sampled budget
    head = SAMPLED_ELEMENTS // units
    x = torch.full((batch, units), -1.0)
    x[:, 1] = 1.0  # unit 1 fires on every row
    x[-1, 0] = 1.0  # unit 0 fires on the last row only: alive, but outside the sampled rows
    x[: head // 4, 2] = 1.0  # unit 2 fires on a quarter of the sampled rows
    report = run_watched(identity_relu(units), 2, lambda _step: x, sample_every=1)
    layer = report.layer("1")
    assert 0 not in layer.dead_units and 1 not in layer.dead_units
    assert layer.dead == units - 3
    assert layer.samples == 2 * batch
    assert layer.fire_rate[:3] == pytest.approx([0.0, 1.0, 0.25])


def test_histogram_values_are_copies_an_inplace_relu_cannot_change():
    import torch
    from torch import nn

    import reludoctor as rd

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 32), nn.ReLU(inplace=True))
    with rd.watch(model, window=4, sample_every=1) as doc:
        for _ in range(3):
            model(torch.randn(64, 4))
            doc.step()
        histogram = doc.report().layers[0].preact_histogram
    edges = histogram["edges"]
    below_zero = [n for n, right in zip(histogram["start"], edges[1:], strict=True) if right <= 0]
    latest = [n for n, right in zip(histogram["end"], edges[1:], strict=True) if right <= 0]
    assert sum(below_zero) > 0 and sum(latest) > 0  # the pre-activations, not the ReLU's output


def test_per_call_maxima_kept_for_a_later_fold_give_the_exact_maximum():
    # on a GPU maxima wait in layer.pending and are folded every few calls; on the CPU at once
    import torch
    from torch import nn

    import reludoctor as rd

    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU())
    batches = [torch.randn(8, 3) for _ in range(6)]
    with rd.watch(model, window=100, sample_every=1) as doc:
        model(batches[0])
        [layer] = doc.tracker.layers
        assert layer.pending_limit == 1  # CPU
        layer.pending_limit = 3  # as on a GPU
        for batch in batches[1:]:
            model(batch)
        assert 0 < len(layer.pending) < 3
        layer.fold()
        expected = torch.stack([model[0](b) for b in batches]).amax((0, 1))
        assert torch.equal(layer.max_pre, expected.detach())


def test_kept_values_follow_the_latest_batch_shape():
    # the positions gathered for the histogram are worked out again when the shape changes
    from reludoctor.probe.tracker import HISTOGRAM_VALUES

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 300), nn.ReLU())
    sizes = [3, 64, 64, 17, 3, 40, 5]  # e.g. varying lengths, a last smaller batch
    buffers = set()
    with torch.no_grad(), rd.watch(model, window=100, sample_every=1) as doc:
        for size in sizes:
            x = torch.randn(size, 4)
            model(x)
            doc.step()
            [layer] = doc.tracker.layers
            buffers.add(layer.values.data_ptr())
        kept = layer.snapshot()["values"]
    # one buffer just big enough for the first batch, then one of the most values kept:
    # nothing piles up, whatever the shapes
    assert len(buffers) == 2
    flat = model[0](x).reshape(-1)
    expected = flat[:: max(1, flat.numel() // HISTOGRAM_VALUES)][:HISTOGRAM_VALUES]
    assert kept.tolist() == pytest.approx(expected.tolist())


def test_lasting_cpu_tensors_are_carved_from_few_blocks():
    # made one by one between the model's transients, they would fragment the C heap
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Sequential(nn.Linear(64, 64), nn.ReLU()) for _ in range(24)))
    with torch.no_grad(), rd.watch(model, window=100, sample_every=1) as doc:
        model(torch.randn(32, 64))
        model(torch.randn(32, 64))
        layers = doc.tracker.layers
        lasting = [
            t for layer in layers for t in (*layer.tensors.values(), layer.values, layer.scratch)
        ]
        blocks = {t.untyped_storage().data_ptr() for t in lasting}
        assert len(layers) == 24 and len(lasting) == 24 * (len(COUNTERS) + 2)
        assert len(blocks) == len({t.dtype for t in lasting})  # one block per dtype
        report = doc.report()
    assert [layer.samples for layer in report.layers] == [64] * 24


def test_a_run_log_gets_each_window_its_findings_and_the_report_at_close():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    plant_dead(model[0], range(6))
    events: list[tuple] = []

    class Recorder:
        def write_window(self, window: rd.Window) -> None:
            layer = window.layers[0]
            events.append(("window", window.end_step, layer.kind, layer.dead))
            assert layer.preactivation_values is not None  # histogram values ride along

        def write_findings(self, findings: list[rd.Finding], step: int) -> None:
            events.append(("findings", step, sorted({f.code for f in findings})))

        def close(self, report: rd.Report | None = None) -> None:
            events.append(("close", report.layers[0].dead if report else None))

    with rd.watch(model, window=5, sample_every=5) as doc:
        doc.add_log(Recorder())
        for step in range(10):
            model(torch.randn(16, 4)).sum().backward()
            doc.step(loss=float(step + 1))  # a loss that keeps rising: it diverges
    doc.close()  # a second close writes nothing more
    assert events == [
        ("window", 5, "relu", 6),
        ("findings", 5, ["loss_diverging"]),
        ("window", 10, "relu", 6),
        ("findings", 10, []),  # announced once
        ("close", 6),
    ]
