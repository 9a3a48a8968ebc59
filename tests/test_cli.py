"""The command line: exit codes, output, and the demo end to end."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from reludoctor.cli import app
from reludoctor.report.report import Report
from tests.fixtures.models import HALF, PLANTED, half_dead_mlp, mlp, planted_mlp

runner = CliRunner()


@pytest.fixture
def probe(tmp_path):
    path = tmp_path / "probe.npy"
    np.save(path, np.random.default_rng(0).normal(size=(200, 4)).astype(np.float32))
    return path


def save_weights(tmp_path, model):
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    return path


def test_scan_exit_1_on_error_findings_with_json(tmp_path, probe):
    weights = save_weights(tmp_path, half_dead_mlp())
    args = ["scan", str(weights), "--data", str(probe), "--json"]
    result = runner.invoke(app, [*args, "--model", "tests.fixtures.models:half_dead_mlp"])
    assert result.exit_code == 1, result.output
    data = json.loads(result.stdout)
    assert data["layers"][0]["dead_units"] == sorted(HALF)
    assert data["healthy"] is False
    assert [f["severity"] for f in data["findings"] if f["code"] == "dead_units"] == ["error"]


def test_scan_exit_0_with_warning_below_error_level(tmp_path, probe):
    weights = save_weights(tmp_path, planted_mlp())
    args = ["scan", str(weights), "--data", str(probe), "--json"]
    result = runner.invoke(app, [*args, "--model", "tests.fixtures.models:planted_mlp"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["layers"][0]["dead_units"] == sorted(PLANTED)
    codes = {f["code"]: f["severity"] for f in data["findings"]}
    # the planted -1e4 biases are named as the cause, graded like the symptom they explain
    assert codes == {"dead_units": "warning", "negative_bias": "warning"}


def test_scan_exit_0_when_healthy_and_writes_report(tmp_path, probe):
    model = mlp()
    with torch.no_grad():
        model[0].bias.fill_(2.0)
    weights = save_weights(tmp_path, model)
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        [
            *("scan", str(weights), "--data", str(probe)),
            *("--model", "tests.fixtures.models:mlp", "--out", str(out), "--quiet"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "healthy" in result.output
    assert Report.load_json(out / "report.json").healthy


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["scan", "missing.pt", "--data", "PROBE"], "does not exist"),
        (["scan", "WEIGHTS", "--data", "PROBE"], "--model"),
        (["scan", "PICKLE", "--data", "PROBE"], "--trust"),
        (["scan", "WEIGHTS", "--data", "WIDE", "--model", "tests.fixtures.models:mlp"], "(5, 5)"),
    ],
)
def test_scan_bad_input_exits_2_with_one_message(tmp_path, probe, args, message):
    weights = save_weights(tmp_path, mlp())
    pickle_path = tmp_path / "whole.pt"
    torch.save(mlp(), pickle_path)
    wide = tmp_path / "wide.npy"
    np.save(wide, np.zeros((5, 5), dtype=np.float32))
    names = {"PROBE": probe, "WEIGHTS": weights, "PICKLE": pickle_path, "WIDE": wide}
    args = [str(names.get(a, a)) for a in args]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_demo_runs_end_to_end_and_finds_the_dead_layer(tmp_path):
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--out", str(out), "--epochs", "2", "--samples", "5000"])
    assert result.exit_code == 0, result.output
    assert "relu1" in result.output
    assert "dead_units" in result.output
    report = Report.load_json(out / "report.json")
    layer = report.layer("relu1")
    assert layer.dead == layer.units == 1
    assert not report.healthy
    flat = report.meta["train_loss"]
    assert flat[0] == pytest.approx(flat[-1])
    html = (out / "report.html").read_text()
    assert 'id="dead-heatmap"' in html and "relu1" in html
    assert str(out / "report.html") in "".join(result.output.split())
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0
    assert f"tensorboard --logdir {out / 'tensorboard'}" in " ".join(result.output.split())


def test_report_writes_the_html_of_a_saved_run(tmp_path):
    out = tmp_path / "demo"
    runner.invoke(app, ["demo", "--out", str(out), "--epochs", "1", "--samples", "2000", "-q"])
    (out / "report.html").unlink()
    result = runner.invoke(
        app, ["report", str(out / "report.json"), "-o", str(tmp_path / "r.html")]
    )
    assert result.exit_code == 0, result.output
    assert 'id="summary"' in (tmp_path / "r.html").read_text()
    default = runner.invoke(app, ["report", str(out / "report.json"), "-q"])
    assert default.exit_code == 0 and (out / "report.html").exists()


def test_report_bad_input_exits_2_and_writes_nothing(tmp_path):
    newer = tmp_path / "newer.json"
    newer.write_text('{"schema_version": 99, "layers": [], "windows": [], "findings": []}')
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"schema_version": 1, "layers": [{"nme": 1}]')
    broken = tmp_path / "broken.json"
    broken.write_text(
        '{"schema_version": 1, "layers": [{"nme": 1}], "windows": [], "findings": []}'
    )
    cases = [
        (tmp_path / "missing.json", "does not exist"),
        (newer, "newer than the 1 this reludoctor reads"),
        (corrupt, "is not valid JSON"),
        (broken, "corrupt reludoctor report"),
    ]
    for path, message in cases:
        result = runner.invoke(app, ["report", str(path), "-o", str(tmp_path / "out.html")])
        assert result.exit_code == 2, result.output
        assert message in " ".join(result.output.split())
        assert "Traceback" not in result.output
    assert not (tmp_path / "out.html").exists()
    good = tmp_path / "good.json"
    Report(layers=[], windows=[], findings=[]).save_json(good)
    result = runner.invoke(app, ["report", str(good), "-o", str(tmp_path / "no" / "r.html")])
    assert result.exit_code == 2 and "create it first" in " ".join(result.output.split())
    assert not (tmp_path / "no").exists()
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        result = runner.invoke(app, ["report", str(good), "-o", str(locked / "r.html")])
        if os.geteuid() != 0:  # root writes anywhere
            assert result.exit_code == 2 and "cannot write" in " ".join(result.output.split())
            assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)
    empty = runner.invoke(app, ["report", str(good), "-o", str(tmp_path / "empty.html")])
    assert empty.exit_code == 0 and "no window of steps" in " ".join(empty.output.split())


def test_demo_treat_shows_each_remedy_against_the_untreated_copy(tmp_path):
    args = ["demo", "--out", str(tmp_path), "--epochs", "1", "--samples", "20000"]
    result = runner.invoke(app, [*args, "--treat", "--treat-steps", "200"])
    assert result.exit_code == 0, result.output
    assert "Treatment: each remedy on a copy, 200 steps" in result.output
    assert "untreated" in result.output and "batch_norm" in result.output
    assert "* recommended:" in result.output
    assert "not tried (they need changes to your data or code): normalize_inputs" in result.output


def test_an_internal_error_gets_its_own_exit_code_and_one_line(tmp_path, probe, monkeypatch):
    import reludoctor.loading

    def broken(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(reludoctor.loading, "load_probe_data", broken)
    monkeypatch.delenv("RELUDOCTOR_DEBUG", raising=False)
    result = runner.invoke(app, ["scan", str(tmp_path / "w.pt"), "--data", str(probe)])
    assert result.exit_code == 3, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "internal error: RuntimeError: boom?second line" in lines[0]
    assert "Traceback" not in result.output


def test_error_messages_are_one_line_however_long_the_path(tmp_path):
    missing = tmp_path / ("x" * 150) / "report.json"
    result = runner.invoke(app, ["report", str(missing)], terminal_width=40)
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and str(missing) in result.output
