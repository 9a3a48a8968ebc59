"""Each rule on a case built to trigger it and on a near miss that must not; no rule raises."""

from __future__ import annotations

import math

import pytest
from conftest import layer_report
from hypothesis import given, settings
from hypothesis import strategies as st

from reludoctor.diagnose import rules
from reludoctor.diagnose.facts import InputFacts, LayerFacts, ModelFacts, OptimizerFacts
from reludoctor.diagnose.findings import Finding
from reludoctor.diagnose.rules import Observations, Unjudged, run_rules
from reludoctor.diagnose.summaries import LayerReport, Window, WindowLayer
from reludoctor.diagnose.thresholds import Thresholds

T = Thresholds()


def layer(name="fc:relu", units=10, dead=(), producer="fc", **kw) -> LayerReport:
    return layer_report(name, units, dead, producer=producer, **kw)


def window(index=0, dead_fraction=0.0, *, grads=None, curve=None, spread=0.5, **kw) -> Window:
    grads = grads or [1.0]
    layers = [
        WindowLayer(f"l{i}", 10, int(dead_fraction * 10), dead_fraction, 100, grad_norm=g)
        for i, g in enumerate(grads)
    ]
    curve = [1.0] * 8 if curve is None else curve
    return Window(
        index=index,
        start_step=index * 10,
        end_step=index * 10 + 10,
        complete=True,
        layers=layers,
        loss_mean=sum(curve) / len(curve) if curve else None,
        loss_max=max(curve) if curve else None,
        loss_curve=curve,
        output_spread=spread,
        **kw,
    )


def weights(name="fc", std=0.2, fan_in=64, out=32, constant=False, **kw) -> LayerFacts:
    return LayerFacts(name, "Linear", fan_in, out, std, 0.0, constant, constant and std == 0, **kw)


def inputs(mostly_negative=0.0, mean=0.0, std=1.0) -> InputFacts:
    return InputFacts(4, 128, 4, mean, std, 0.5, mostly_negative, mean, mean, std, std)


def findings(result) -> list[Finding]:
    return [r for r in result if isinstance(r, Finding)]


def codes(result) -> list[str]:
    return [f.code for f in findings(result)]


# -- symptoms ----------------------------------------------------------------------------------


def test_units_of_leaky_activations_are_never_called_dead():
    # a PReLU/ELU unit that is never positive still passes a gradient: stuck, not dead
    kinds = ("leaky_relu", "prelu", "elu", "selu")
    stuck = [layer(f"l{i}", dead=range(10), kind=kind) for i, kind in enumerate(kinds)]
    negative = ModelFacts(inputs=inputs(mostly_negative=1.0, mean=-0.5, std=0.3))
    death = {"dead_units", "dying_units", "unnormalized_inputs", "high_learning_rate"}
    dying = [window(i, f) for i, f in enumerate([0.0, 0.5, 1.0])]

    def found(layers):
        return {f.code for f in run_rules(Observations(layers, dying, negative), T).findings}

    assert found(stuck) & death == set()
    relu = [layer("l0", dead=range(10), start_dead_fraction=0.0)]
    assert {"dead_units", "dying_units", "unnormalized_inputs"} <= found(relu)


def test_dying_units_rising_and_near_miss():
    rising = [window(i, f) for i, f in enumerate([0.0, 0.1, 0.3])]
    [finding] = findings(rules.dying_units(Observations([], rising), T))
    assert finding.code == "dying_units" and finding.evidence["windows"] == [0, 2]
    jitter = [window(i, f) for i, f in enumerate([0.1, 0.15, 0.1])]
    assert codes(rules.dying_units(Observations([], jitter), T)) == []
    assert isinstance(rules.dying_units(Observations([], rising[:1]), T)[0], Unjudged)


def test_loss_plateau_flat_versus_learning_and_converged():
    flat = [window(0, curve=[2.0] * 8), window(1, curve=[2.0 + 0.001 * (i % 2) for i in range(8)])]
    assert codes(rules.loss_plateau(Observations([], flat), T)) == ["loss_plateau"]
    learning = [window(0, curve=[2.0 - 0.1 * i for i in range(8)])]
    assert codes(rules.loss_plateau(Observations([], learning), T)) == []
    converged = [window(0, curve=[2.0] * 8), window(1, curve=[0.5] * 8)]
    assert codes(rules.loss_plateau(Observations([], converged), T)) == []
    nan = [window(0, curve=[], loss_nonfinite=True)]
    [note] = rules.loss_plateau(Observations([], nan), T)
    assert isinstance(note, Unjudged) and "NaN" in note.reason


def test_one_window_of_losses_is_too_early_for_a_plateau():
    [note] = rules.loss_plateau(Observations([], [window(0, curve=[2.0] * 8)]), T)
    assert isinstance(note, Unjudged) and "too early" in note.reason


def test_a_noisy_flat_loss_says_its_noise_in_words():
    noisy = [window(0, curve=[2.0] * 8), window(1, curve=[2.0, 2.6, 1.5, 2.4, 1.7, 2.5, 1.6, 2.3])]
    [finding] = findings(rules.loss_plateau(Observations([], noisy), T))
    assert "within its step-to-step noise, which hides changes under" in finding.message
    assert "counts as progress" not in finding.message


def test_a_diverging_loss_is_its_own_symptom_not_a_plateau():
    # the lr=10 run: the loss swings within the last window, far above where it started
    diverging = [
        window(0, curve=[2.3, 40.0, 300.0, 250.0]),
        window(1, curve=[500.0, 150.0, 300.0, 200.0, 280.0, 240.0]),
    ]
    assert codes(rules.loss_plateau(Observations([], diverging), T)) == []
    [finding] = findings(rules.loss_diverging(Observations([], diverging), T))
    assert finding.code == "loss_diverging" and finding.severity == "error"
    assert finding.message == (
        "the loss diverges: it rose from 2.3 at the first step to about 240 now, 104 times as high"
    )
    assert finding.remedies[0] == "lower_learning_rate"
    learning = [window(0, curve=[2.3, 2.0, 1.8, 1.5]), window(1, curve=[1.4, 1.3, 1.2, 1.1])]
    assert codes(rules.loss_diverging(Observations([], learning), T)) == []


def test_identical_outputs_threshold():
    assert codes(rules.identical_outputs(Observations([], [window(spread=1e-5)]), T)) == [
        "identical_outputs"
    ]
    assert codes(rules.identical_outputs(Observations([], [window(spread=2e-3)]), T)) == []
    assert isinstance(
        rules.identical_outputs(Observations([], [window(spread=None)]), T)[0], Unjudged
    )


def test_vanishing_gradients_ratio():
    vanishing = [window(grads=[1e-6, 1e-2, 1.0])]
    assert codes(rules.vanishing_gradients(Observations([], vanishing), T)) == [
        "vanishing_gradients"
    ]
    fine = [window(grads=[0.01, 0.1, 1.0])]
    assert codes(rules.vanishing_gradients(Observations([], fine), T)) == []


def test_exploding_gradients_growth_and_nan_loss():
    growing = [window(0, grads=[1.0, 1.0]), window(1, grads=[1e4, 1.0])]
    [finding] = findings(rules.exploding_gradients(Observations([], growing), T))
    assert finding.evidence["growth"] == {"l0": 1e4}
    assert finding.message == (
        "gradients explode: the first layer's gradient norm is 10,000x the last's; "
        "gradient norms grew since the first window in l0 10,000x"
    )
    many = [window(0, grads=[1.0] * 5), window(1, grads=[1e4, 2e5, 3e6, 4e7, 1.0])]
    [finding] = findings(rules.exploding_gradients(Observations([], many), T))
    assert "in l3 4e+07x, l2 3e+06x, l1 200,000x and 1 more layers" in finding.message
    assert "{" not in finding.message
    steady = [window(0, grads=[1.0, 1.0]), window(1, grads=[50.0, 1.0])]
    assert codes(rules.exploding_gradients(Observations([], steady), T)) == []
    nan = [window(0, grads=[1.0]), window(1, grads=[1.0], loss_nonfinite=True)]
    assert codes(rules.exploding_gradients(Observations([], nan), T)) == ["exploding_gradients"]


# -- causes ------------------------------------------------------------------------------------


def test_zero_init_constant_weights_only():
    zero = ModelFacts(layers=[weights(std=0.0, constant=True)])
    assert codes(rules.zero_init(Observations([], [], zero), T)) == ["zero_init"]
    small = ModelFacts(layers=[weights(std=1e-4)])
    assert codes(rules.zero_init(Observations([], [], small), T)) == []


def test_poor_init_scale_several_times_off_but_not_pytorch_default():
    he = math.sqrt(2 / 64)
    off = ModelFacts(layers=[weights(std=he / 10)])
    assert codes(rules.poor_init_scale(Observations([layer()], [], off), T)) == ["poor_init_scale"]
    default = ModelFacts(layers=[weights(std=1 / math.sqrt(3 * 64))])  # 0.41x He
    assert codes(rules.poor_init_scale(Observations([layer()], [], default), T)) == []


def test_poor_init_scale_signal_through_depth():
    shrinking = [layer(f"a{i}", producer=f"f{i}", start_preact_std=10.0**-i) for i in range(4)]
    assert codes(rules.poor_init_scale(Observations(shrinking, [], ModelFacts()), T)) == []
    facts = ModelFacts(layers=[weights(name="f0")])
    assert codes(rules.poor_init_scale(Observations(shrinking, [], facts), T)) == [
        "poor_init_scale"
    ]
    steady = [layer(f"a{i}", producer=f"f{i}", start_preact_std=1.0) for i in range(4)]
    assert codes(rules.poor_init_scale(Observations(steady, [], facts), T)) == []


def test_negative_bias_needs_most_dead_units_held():
    held = layer(dead=[1, 2, 3], bias_held_units=[1, 2, 3])
    assert codes(rules.negative_bias(Observations([held], []), T)) == ["negative_bias"]
    [finding] = findings(rules.negative_bias(Observations([held], []), T))
    assert finding.message.startswith("all 3 dead units of fc:relu are held below 0 by a")
    most = layer(dead=[1, 2, 3], bias_held_units=[1, 2])
    [finding] = findings(rules.negative_bias(Observations([most], []), T))
    assert finding.message.startswith("2 of the 3 dead units of fc:relu are held below 0")
    few = layer(dead=[1, 2, 3], bias_held_units=[1])
    assert codes(rules.negative_bias(Observations([few], []), T)) == []
    assert isinstance(rules.negative_bias(Observations([layer()], []), T)[0], Unjudged)


def test_a_cause_of_death_is_named_only_when_the_deaths_matter():
    # a healthy, sparsely firing layer: 1 of 50 units silent, held by its (negative) bias
    sparse = layer(dead=[7], units=50, bias_held_units=[7])
    assert codes(rules.negative_bias(Observations([sparse], []), T)) == []
    many = layer(dead=range(5), units=50, bias_held_units=list(range(5)))  # 10%
    assert codes(rules.negative_bias(Observations([many], []), T)) == ["negative_bias"]
    lower = rules.Thresholds(cause_min_dead_fraction=0.01)
    assert codes(rules.negative_bias(Observations([sparse], []), lower)) == ["negative_bias"]


def test_high_learning_rate_needs_deaths_and_large_updates():
    died = layer(dead=range(8), start_dead_fraction=0.0)
    big = [window(0)]
    big[0].layers[0].update_ratio = 3.0
    sgd = ModelFacts(optimizer=OptimizerFacts("SGD", [10.0], 1, False))
    [finding] = findings(rules.high_learning_rate(Observations([died], big, sgd), T))
    assert finding.evidence["largest_update_ratio"] == 3.0
    assert finding.evidence["learning_rates"] == [10.0]
    small = [window(0)]
    small[0].layers[0].update_ratio = 0.01
    assert codes(rules.high_learning_rate(Observations([died], small, sgd), T)) == []
    born_dead = layer(dead=range(8), start_dead_fraction=0.8)
    assert codes(rules.high_learning_rate(Observations([born_dead], big, sgd), T)) == []
    unmeasured = rules.high_learning_rate(Observations([died], [window(0)], sgd), T)
    assert isinstance(unmeasured[0], Unjudged)


def test_unnormalized_inputs_need_dead_first_layer():
    negative = ModelFacts(inputs=inputs(mostly_negative=1.0, mean=-0.5, std=0.3))
    dead_first = [layer(dead=range(10)), layer("b")]
    assert codes(rules.unnormalized_inputs(Observations(dead_first, [], negative), T)) == [
        "unnormalized_inputs"
    ]
    alive_first = [layer(), layer("b", dead=range(10))]
    assert codes(rules.unnormalized_inputs(Observations(alive_first, [], negative), T)) == []
    centred = ModelFacts(inputs=inputs())
    assert codes(rules.unnormalized_inputs(Observations(dead_first, [], centred), T)) == []


def test_deep_without_normalization_needs_depth_no_help_and_damage():
    deep = [layer(f"a{i}", dead=range(6) if i > 5 else ()) for i in range(8)]
    plain = ModelFacts(norm_layers=0, residual_adds=0)
    assert codes(rules.deep_without_normalization(Observations(deep, [], plain), T)) == [
        "deep_without_normalization"
    ]
    normed = ModelFacts(norm_layers=8, residual_adds=0)
    assert codes(rules.deep_without_normalization(Observations(deep, [], normed), T)) == []
    residual = ModelFacts(norm_layers=0, residual_adds=4)
    assert codes(rules.deep_without_normalization(Observations(deep, [], residual), T)) == []
    healthy = [layer(f"a{i}") for i in range(8)]
    assert codes(rules.deep_without_normalization(Observations(healthy, [], plain), T)) == []


def test_causes_grade_like_their_symptoms_and_lead_the_remedies():
    held = layer(dead=[1], units=10, bias_held_units=[1])  # 10% dead: a warning
    diagnosis = run_rules(Observations([held], []))
    by_code = {f.code: f for f in diagnosis.findings}
    assert by_code["negative_bias"].severity == "warning"
    assert by_code["dead_units"].remedies[0] == rules.CAUSE_REMEDIES["negative_bias"][0]


def test_missing_optimizer_single_step_and_no_layers_are_reported_not_raised():
    diagnosis = run_rules(Observations([], [window(0, curve=[1.0])]))
    unjudged = {u.code for u in diagnosis.unjudged}
    assert {"dying_units", "loss_plateau", "zero_init", "high_learning_rate"} <= unjudged
    assert diagnosis.findings == []


# -- property: no rule raises ------------------------------------------------------------------

finite = st.floats(-1e6, 1e6, allow_nan=False)
anything = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True))


@st.composite
def observations(draw):
    n_layers = draw(st.integers(0, 4))
    layers_ = []
    for i in range(n_layers):
        units = draw(st.integers(1, 6))
        dead = sorted(draw(st.sets(st.integers(0, units - 1))))
        layers_.append(
            layer(
                f"a{i}",
                units=units,
                dead=dead,
                producer=draw(st.sampled_from([f"f{i}", None])),
                start_dead_fraction=draw(st.one_of(st.none(), st.floats(0, 1))),
                start_preact_std=draw(anything),
                bias_held_units=draw(st.one_of(st.none(), st.just(dead))),
                kind=draw(st.sampled_from(["relu", "leaky_relu", "prelu", "selu"])),
            )
        )
    windows = []
    for w in range(draw(st.integers(0, 4))):
        curve = draw(st.lists(finite, max_size=16))
        win = window(
            w,
            draw(st.floats(0, 1)),
            grads=draw(st.lists(anything, min_size=1, max_size=4)),
            curve=curve,
            spread=draw(anything),
            loss_nonfinite=draw(st.booleans()),
        )
        win.complete = draw(st.booleans())
        for wl in win.layers:
            wl.update_ratio = draw(anything)
        windows.append(win)
    facts = ModelFacts(
        layers=[
            weights(f"f{i}", std=draw(st.floats(0, 10)), fan_in=draw(st.integers(0, 300)))
            for i in range(draw(st.integers(0, 3)))
        ],
        norm_layers=draw(st.integers(0, 2)),
        residual_adds=draw(st.one_of(st.none(), st.integers(0, 2))),
        optimizer=draw(st.one_of(st.none(), st.just(OptimizerFacts("SGD", [0.1, 1.0], 2, False)))),
        inputs=draw(st.one_of(st.none(), st.builds(inputs, st.floats(0, 1), finite, finite))),
    )
    return Observations(layers_, windows, facts)


@settings(max_examples=200, deadline=None)
@given(observations())
@pytest.mark.parametrize("rule", rules.RULES, ids=lambda r: r.__name__)
def test_no_rule_raises_on_arbitrary_history(rule, obs):
    for result in rule(obs, T):
        assert isinstance(result, (Finding, Unjudged))


def test_remedies_fit_the_activation_and_the_evidence_about_the_rate():
    collapsed = [window(0, spread=1e-5)]
    gelu = [layer(f"a{i}:gelu", kind="gelu") for i in range(3)]
    [finding] = [f for f in run_rules(Observations(gelu, collapsed)).findings]
    assert finding.code == "identical_outputs"
    assert not set(finding.remedies) & (rules.RECTIFIER_REMEDIES | {"lower_learning_rate"})
    relu = [layer("a0:relu", dead=range(3))]
    by_code = {f.code: f for f in run_rules(Observations(relu, collapsed)).findings}
    assert "kaiming_init" in by_code["identical_outputs"].remedies  # ReLU units: they fit
    assert "lower_learning_rate" not in by_code["dead_units"].remedies  # nothing on the rate
    rate = [window(0, spread=1e-5, curve=[2.0, 2.0]), window(1, curve=[9.0, 9.0])]
    by_code = {f.code: f for f in run_rules(Observations(relu, rate)).findings}
    assert "loss_diverging" in by_code
    assert "lower_learning_rate" in by_code["dead_units"].remedies
