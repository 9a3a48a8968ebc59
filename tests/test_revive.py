"""Reviving dead units: outputs unchanged at that moment, the right optimizer state reset,
and the units able to learn again."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import plant_dead
from torch import nn

import reludoctor as rd
from reludoctor.api.monitor import silenced_live_findings
from reludoctor.fix.remedies import RemedyError
from reludoctor.fix.revive import revive_units, trace_unit_flow
from reludoctor.scenarios import HighLearningRate


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


def healthy_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def test_live_revival_rewinds_a_diverged_run_to_the_last_stable_window(caplog):
    model = healthy_mlp()
    x = torch.randn(64, 6)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with (
        caplog.at_level("WARNING", logger="reludoctor"),
        rd.watch(model, optimizer=opt, window=2, revive=True) as doc,
    ):
        adam_steps(model, opt, x, steps=2, doc=doc)  # a stable window: its state is kept
        stable = copy.deepcopy(model.state_dict())
        stable_moments = {n: opt.state[p]["exp_avg"].clone() for n, p in model.named_parameters()}
        poisoned = x.clone()
        poisoned[0, 0] = float("nan")
        adam_steps(model, opt, poisoned, steps=2, doc=doc)  # NaN loss: weights become NaN
    assert doc.revivals[-1]["action"] == "rewind"
    assert doc.revivals[-1]["rewound_to"] == 2
    assert doc.revivals[-1]["learning_rates"] == {"before": [1e-2], "after": [1e-3]}
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)
    for name, value in model.state_dict().items():
        assert torch.equal(value, stable[name]), name
    for name, p in model.named_parameters():
        assert torch.equal(opt.state[p]["exp_avg"], stable_moments[name]), name
    assert "rewound model and optimizer to step 2" in caplog.text
    assert "1e-02 -> 0.001" in caplog.text or "0.01 -> 0.001" in caplog.text


def test_live_revival_without_rewinding_leaves_a_diverged_run_alone():
    model = healthy_mlp()
    x = torch.randn(64, 6)
    x[0, 0] = float("nan")
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    with rd.watch(model, optimizer=opt, window=2, revive=True, rewind_lr_factor=None) as doc:
        adam_steps(model, opt, x, steps=4, doc=doc)
    assert all(entry["action"] != "rewind" for entry in doc.revivals)
    assert opt.param_groups[0]["lr"] == 1e-2
    assert torch.isnan(model[0].weight).any()


@pytest.mark.parametrize("factor", [1, 0.5, True, "10"])
def test_rewind_lr_factor_must_be_above_one(factor):
    model = healthy_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    with pytest.raises(ValueError, match="rewind_lr_factor must be a number > 1"):
        rd.watch(model, optimizer=opt, revive=True, rewind_lr_factor=factor)


def test_a_rewind_that_cannot_load_the_kept_state_changes_nothing(caplog):
    model = healthy_mlp()
    x = torch.randn(64, 6)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    with (
        caplog.at_level("WARNING", logger="reludoctor"),
        rd.watch(model, optimizer=opt, window=2, revive=True) as doc,
    ):
        adam_steps(model, opt, x, steps=2, doc=doc)
        extra = nn.Parameter(torch.zeros(3))
        opt.add_param_group({"params": [extra], "lr": 1.0})  # the kept state has one group
        x[0, 0] = float("nan")
        adam_steps(model, opt, x, steps=1, doc=doc)
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        diverged = copy.deepcopy(model.state_dict())
        doc.step(loss=loss)  # closes the window: the rewind fails
    assert all(entry["action"] != "rewind" for entry in doc.revivals)
    assert [group["lr"] for group in opt.param_groups] == [1e-2, 1.0]
    assert "could not rewind to step 2" in caplog.text
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, diverged[name], equal_nan=True, rtol=0, atol=0)


def test_live_revival_keeps_the_high_learning_rate_scenario_alive_and_lowers_its_loss():
    with silenced_live_findings():
        plain = HighLearningRate().run()
        revived = HighLearningRate().run(revive=True)
    assert plain.report is not None and revived.report is not None
    assert 1 - revived.report.mortal_dead_fraction() >= 0.9
    assert 1 - plain.report.mortal_dead_fraction() < 0.9
    assert revived.report.windows[-1].loss_mean < plain.report.windows[-1].loss_mean
    assert revived.val_loss[-1] < plain.val_loss[-1]
    assert [a["action"] for a in revived.report.meta["revivals"]][:1] == ["rewind"]
