"""Reviving dead units: outputs unchanged at that moment, the right optimizer state reset,
and the units able to learn again."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import plant_dead
from torch import nn

import reludoctor as rd
from reludoctor.remedies import RemedyError
from reludoctor.revive import revive_units, trace_unit_flow


def adam_steps(model, opt, x, steps=3, doc=None):
    for _ in range(steps):
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if doc is not None:
            doc.step(loss=loss)


def mlp_with_dead_units():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3)
    )
    first = plant_dead(model[0], [1, 4, 9])
    second = plant_dead(model[2], [0, 5])
    return model, first, second


def test_revival_keeps_outputs_and_resets_exactly_the_units_state():
    model, first, second = mlp_with_dead_units()
    x = torch.randn(64, 6)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with rd.watch(model, optimizer=opt) as doc:
        adam_steps(model, opt, x, doc=doc)
        before_out = model(x).detach()
        before = copy.deepcopy(model.state_dict())
        state = {
            name: {k: v.clone() for k, v in opt.state[p].items()}
            for name, p in model.named_parameters()
        }
        record = revive_units(model, doc, opt)
    assert record.details["revived"] == {"1": first, "3": second}
    assert torch.equal(model(x), before_out)

    after = model.state_dict()
    dead = torch.zeros(16, dtype=torch.bool)
    dead[first] = True
    # producer rows: fresh weights, zero bias; other rows untouched
    assert torch.equal(after["0.weight"][~dead], before["0.weight"][~dead])
    assert not torch.equal(after["0.weight"][dead], before["0.weight"][dead])
    assert torch.all(after["0.bias"][dead] == 0)
    assert torch.equal(after["0.bias"][~dead], before["0.bias"][~dead])
    # consumer columns zero; the rest of layer 2 untouched but its own revived rows
    kept = ~torch.isin(torch.arange(12), torch.tensor(second))
    assert torch.all(after["2.weight"][:, first] == 0)
    assert torch.equal(after["2.weight"][kept][:, ~dead], before["2.weight"][kept][:, ~dead])
    # Adam moments: zero exactly on the revived rows/columns, unchanged elsewhere
    for key in ("exp_avg", "exp_avg_sq"):
        w0 = opt.state[model[0].weight][key]
        assert torch.all(w0[dead] == 0) and torch.equal(w0[~dead], state["0.weight"][key][~dead])
        w2 = opt.state[model[2].weight][key]
        assert torch.all(w2[:, first] == 0) and torch.all(w2[~kept] == 0)
        assert torch.equal(w2[kept][:, ~dead], state["2.weight"][key][kept][:, ~dead])
        w4 = opt.state[model[4].weight][key]
        assert torch.all(w4[:, second] == 0)
        assert torch.equal(w4[:, kept], state["4.weight"][key][:, kept])


def test_revived_units_fire_and_learn_again():
    model, first, _ = mlp_with_dead_units()
    x = torch.randn(64, 6)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with rd.watch(model, optimizer=opt) as doc:
        adam_steps(model, opt, x, doc=doc)
        revive_units(model, doc, opt)
    with torch.no_grad():
        fired = (model[0](x)[:, first] > 0).any(0)
    assert fired.all()
    column = model[2].weight[:, first].detach().clone()
    adam_steps(model, opt, x, steps=2)
    assert not torch.equal(model[2].weight[:, first], column)  # outgoing weights learn again


def test_conv_units_are_traced_through_pooling_and_flatten():
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 3, 1), nn.ReLU(),
        nn.Flatten(), nn.Dropout(0.1), nn.Linear(3 * 3 * 3, 2),
    )  # fmt: skip
    x = torch.randn(16, 1, 8, 8)
    flows = trace_unit_flow(model, x, ["0", "3"])
    assert flows["0"].consumers == [("3", "conv", 1)] and not flows["0"].escapes
    assert flows["3"].consumers == [("7", "linear", 9)] and not flows["3"].escapes
    dead = plant_dead(model[3], [1])
    before = model.eval()(x)
    record = revive_units(model, rd.scan(model, x), example=x)
    assert record.details["revived"] == {"4": dead}
    assert torch.all(model[7].weight[:, 9:18] == 0)
    assert torch.equal(model(x), before)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 8)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.fc2(h + x)


def test_units_that_flow_into_a_residual_sum_are_skipped_with_the_reason():
    model = Residual()
    plant_dead(model.fc1, [2])
    x = torch.randn(16, 8)
    before = copy.deepcopy(model.state_dict())
    record = revive_units(model, rd.scan(model, x), example=x)
    assert record.details["revived"] == {}
    assert (
        "flow to add" in record.skipped[0] and "change the network's outputs" in record.skipped[0]
    )
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_cap_undo_and_nothing_to_revive():
    model, _, _ = mlp_with_dead_units()
    x = torch.randn(32, 6)
    report = rd.scan(model, x)
    before = copy.deepcopy(model.state_dict())
    record = revive_units(model, report, example=x, max_units=2)
    assert sum(len(u) for u in record.details["revived"].values()) == 2
    record.undo()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    healthy = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with torch.no_grad():
        healthy[0].bias.fill_(10.0)
    empty = revive_units(healthy, rd.scan(healthy, torch.randn(8, 4)))
    assert empty.details["revived"] == {} and empty.skipped


def test_bad_input_is_refused_and_changes_nothing():
    model, _, _ = mlp_with_dead_units()
    x = torch.randn(32, 6)
    report = rd.scan(model, x)
    before = copy.deepcopy(model.state_dict())

    def unchanged():
        return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    with pytest.raises(RemedyError, match="pass example="):
        revive_units(model, report)
    with pytest.raises(RemedyError, match="one forward of the example failed"):
        revive_units(model, report, example=torch.randn(4, 5))
    other = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(RemedyError, match=r"optimizer does not own 0\.weight"):
        revive_units(model, report, other, example=x)
    model[0].weight.requires_grad_(False)
    with pytest.raises(RemedyError, match="frozen"):
        revive_units(model, report, example=x)
    model[0].weight.requires_grad_(True)
    with pytest.raises(RemedyError, match="was the report made on this model"):
        revive_units(nn.Sequential(nn.Linear(6, 3)), report, example=x)
    with pytest.raises(RemedyError, match="Report or Monitor"):
        revive_units(model, {"layers": []}, example=x)  # type: ignore[arg-type]
    assert unchanged()


def test_live_revival_recycles_dead_units_at_window_ends(caplog):
    model, first, second = mlp_with_dead_units()
    x = torch.randn(64, 6)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with (
        caplog.at_level("INFO", logger="reludoctor"),
        rd.watch(model, optimizer=opt, window=5, revive=True) as doc,
    ):
        adam_steps(model, opt, x, steps=20, doc=doc)
    assert doc.revivals[0]["step"] == 5
    assert doc.revivals[0]["revived"] == {"1": first, "3": second}
    assert "revived 3 units of 1, 2 units of 3" in caplog.text
    assert doc.report().meta["revivals"] == doc.revivals
    after = rd.scan(model, x)  # the planted dead units fire again
    assert not set(first) & set(after.layers[0].dead_units)
    assert not set(second) & set(after.layers[1].dead_units)


def test_live_revival_is_capped_and_needs_the_optimizer():
    model, _, _ = mlp_with_dead_units()
    x = torch.randn(64, 6)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with rd.watch(model, optimizer=opt, window=2, revive=True, revive_cap=2) as doc:
        adam_steps(model, opt, x, steps=6, doc=doc)
    revived = [sum(len(u) for u in entry["revived"].values()) for entry in doc.revivals]
    assert revived[0] == 2 and all(n <= 2 for n in revived) and sum(revived) == 5
    with pytest.raises(ValueError, match="needs optimizer="):
        rd.watch(model, revive=True)
