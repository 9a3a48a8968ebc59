"""Every seed experiment yields its known causes; healthy controls yield none."""

from __future__ import annotations

import pytest

from reludoctor.scenarios import SCENARIOS, IsReluDead

FAST = {"e1": {"samples": 20_000, "epochs": 3}}


def run(key: str):
    scenario = SCENARIOS[key](**FAST.get(key, {}))
    result = scenario.run()
    assert result.report is not None
    return scenario, result


@pytest.mark.parametrize("key", ["e1", "e3", "e4", "e5", "transformer-high-lr"])
def test_seed_experiment_yields_exactly_its_known_causes(key):
    scenario, result = run(key)
    report = result.report
    causes = {f.code for f in report.causes()}
    assert causes == set(scenario.expected_causes), [f.message for f in report.findings]
    symptoms = {f.code for f in report.findings if f.kind == "symptom"}
    assert set(scenario.expected_symptoms) <= symptoms
    assert not report.healthy
    # the cause's own remedies lead the ranking
    cause = report.causes()[0]
    assert report.remedies()[: len(cause.remedies)] == list(cause.remedies)


@pytest.mark.parametrize("key", ["e2", "digits-mlp", "digits-cnn", "digits-resnet", "transformer"])
def test_healthy_runs_get_no_cause_and_no_error(key):
    _, result = run(key)
    report = result.report
    assert report.causes() == []
    assert [f for f in report.findings if f.severity == "error"] == []
    assert report.healthy
    assert result.train_loss[-1] < 0.5 * result.train_loss[0]  # they do learn


def test_scenarios_are_deterministic_under_a_seed():
    first = IsReluDead(samples=5_000, epochs=1).run(watch=False)
    second = IsReluDead(samples=5_000, epochs=1).run(watch=False)
    assert first.train_loss == second.train_loss
    assert first.val_loss == second.val_loss


def test_e1_loss_stays_flat_as_the_article_observed():
    _, result = run("e1")
    assert max(result.train_loss) - min(result.train_loss) < 1e-3 * result.train_loss[0]
    layer = result.report.layers[0]
    assert layer.dead_fraction == 1.0 and layer.grad_norm == 0.0


def test_live_findings_reach_the_callback_while_training():
    seen = []
    IsReluDead(samples=20_000, epochs=3).run(on_finding=lambda f: seen.append(f.code))
    assert "identical_outputs" in seen


def test_a_transformer_trained_too_fast_loses_most_of_its_later_feed_forward_units():
    _, result = run("transformer-high-lr")
    layers = {layer.name: layer for layer in result.report.layers}
    assert list(layers) == ["encoder.layers.0.linear1:relu", "encoder.layers.1.linear1:relu"]
    later = layers["encoder.layers.1.linear1:relu"]
    assert later.dead_fraction >= 0.5 and later.start_dead_fraction == 0.0
    [cause] = result.report.causes()
    assert cause.code == "high_learning_rate"
