"""The repair autopilot: it acts on sick runs only, climbs its ladder, undoes what made the
loss worse, and says what it skipped and why."""

from __future__ import annotations

import contextlib
import dataclasses
import html
import io
import json

import pytest
import torch
from rich.console import Console
from torch import nn

import reludoctor as rd
from reludoctor.api.monitor import silenced_live_findings
from reludoctor.diagnose.rules import Observations
from reludoctor.fix.autopilot import Autopilot
from reludoctor.report.console import print_summary
from reludoctor.report.html import render_html
from reludoctor.report.report import Report
from reludoctor.report.tensorboard import diagnosis_markdown
from reludoctor.scenarios import REPAIR_SCENARIOS


def window(index: int, loss: float, spread: float) -> rd.Window:
    return rd.Window(
        index=index,
        start_step=index * 5,
        end_step=(index + 1) * 5,
        complete=True,
        layers=[],
        loss_mean=loss,
        output_spread=spread,
    )


def autopilot(model: nn.Module, optimizer) -> Autopilot:
    return Autopilot(
        model,
        optimizer,
        thresholds=rd.Thresholds(),
        observations=lambda: Observations([], []),
        example=lambda: None,  # no input seen: recycling cannot trace units
        counting_off=contextlib.nullcontext,
    )


def steps(pilot: Autopilot) -> list[tuple]:
    return [(a["action"], a.get("verdict"), "skipped" in a) for a in pilot.actions]


def test_it_climbs_the_ladder_and_undoes_what_made_the_loss_worse():
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pilot = autopilot(model, optimizer)
    pilot(window(0, loss=1.0, spread=0.0))  # collapsed: revive cannot apply, rewind does
    assert steps(pilot) == [("revive", None, True), ("rewind", None, False)]
    assert "no input batch" in pilot.actions[0]["skipped"]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01)
    pilot(window(1, loss=2.0, spread=0.0))  # worse: the rewind is undone, batch norm tried
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
    assert steps(pilot)[1:] == [("rewind", "undone", False), ("batch_norm", None, False)]
    assert isinstance(model[1], nn.BatchNorm1d) and len(optimizer.param_groups) == 2
    pilot(window(2, loss=0.5, spread=0.3))  # better and healthy: kept, nothing more
    assert steps(pilot)[-1] == ("batch_norm", "kept", False)
    assert pilot.actions[-1]["loss_before"] == 2.0 and pilot.actions[-1]["loss_after"] == 0.5
    assert len(pilot.actions) == 3


def test_a_sick_run_whose_loss_still_falls_and_a_healthy_one_are_left_alone():
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1))
    pilot = autopilot(model, torch.optim.SGD(model.parameters(), lr=0.1))
    pilot(window(0, loss=1.0, spread=0.5))
    pilot(window(1, loss=1.0, spread=0.4))  # flat, but healthy
    pilot(window(2, loss=0.5, spread=0.0))  # collapsed, but the loss halved
    assert pilot.actions == []


def test_without_a_torch_optimizer_only_recycling_is_tried_and_the_rest_is_said():
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1))
    pilot = autopilot(model, optimizer=None)
    pilot(window(0, loss=1.0, spread=0.0))
    assert [a["action"] for a in pilot.actions] == list(
        ("revive", "rewind", "batch_norm", "leaky_relu", "kaiming_init")
    )
    assert all("skipped" in a for a in pilot.actions)
    assert "needs a torch.optim optimizer (given NoneType)" in pilot.actions[1]["skipped"]
    assert isinstance(model[1], nn.ReLU)  # nothing changed


def test_watch_repair_acts_on_a_collapsing_run_and_not_on_its_control():
    reports = {}
    for name in ("narrow-circles", "control-circles"):
        scenario = dataclasses.replace(REPAIR_SCENARIOS[name], seed=0, epochs=12)
        with silenced_live_findings():
            reports[name] = scenario.run(repair=True).report
    report = reports["narrow-circles"]
    actions = report.meta["autopilot"]
    assert actions and actions[0]["action"] == "revive" and "identical" in actions[0]["evidence"]
    assert reports["control-circles"].meta["autopilot"] == []
    # every view tells what it did, and the JSON keeps it
    first = report.autopilot_lines()[0]
    assert first.startswith(f"step {actions[0]['step']}: revive (the outputs are identical")
    assert Report.from_dict(json.loads(report.to_json())).autopilot_lines() == (
        report.autopilot_lines()
    )
    buffer = io.StringIO()
    print_summary(report, Console(file=buffer, width=400))
    assert "Autopilot" in buffer.getvalue() and first in buffer.getvalue()
    assert html.escape(first, quote=False) in render_html(report)
    assert "**Autopilot**" in diagnosis_markdown(report)
    assert reports["control-circles"].autopilot_lines() == []


def test_revive_and_repair_together_are_refused():
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="revive=True or repair=True, not both"):
        rd.watch(model, optimizer=optimizer, revive=True, repair=True)


def test_a_compiled_model_gets_no_structural_change_and_is_told_why():
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1))
    pilot = Autopilot(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        thresholds=rd.Thresholds(),
        observations=lambda: Observations([], []),
        example=lambda: None,
        counting_off=contextlib.nullcontext,
        compiled=lambda: True,
    )
    pilot(window(0, loss=1.0, spread=0.0))  # revive skipped, rewind applied
    pilot(window(1, loss=2.0, spread=0.0))  # rewind undone; the structural steps are skipped
    skipped = {a["action"]: a.get("skipped") for a in pilot.actions[1:]}
    assert skipped == {
        "rewind": None,
        "batch_norm": "batch_norm would change a compiled model's graph",
        "leaky_relu": "leaky_relu would change a compiled model's graph",
        "kaiming_init": "kaiming_init would change a compiled model's graph",
    }
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear]


def test_without_losses_an_action_is_kept_and_a_nonfinite_loss_undoes_one():
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pilot = autopilot(model, optimizer)
    no_loss = dataclasses.replace(window(0, loss=1.0, spread=0.0), loss_mean=None)
    pilot(no_loss)  # rewind taken (revive cannot apply)
    pilot(dataclasses.replace(no_loss, index=1))
    assert pilot.actions[1]["verdict"].startswith("kept (no loss to judge it by")
    nonfinite = dataclasses.replace(window(2, loss=1.0, spread=0.0), loss_nonfinite=True)
    pilot(nonfinite)  # the batch norm taken at window 1 is undone
    assert [(a["action"], a.get("verdict")) for a in pilot.actions[1:3]] == [
        ("rewind", "kept (no loss to judge it by: pass loss= to doc.step)"),
        ("batch_norm", "undone"),
    ]
    assert not any(isinstance(m, nn.BatchNorm1d) for m in model.modules())


def test_under_torch_distributed_repair_is_declined_with_a_warning(monkeypatch):
    class OneRankOfTwo:  # stands in for the combiner of a real two-process run
        def __init__(self, timeout: float) -> None:
            pass

        def combine(self, snapshots, step):
            return snapshots

    monkeypatch.setattr("reludoctor.api.monitor.world", lambda: (0, 2))
    monkeypatch.setattr("reludoctor.probe.distributed.RankCombiner", OneRankOfTwo)
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(RuntimeWarning, match="does not repair under torch.distributed"):
        doc = rd.watch(model, optimizer=optimizer, repair=True)
    assert doc.autopilot is None
    doc.close()


def test_a_report_keeps_the_actions_as_they_were_when_it_was_made():
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with rd.watch(model, optimizer=optimizer, repair=True) as doc:
        doc.autopilot.actions.append({"action": "revive", "step": 5})  # as if it had acted
        report = doc.report(warn_if_empty=False)
        doc.autopilot.actions[0]["verdict"] = "kept"  # judged after the report was made
    assert report.meta["autopilot"] == [{"action": "revive", "step": 5}]
