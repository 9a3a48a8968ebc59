"""The brief's Keras programs: diagnosed as their PyTorch twins are."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from reludoctor.api.monitor import silenced_live_findings
from reludoctor.cli import app
from reludoctor.keras.scenarios import KerasIsReluDead, KerasRandomMLP
from reludoctor.report.report import Report
from reludoctor.scenarios import IsReluDead


@pytest.mark.parametrize("hidden", [(), (16, 16, 16)], ids=["one layer", "three layers"])
def test_seed_001_gets_the_same_causes_as_in_pytorch(hidden):
    keras_report = KerasIsReluDead(samples=20_000, epochs=2, hidden=hidden).run()
    with silenced_live_findings():
        torch_report = IsReluDead(samples=20_000, epochs=2, hidden=hidden).run().report
    assert torch_report is not None
    causes = [f.code for f in keras_report.causes()]
    assert causes == [f.code for f in torch_report.causes()] == ["unnormalized_inputs"]
    codes = sorted({f.code for f in keras_report.findings})
    assert codes == sorted({f.code for f in torch_report.findings})
    assert {"dead_units", "identical_outputs", "loss_plateau"} <= set(codes)
    first = keras_report.layers[0]
    assert first.dead == first.units and first.grad_norm == 0.0


@pytest.mark.parametrize("variant", KerasRandomMLP.VARIANTS)
def test_seed_000_raises_no_false_alarm(variant):
    report = KerasRandomMLP(variant=variant).run()
    assert report.healthy and report.causes() == []
    assert len(report.layers) == 2 and all(layer.dead == 0 for layer in report.layers)
    kinds = {layer.kind for layer in report.layers}
    assert kinds == ({"leaky_relu"} if variant == "leaky_relu" else {"relu"})


def test_demo_runs_the_keras_program(tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "--framework", "keras", "--epochs", "1", "--samples", "5000", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "unnormalized_inputs" in result.output
    report = Report.load_json(out / "report.json")
    assert report.meta["framework"] == "keras" and report.layer("dense1").dead == 1
    assert (out / "report.html").exists() and list((out / "tensorboard").glob("events.*"))
    bad = CliRunner().invoke(app, ["demo", "--framework", "jax", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "pytorch or keras" in bad.output
