"""Every seed experiment yields its known causes; healthy controls yield none."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from reludoctor.scenarios import (
    REPAIR_SCENARIOS,
    SCENARIOS,
    TOY_TASKS,
    IsReluDead,
    collapsed,
    toy_task,
)

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


# -- the repair benchmarks' deep narrow networks ------------------------------------------------


@pytest.mark.parametrize("task", TOY_TASKS)
def test_toy_tasks_are_standardised_and_fixed_by_their_seed(task):
    x, y = toy_task(task, seed=3)
    again, _ = toy_task(task, seed=3)
    other, _ = toy_task(task, seed=4)
    assert x.shape == (1000, 2) and len(y) == 1000
    assert torch.equal(x, again) and not torch.equal(x, other)
    if task != "abs":  # the classification inputs are centred and scaled
        assert x.mean(0).abs().max() < 1e-5 and (x.std(0) - 1).abs().max() < 1e-5


def test_an_unknown_toy_task_is_named_with_the_choices():
    with pytest.raises(ValueError, match="unknown toy task 'spirals'; choose from circles"):
        toy_task("spirals", seed=0)


def test_a_deep_narrow_network_collapses_and_its_wide_control_learns():
    narrow = dataclasses.replace(REPAIR_SCENARIOS["narrow-circles"], seed=0)
    setup = narrow.build()
    result = narrow.run(setup=setup)
    assert collapsed(setup.model, setup.val[0])
    assert abs(narrow.metric(setup.model, setup) - narrow.chance) < 0.1
    assert result.report is not None and not result.report.healthy
    assert set(narrow.expected_symptoms) <= {f.code for f in result.report.findings}
    control = dataclasses.replace(REPAIR_SCENARIOS["control-circles"], seed=0)
    setup = control.build()
    control.run(watch=False, setup=setup)
    assert not collapsed(setup.model, setup.val[0])
    assert control.metric(setup.model, setup) > 0.95
