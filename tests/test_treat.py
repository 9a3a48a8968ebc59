"""rd.treat: remedies tried on copies, ranked by what they measurably did."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import reludoctor as rd
from reludoctor.fix.remedies import RemedyError
from reludoctor.scenarios import SCENARIOS, IsReluDead


def scenario_batches(key):
    scenario = SCENARIOS[key](**({"samples": 20_000} if key == "e1" else {}))
    setup = scenario.build()
    return setup, setup.batches(scenario.batch_size)


def snapshot(setup):
    return copy.deepcopy(setup.model.state_dict()), copy.deepcopy(setup.optimizer.state_dict())


@pytest.mark.parametrize("key", ["e1", "e3", "e4", "e5"])
def test_the_top_remedy_revives_the_units_and_lowers_the_loss(key):
    setup, batches = scenario_batches(key)
    before = snapshot(setup)
    treatment = rd.treat(
        setup.model, setup.optimizer, batches, setup.loss_fn, steps=50 if key == "e4" else 200
    )
    winner = treatment.winner
    assert winner is not None, treatment.to_dict()
    assert winner.worst_dead_fraction is not None and winner.worst_dead_fraction < 0.1
    assert winner.loss < treatment.untreated_loss
    # the user's model and optimizer are untouched until asked
    after = snapshot(setup)
    assert all(torch.equal(v, before[0][k]) for k, v in after[0].items())
    assert after[1]["param_groups"] == before[1]["param_groups"]


@pytest.mark.parametrize("key", ["e2", "digits-mlp", "digits-cnn"])
def test_healthy_controls_get_no_recommendation(key):
    setup, batches = scenario_batches(key)
    treatment = rd.treat(setup.model, setup.optimizer, batches, setup.loss_fn, steps=100)
    assert treatment.candidates == [] and treatment.winner is None
    with pytest.raises(RemedyError, match="nothing to apply"):
        treatment.apply(setup.model, setup.optimizer)


def test_apply_puts_the_winner_on_the_users_model():
    setup = IsReluDead(samples=20_000).build()
    batches = setup.batches(256)
    treatment = rd.treat(setup.model, setup.optimizer, batches, setup.loss_fn, steps=100)
    assert treatment.winner.remedy == "batch_norm"
    record = treatment.apply(setup.model, setup.optimizer)
    assert isinstance(setup.model.dense1_batch_norm, nn.BatchNorm1d)
    assert len(setup.optimizer.param_groups) == 2 and record.changed
    data = treatment.to_dict()
    assert data["ranking"][0] == "batch_norm" and "normalize_inputs" in data["not_tried"]


def test_bad_input_is_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [(torch.randn(8, 4), torch.randn(8, 1))]
    loss = nn.functional.mse_loss
    with pytest.raises(RemedyError, match="steps must be an integer >= 1"):
        rd.treat(model, opt, batches, loss, steps=0)
    with pytest.raises(RemedyError, match="does not own"):
        rd.treat(model, torch.optim.SGD(model[0].parameters(), lr=0.1), batches, loss)
    with pytest.raises(RemedyError, match="batches gave nothing"):
        rd.treat(model, opt, [], loss)
    with pytest.raises(RemedyError, match="pair"):
        rd.treat(model, opt, [torch.randn(8, 4)], loss)
    with pytest.raises(RemedyError, match="cannot try normalize_inputs"):
        rd.treat(model, opt, batches, loss, remedies=["normalize_inputs"])
    meta = nn.Sequential(nn.Linear(4, 4, device="meta"), nn.ReLU())
    with pytest.raises(RemedyError, match="model is on meta but the batches are on cpu"):
        rd.treat(meta, torch.optim.SGD(meta.parameters(), lr=0.1), batches, loss)
