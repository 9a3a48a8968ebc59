"""Facts read from the model, optimizer and inputs, and the per-window measurements behind
the causes (update ratios, bias-held units, output spread)."""

from __future__ import annotations

import pytest
import torch
from conftest import leftovers, plant_dead, randn_input, train
from torch import nn

import reludoctor as rd
from reludoctor.diagnose.facts import read_model_facts, read_optimizer_facts


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 8)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


@pytest.mark.parametrize(
    ("model", "adds"), [(Residual(), 1), (nn.Sequential(nn.Linear(8, 8), nn.ReLU()), 0)]
)
def test_residual_additions_are_counted_in_the_first_forward(model, adds):
    with rd.watch(model) as doc:
        train(model, doc, 2, randn_input(4, 8))
        assert doc.facts.residual_adds == adds
    assert not leftovers(model)
    assert doc.report().facts["residual_adds"] == adds


def test_weight_facts_against_the_he_scale():
    model = nn.Sequential(nn.Linear(50, 20), nn.ReLU(), nn.BatchNorm1d(20), nn.Conv2d(3, 4, 3))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.fill_(-1.0)
    facts = read_model_facts(model)
    dense, conv = facts.layers
    assert (dense.fan_in, dense.out_features, dense.all_zero, dense.constant) == (
        50,
        20,
        True,
        True,
    )
    assert dense.bias_negative_share == 1.0 and dense.bias_mean == -1.0
    assert conv.fan_in == 27 and not conv.constant
    nn.init.kaiming_normal_(model[0].weight, nonlinearity="relu")
    assert read_model_facts(model).layers[0].he_ratio("relu") == pytest.approx(1.0, abs=0.1)
    assert facts.norm_layers == 1


def test_optimizer_facts_from_watch_or_step():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    sgd = torch.optim.SGD(
        [{"params": model[0].weight, "lr": 0.5}, {"params": model[0].bias}], lr=0.1
    )
    facts = read_optimizer_facts(sgd)
    assert (facts.type, facts.learning_rates, facts.groups, facts.adaptive) == (
        "SGD",
        [0.5, 0.1],
        2,
        False,
    )
    assert read_optimizer_facts(torch.optim.Adam(model.parameters())).adaptive
    assert read_optimizer_facts(object()) is None
    with rd.watch(model, window=2) as doc:
        assert doc.facts.optimizer is None
        model(torch.randn(3, 4)).sum().backward()
        doc.step(optimizer=sgd)
        doc.step()
    assert doc.report().windows[0].learning_rate == 0.5


def test_input_facts_from_the_first_batches():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    with rd.watch(model) as doc:
        train(model, doc, 6, lambda step: -torch.rand(10, 3) - step)
    inputs = doc.facts.inputs
    assert inputs.batches == 4 and inputs.samples == 40 and inputs.features == 3
    assert inputs.mostly_negative_features == 1.0 and inputs.negative_share == 1.0
    assert inputs.mean == pytest.approx(-2.0, abs=0.2)


def test_update_ratio_is_the_relative_size_of_one_step():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 1))
    with rd.watch(model, sample_every=1, window=100) as doc:
        train(model, doc, 3, randn_input(8, 4), lr=0.0)
    assert doc.report().layer("1").update_ratio == 0.0
    before = model[0].weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 4)
    with rd.watch(model, sample_every=1, window=100) as doc:
        doc.step()  # arm the sampled statistics
        model(x).square().mean().backward()
        opt.step()
        doc.step()
    change = model[0].weight.detach() - before
    expected = torch.linalg.vector_norm(change) / torch.linalg.vector_norm(before)
    assert doc.report().layer("1").update_ratio == pytest.approx(float(expected), rel=1e-4)


def test_bias_held_units_are_exactly_the_planted_ones():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU())
    planted = plant_dead(model[0], [2, 5], alive_bias=0.5)
    x = torch.randn(32, 6)
    with torch.no_grad():
        bias_in_stds = float(model[0].bias.mean() / model[0](x).std())
    with rd.watch(model) as doc:
        train(model, doc, 3, lambda _step: x)
    report = doc.report()
    layer = report.layer("1")
    assert layer.dead_units == planted == layer.bias_held_units
    [cause] = [f for f in report.causes() if f.code == "negative_bias"]
    assert cause.evidence["bias_mean_in_preact_std"] == pytest.approx(bias_in_stds, rel=1e-2)
    assert report.facts["layers"][0]["bias_mean_in_preact_std"] == pytest.approx(
        bias_in_stds, rel=1e-2
    )


def test_output_spread_zero_for_a_constant_network():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.zero_()
    with rd.watch(model, sample_every=1, window=2) as doc:
        train(model, doc, 2, randn_input(8, 4))
    assert doc.report().windows[0].output_spread == 0.0


def test_a_big_weight_is_read_from_a_sample_but_its_extremes_exactly():
    import torch

    from reludoctor.diagnose.facts import STAT_ELEMENTS, weight_facts

    torch.manual_seed(0)
    weight = torch.randn(4096, 1024) * 0.05
    assert weight.numel() > 16 * STAT_ELEMENTS
    facts = weight_facts("big", "Linear", weight, None)
    assert facts.weight_std == pytest.approx(0.05, rel=0.02)
    assert facts.fan_in == 1024 and facts.out_features == 4096
    almost_zero = torch.zeros(4096, 1024)
    almost_zero[4095, 1023] = 1e-3  # in a row the sample skips
    facts = weight_facts("z", "Linear", almost_zero, None)
    assert not facts.all_zero and not facts.constant
    assert weight_facts("z", "Linear", torch.zeros(4096, 1024), None).all_zero
