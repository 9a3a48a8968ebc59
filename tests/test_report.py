"""The Report: findings from the rules, lookups, and the JSON file format."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import identity_relu, plant_dead, randn_input, run_watched, train
from torch import nn

import reludoctor as rd
from reludoctor.catalogue.remedies import REMEDY_CATALOGUE as REMEDIES


def two_layer_report() -> rd.Report:
    """A run with an error layer ('1': 6 of 10 dead) and a warning layer ('3': 1 of 8)."""
    torch.manual_seed(20)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 8), nn.ReLU())
    plant_dead(model[0], [0, 2, 3, 5, 7, 9], alive_bias=0.5)
    plant_dead(model[2], [4], alive_bias=1.0, scale=0.01)
    return run_watched(model, 7, randn_input(32, 6), window=3, sample_every=2)


def dead_unit_findings(report: rd.Report) -> list[rd.Finding]:
    return [f for f in report.findings if f.code == "dead_units"]


# -- 12. the dead-units finding --------------------------------------------------------------


@pytest.mark.parametrize(
    ("units", "dead", "severity"),
    [
        (10, 4, "error"),  # exactly 40%
        (10, 3, "warning"),
        (16, 7, "error"),
        (16, 1, "warning"),
        (5, 5, "error"),
        (12, 0, None),
    ],
)
def test_dead_units_finding_severity(units, dead, severity):
    torch.manual_seed(units * 100 + dead)
    model = nn.Sequential(nn.Linear(8, units), nn.ReLU())
    planted = plant_dead(model[0], torch.randperm(units)[:dead].tolist(), alive_bias=0.5)
    steps, batch = 3, 64

    report = run_watched(model, steps, randn_input(batch, 8))

    assert report.layer("1").dead_units == planted
    if severity is None:
        assert report.findings == []
        assert report.healthy
        return
    [finding] = dead_unit_findings(report)
    assert (finding.kind, finding.code, finding.layer) == ("symptom", "dead_units", "1")
    assert finding.severity == severity
    assert report.healthy is (severity != "error")
    assert report.to_dict()["healthy"] is report.healthy
    assert finding.evidence["dead"] == dead
    assert finding.evidence["units"] == units
    assert finding.evidence["dead_units"] == planted
    assert finding.evidence["samples"] == steps * batch
    assert finding.evidence["dead_fraction"] == pytest.approx(dead / units, abs=1e-4)
    assert finding.evidence["highest_dead_preactivation"] <= 0
    assert finding.evidence["steps"] == [0, steps]
    assert f"{dead} of {units}" in finding.message
    assert finding.remedies
    assert set(finding.remedies) <= set(REMEDIES)


def test_error_threshold_is_configurable():
    torch.manual_seed(21)
    model = nn.Sequential(nn.Linear(8, 10), nn.ReLU())
    plant_dead(model[0], [1, 2, 3, 4], alive_bias=0.5)
    with rd.watch(model, thresholds=rd.Thresholds(dead_error_fraction=0.5)) as doc:
        train(model, doc, 2, randn_input(64, 8))
    [finding] = dead_unit_findings(doc.report())
    assert finding.severity == "warning"


def test_findings_per_layer_and_their_order():
    report = two_layer_report()
    dead = dead_unit_findings(report)
    assert {f.layer: f.severity for f in dead} == {"1": "error", "3": "warning"}
    severities = [f.severity for f in report.sorted_findings()]
    assert severities == sorted(severities, key=["error", "warning", "info"].index)
    assert [layer.name for layer in report.worst_layers()] == ["1", "3"]
    assert not report.healthy


@pytest.mark.parametrize("sample_every", [1, 10])
def test_rarely_firing_unit_is_not_dead(sample_every):
    """Unit 2 fires for one sample in 500 (on an unsampled step when sample_every=10)."""
    model = identity_relu(4)
    steps, batch = 5, 100

    def make_input(step):
        x = -torch.rand(batch, 4)
        x[:, 1] = 0.0  # exactly 0 is not > 0: still dead
        if step == 3:
            x[37, 2] = 0.75
        return x

    torch.manual_seed(22)
    report = run_watched(model, steps, make_input, sample_every=sample_every)

    layer = report.layer("1")
    assert layer.dead_units == [0, 1, 3]
    assert layer.max_preactivation[2] == pytest.approx(0.75)
    if sample_every == 1:
        assert layer.fire_rate == pytest.approx([0.0, 0.0, 1 / (steps * batch), 0.0], abs=1e-6)
    [finding] = dead_unit_findings(report)
    assert finding.evidence["dead_units"] == [0, 1, 3]


def test_layer_lookup_names_known_layers():
    report = two_layer_report()
    assert report.layer("3").units == 8
    with pytest.raises(KeyError, match="'1', '3'"):
        report.layer("fc9:relu")


# -- 11. JSON --------------------------------------------------------------------------------


def test_json_round_trip(tmp_path):
    report = two_layer_report()
    assert len(report.windows) == 3 and report.findings  # something in every section

    path = tmp_path / "report.json"
    returned = report.save_json(path)

    assert returned == path
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temporary left
    loaded = rd.Report.load_json(path)
    assert loaded.to_dict() == report.to_dict()
    assert loaded.layers == report.layers
    assert loaded.windows == report.windows
    assert loaded.findings == report.findings
    assert json.loads(path.read_text())["schema_version"] == report.to_dict()["schema_version"]
    assert rd.Report.from_dict(report.to_dict()).to_dict() == report.to_dict()


def test_json_round_trip_with_nonfinite_values(tmp_path):
    torch.manual_seed(23)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
    with torch.no_grad():
        model[0].weight[1] = math.nan
    with rd.watch(model, sample_every=1, window=2) as doc:
        train(model, doc, 3, randn_input(8, 4))
    report = doc.report()
    assert report.layer("1").nonfinite_units == 1

    report.save_json(tmp_path / "nan.json")
    assert rd.Report.load_json(tmp_path / "nan.json").to_dict() == report.to_dict()


def test_save_overwrites_existing_file(tmp_path):
    path = tmp_path / "r.json"
    path.write_text("old")
    report = two_layer_report()
    report.save_json(path)
    assert rd.Report.load_json(path).to_dict() == report.to_dict()
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_save_into_missing_directory_raises_and_writes_nothing(tmp_path):
    path = tmp_path / "missing" / "report.json"
    with pytest.raises(FileNotFoundError):
        two_layer_report().save_json(path)
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_newer_schema_is_refused(tmp_path):
    data = two_layer_report().to_dict()
    data["schema_version"] = 999
    path = tmp_path / "future.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="upgrade"):
        rd.Report.load_json(path)
    with pytest.raises(ValueError, match="999"):
        rd.Report.from_dict(data)


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        "",
        "[1, 2, 3]",
        "{}",
        '{"schema_version": 1, "layers": []}',
        '{"schema_version": 1, "layers": [{"name": "x"}], "windows": [], "findings": []}',
    ],
    ids=["garbage", "empty", "list", "no-version", "no-windows", "bad-layer"],
)
def test_corrupt_json_raises_value_error(tmp_path, text):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError):
        rd.Report.load_json(path)


def test_truncated_report_raises_value_error(tmp_path):
    text = two_layer_report().to_json()
    path = tmp_path / "cut.json"
    path.write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match="not valid JSON"):
        rd.Report.load_json(path)
