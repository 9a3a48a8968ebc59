"""Rules: pure functions from what was observed (history + facts) to findings.

Each rule reads :class:`Observations` only - never the model, and never a scenario's label -
and returns findings, or an :class:`Unjudged` note when it lacked what it needed. A cause is
named only with evidence that it acted in this run; every threshold is a named, overridable
constant in :class:`Thresholds` with a comment on where its value comes from.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from reludoctor.catalogue.activations import he_gain
from reludoctor.catalogue.remedies import (
    CAUSE_REMEDIES,
    RATE_REMEDIES,
    RECTIFIER_REMEDIES,
    SYMPTOM_REMEDIES,
)
from reludoctor.diagnose.facts import LayerFacts, ModelFacts
from reludoctor.diagnose.findings import Finding
from reludoctor.diagnose.summaries import LayerReport, Window
from reludoctor.diagnose.thresholds import Thresholds
from reludoctor.text import counted

#: How many unit indices a finding quotes as evidence (the report holds all of them).
EVIDENCE_UNITS = 20


@dataclass(frozen=True)
class Unjudged:
    """A rule that could not decide, and why."""

    code: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class Observations:
    """What the rules see: the layer summaries, the window history and the facts."""

    layers: list[LayerReport]
    windows: list[Window]
    facts: ModelFacts = field(default_factory=ModelFacts)
    #: What the monitor could not see: ``{"module": name, "reason": why}`` each.
    blind_spots: list[dict[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Diagnosis:
    findings: list[Finding]
    unjudged: list[Unjudged]


Result = list[Finding | Unjudged]
Rule = Callable[[Observations, Thresholds], Result]

# -- helpers -----------------------------------------------------------------------------------


def _span(windows: Sequence[Window]) -> list[int] | None:
    return [windows[0].start_step, windows[-1].end_step] if windows else None


def _symptom(
    code: str, severity: str, layer: str | None, message: str, evidence: dict[str, Any]
) -> Finding:
    return Finding("symptom", code, severity, layer, message, evidence, SYMPTOM_REMEDIES[code])  # type: ignore[arg-type]


def _cause(code: str, layer: str | None, message: str, evidence: dict[str, Any]) -> Finding:
    return Finding("cause", code, "error", layer, message, evidence, CAUSE_REMEDIES[code])


# -- symptoms ----------------------------------------------------------------------------------


def dead_units(obs: Observations, t: Thresholds) -> Result:
    """One finding per layer with units that never fired over the report's final span."""
    findings: Result = []
    for layer in obs.layers:
        if not layer.dead or not layer.can_die:
            continue
        severity = "error" if layer.dead_fraction >= t.dead_error_fraction else "warning"
        evidence: dict[str, Any] = {
            "dead": layer.dead,
            "units": layer.units,
            "dead_fraction": round(layer.dead_fraction, 4),
            "dead_units": layer.dead_units[:EVIDENCE_UNITS],
            "samples": layer.samples if layer.inputs is None else layer.inputs,
            "positions": layer.samples,
            "steps": _span(obs.windows),
        }
        if layer.max_preactivation is not None:
            margins = [layer.max_preactivation[u] for u in layer.dead_units]
            finite = [m for m in margins if m is not None]
            if finite:
                evidence["highest_dead_preactivation"] = max(finite)
        if layer.zero_grad_units is not None:
            evidence["zero_gradient_units"] = len(layer.zero_grad_units)
        message = (
            f"{layer.dead} of {layer.units} units ({layer.dead_fraction:.0%}) in {layer.name} "
            f"never had a positive pre-activation over {_samples(layer)}"
        )
        if layer.zero_grad_units:
            message += f"; {len(layer.zero_grad_units)} got exactly zero gradient"
        if severity == "error":
            message += f"; at {t.dead_error_fraction:.0%} or more, training suffers"
        findings.append(_symptom("dead_units", severity, layer.name, message, evidence))
    return findings


def nonfinite_values(obs: Observations, t: Thresholds) -> Result:
    """One finding per layer whose pre-activations held NaN or +inf: those values count
    neither as firing nor as silence, so the layer's counts cover its finite values only."""
    findings: Result = []
    for layer in obs.layers:
        if not layer.nonfinite_units:
            continue
        first = layer.nonfinite_first_step
        message = (
            f"{layer.nonfinite_units} of {layer.units} units in {layer.name} had NaN or "
            "infinite pre-activations"
            + (f", first in step {first}" if first is not None else "")
            + "; reludoctor judged them on their finite values only (a unit with none is "
            "not called dead). Look for NaN or infinity in the inputs, or for a learning "
            "rate that makes the weights blow up"
        )
        evidence = {
            "nonfinite_units": layer.nonfinite_units,
            "units": layer.units,
            "first_step": first,
            "samples": layer.samples,
        }
        findings.append(_symptom("nonfinite_values", "error", layer.name, message, evidence))
    return findings


def unwatched_activations(obs: Observations, t: Thresholds) -> Result:
    """What the monitor could not see: the report cannot vouch for it, so it is not healthy."""
    if not obs.blind_spots:
        return []
    reasons = "; ".join(f"{spot['module']}: {spot['reason']}" for spot in obs.blind_spots)
    message = (
        f"reludoctor could not watch {len(obs.blind_spots)} part(s) of the model, so this report "
        f"cannot say they are healthy - {reasons}"
    )
    evidence = {"unwatched": list(obs.blind_spots)}
    return [Finding("coverage", "unwatched_activations", "error", None, message, evidence)]


def _samples(layer: LayerReport) -> str:
    """How many samples a layer's units saw, in words (with the positions of each sample)."""
    if layer.inputs and layer.inputs != layer.samples:
        each = layer.samples / layer.inputs
        per = f"{each:.0f}" if each == int(each) else f"{each:.1f} on average"
        return f"{layer.inputs} samples ({per} positions each)"
    return f"{layer.samples} samples"


def dying_units(obs: Observations, t: Thresholds) -> Result:
    """A layer's dead fraction rising window over window."""
    windows = [w for w in obs.windows if w.complete]
    if len(windows) < 2:
        return [Unjudged("dying_units", "fewer than two complete windows to compare")]
    findings: Result = []
    leaky = {layer.name for layer in obs.layers if not layer.can_die}
    for index, name in enumerate(wl.name for wl in windows[-1].layers):
        if name in leaky:
            continue
        series = [w.layers[index].dead_fraction for w in windows if index < len(w.layers)]
        recent = series[-3:]
        rise = recent[-1] - min(recent)
        rising = all(b >= a - 1e-9 for a, b in itertools.pairwise(recent))
        if rise >= t.dying_rise and rising and recent[-1] > recent[0]:
            severity = "error" if recent[-1] >= t.dead_error_fraction else "warning"
            first = len(windows) - len(recent)
            findings.append(
                _symptom(
                    "dying_units",
                    severity,
                    name,
                    f"units in {name} are dying: dead fraction rose from {recent[0]:.0%} to "
                    f"{recent[-1]:.0%} over the last {len(recent)} windows",
                    {
                        "dead_fraction_by_window": [round(v, 4) for v in series],
                        "windows": [first, len(windows) - 1],
                        "steps": [windows[first].start_step, windows[-1].end_step],
                    },
                )
            )
    return findings


def _loss_windows(obs: Observations, code: str) -> list[Window] | Unjudged:
    """The windows with finite losses recorded, or why there are none."""
    windows = [w for w in obs.windows if w.loss_curve]
    if windows:
        return windows
    reason = "no finite losses recorded (pass loss= to doc.step)"
    if any(w.loss_nonfinite for w in obs.windows):
        reason = "the losses are NaN or infinite"
    return Unjudged(code, reason)


def loss_plateau(obs: Observations, t: Thresholds) -> Result:
    """The loss stopped improving over the last window without ever having improved."""
    windows = _loss_windows(obs, "loss_plateau")
    if isinstance(windows, Unjudged):
        return [windows]
    if len(windows) < 2:
        return [Unjudged("loss_plateau", "one window of losses: too early to call a plateau")]
    last = windows[-1]
    curve = last.loss_curve
    if len(curve) < 4:
        return [Unjudged("loss_plateau", "the last window has too few steps to judge a trend")]
    half = len(curve) // 2
    early, late = curve[:half], curve[half:]
    scale = max(abs(statistics.fmean(early)), 1e-12)
    improvement = (statistics.fmean(early) - statistics.fmean(late)) / scale
    noise = statistics.pstdev(curve) / math.sqrt(half) / scale
    start = windows[0].loss_curve[0]
    overall = (start - statistics.fmean(late)) / max(abs(start), 1e-12)
    if statistics.fmean(late) <= 1e-8 * max(abs(start), 1.0):
        return []  # the loss reached ~0: converged
    if -overall >= t.diverging_rise:
        return []  # not a plateau: loss_diverging says it
    bar = max(t.plateau_improvement, 2 * noise)
    flat = abs(improvement) < bar  # rising is not flat
    if not flat or overall >= t.plateau_learned:
        return []
    if bar > t.plateau_improvement:
        within = f"within its step-to-step noise, which hides changes under {bar:.1%}"
    else:
        within = f"under the {bar:.1%} that counts as progress"
    return [
        _symptom(
            "loss_plateau",
            "warning",
            None,
            f"the loss stopped improving: it {_change(improvement)} over the last window "
            f"({within}) and {_change(overall)} since the first step; now near "
            f"{statistics.fmean(late):.4g}",
            {
                "improvement_last_window": round(improvement, 5),
                "improvement_since_start": round(overall, 5),
                "loss_start": start,
                "loss_now": statistics.fmean(late),
                "steps": [last.start_step, last.end_step],
            },
        )
    ]


def loss_diverging(obs: Observations, t: Thresholds) -> Result:
    """The loss rose far above where it started: the run diverges."""
    windows = _loss_windows(obs, "loss_diverging")
    if isinstance(windows, Unjudged):
        return [windows]
    start = windows[0].loss_curve[0]
    curve = windows[-1].loss_curve
    now = statistics.fmean(curve[len(curve) // 2 :])
    if start <= 0 or now < start * (1 + t.diverging_rise):
        return []
    return [
        _symptom(
            "loss_diverging",
            "error",
            None,
            f"the loss diverges: it rose from {start:.4g} at the first step to about {now:.4g} "
            f"now, {now / start:.3g} times as high",
            {"loss_start": start, "loss_now": now, "steps": _span(obs.windows)},
        )
    ]


def _change(improvement: float) -> str:
    """A relative improvement in words: "fell 3.1%", "rose 12.0%"."""
    return f"{'fell' if improvement >= 0 else 'rose'} {abs(improvement):.1%}"


def identical_outputs(obs: Observations, t: Thresholds) -> Result:
    """The network gives (nearly) the same output whatever the input."""
    measured = [w for w in obs.windows if w.output_spread is not None]
    if not measured:
        return [Unjudged("identical_outputs", "no sampled forward with a batch of 2 or more")]
    last = measured[-1]
    if not identical_window(last, t):
        return []
    return [
        _symptom(
            "identical_outputs",
            "error",
            None,
            f"the network's outputs are nearly identical across inputs (spread "
            f"{last.output_spread:.2g} of their size): it no longer depends on its input",
            {"output_spread": last.output_spread, "steps": [last.start_step, last.end_step]},
        )
    ]


def identical_window(w: Window, t: Thresholds) -> bool:
    """Whether the window's outputs were (nearly) the same for every input of a batch: their
    spread below ``identical_spread`` of their size."""
    return w.output_spread is not None and w.output_spread < t.identical_spread


def _grad_windows(obs: Observations) -> list[Window]:
    """The windows in which some layer's gradient was measured."""
    return [w for w in obs.windows if any(wl.grad_norm is not None for wl in w.layers)]


def vanishing_gradients(obs: Observations, t: Thresholds) -> Result:
    """Gradients reaching the earliest layer are a tiny fraction of the latest layer's."""
    windows = _grad_windows(obs)
    if not windows:
        return [Unjudged("vanishing_gradients", "no gradient was measured (no backward seen)")]
    norms = [(wl.name, wl.grad_norm) for wl in windows[-1].layers if wl.grad_norm is not None]
    if len(norms) < 2:
        return [Unjudged("vanishing_gradients", "fewer than two layers with gradients")]
    (first_name, first), (last_name, last) = norms[0], norms[-1]
    if last <= 0 or first / last >= t.vanishing_ratio:
        return []
    return [
        _symptom(
            "vanishing_gradients",
            "warning",
            first_name,
            f"gradients vanish towards the input: {first_name} gets {first:.2g}, "
            f"{first / last:.1e} of what {last_name} gets ({last:.2g})",
            {
                "grad_norms": {name: norm for name, norm in norms},
                "ratio": first / last,
                "steps": [windows[-1].start_step, windows[-1].end_step],
            },
        )
    ]


def exploding_gradients(obs: Observations, t: Thresholds) -> Result:
    """Gradient norms non-finite, growing fast across windows, or blowing up towards the input."""
    windows = _grad_windows(obs)
    nonfinite = [w for w in obs.windows if w.loss_nonfinite]
    if not windows and not nonfinite:
        return [Unjudged("exploding_gradients", "no gradient was measured (no backward seen)")]
    evidence: dict[str, Any] = {}
    layer = None
    if windows:
        last = windows[-1]
        norms = [(wl.name, wl.grad_norm) for wl in last.layers if wl.grad_norm is not None]
        if len(norms) >= 2 and norms[-1][1] > 0 and norms[0][1] / norms[-1][1] > t.exploding_ratio:
            layer = norms[0][0]
            evidence["ratio_first_to_last"] = norms[0][1] / norms[-1][1]
        first = windows[0]
        for index, wl in enumerate(last.layers):
            start = first.layers[index].grad_norm if index < len(first.layers) else None
            if start and wl.grad_norm and wl.grad_norm / start > t.exploding_ratio:
                layer = layer or wl.name
                evidence.setdefault("growth", {})[wl.name] = wl.grad_norm / start
    if nonfinite:
        evidence["nonfinite_loss_windows"] = [w.index for w in nonfinite]
    if not evidence:
        return []
    return [
        _symptom(
            "exploding_gradients",
            "error",
            layer,
            f"gradients explode: {_explosion(evidence)}",
            {**evidence, "steps": _span(obs.windows)},
        )
    ]


def _explosion(evidence: dict[str, Any]) -> str:
    """The exploding-gradient evidence in words: the worst layers first, rounded."""
    parts = []
    if "ratio_first_to_last" in evidence:
        ratio = _times(evidence["ratio_first_to_last"])
        parts.append(f"the first layer's gradient norm is {ratio} the last's")
    growth = sorted(evidence.get("growth", {}).items(), key=lambda item: -item[1])
    if growth:
        worst = ", ".join(f"{name} {_times(factor)}" for name, factor in growth[:3])
        more = f" and {len(growth) - 3} more layers" if len(growth) > 3 else ""
        parts.append(f"gradient norms grew since the first window in {worst}{more}")
    if "nonfinite_loss_windows" in evidence:
        windows = evidence["nonfinite_loss_windows"]
        parts.append(f"the loss was NaN or infinite in {counted(len(windows), 'window')}")
    return "; ".join(parts)


def _times(factor: float) -> str:
    """A large factor, readable: "12,000x", "3.4e+07x"."""
    return f"{factor:,.0f}x" if factor < 1e6 else f"{factor:.2g}x"


# -- causes ------------------------------------------------------------------------------------


def zero_init(obs: Observations, t: Thresholds) -> Result:
    """A layer started with all-zero or constant weights: its units cannot differ."""
    if not obs.facts.layers:
        return [Unjudged("zero_init", "no Linear or Conv layer to read weights from")]
    findings: Result = []
    for layer in obs.facts.layers:
        if layer.constant and layer.fan_in * layer.out_features > 1:
            what = "all zero" if layer.all_zero else f"all equal to {layer.weight_mean:.3g}"
            findings.append(
                _cause(
                    "zero_init",
                    layer.name,
                    f"{layer.name} started with weights {what}: every unit computes the same "
                    "thing, and with zeros no input can move its pre-activation above 0",
                    {"weight_std": layer.weight_std, "weight_mean": layer.weight_mean},
                )
            )
    return findings


def _activation_of(obs: Observations, module: str) -> LayerReport | None:
    for layer in obs.layers:
        if layer.producer == module:
            return layer
    return None


def poor_init_scale(obs: Observations, t: Thresholds) -> Result:
    """Weights several times off the He scale, or a start that shrinks/blows up the signal."""
    if not obs.facts.layers:
        return [Unjudged("poor_init_scale", "no Linear or Conv layer to read weights from")]
    findings: Result = []
    ratios = {}
    for facts in obs.facts.layers:
        activation = _activation_of(obs, facts.name)
        if activation is None or facts.constant:
            continue
        ratio = facts.he_ratio(activation.kind)
        if ratio is None or facts.fan_in * facts.out_features < t.init_scale_min_weights:
            continue
        ratios[facts.name] = ratio
        he_std = he_gain(activation.kind) / math.sqrt(facts.fan_in)
        if ratio > t.init_scale_off or ratio < 1 / t.init_scale_off:
            findings.append(
                _cause(
                    "poor_init_scale",
                    facts.name,
                    f"{facts.name} started with weights {ratio:.2g}x the He scale "
                    f"(std {facts.weight_std:.3g} against {he_std:.3g})",
                    {"he_ratio": ratio, "weight_std": facts.weight_std, "fan_in": facts.fan_in},
                )
            )
    stds = [lay.start_preact_std for lay in obs.layers if lay.start_preact_std]
    if len(stds) >= 3 and not findings:
        change = stds[-1] / stds[0]
        if change < 1 / t.depth_signal_change or change > t.depth_signal_change:
            direction = "shrinks" if change < 1 else "grows"
            factor = max(change, 1 / change) if change > 0 else math.inf
            findings.append(
                _cause(
                    "poor_init_scale",
                    None,
                    f"at the start the signal {direction} {factor:.3g}x from "
                    f"the first to the last of {len(stds)} activation layers: the weights' "
                    "scale does not preserve it",
                    {
                        "preactivation_std_first": stds[0],
                        "preactivation_std_last": stds[-1],
                        "he_ratio": {k: round(v, 3) for k, v in ratios.items()},
                    },
                )
            )
    return findings


def negative_bias(obs: Observations, t: Thresholds) -> Result:
    """Dead units whose input term did reach above 0, held below it by a negative shift:
    a Linear/Conv bias, or a normalisation layer's beta (``negative_norm_shift``)."""
    findings: Result = []
    judged = False
    for layer in obs.layers:
        if layer.bias_held_units is None:
            continue
        judged = True
        held = layer.bias_held_units
        if not (layer.can_die and held) or len(held) < t.negative_bias_share * layer.dead:
            continue
        if layer.dead_fraction < t.cause_min_dead_fraction:
            continue
        evidence = {"held_units": held[:EVIDENCE_UNITS], "held": len(held), "dead": layer.dead}
        if layer.held_by in ("norm_shift", "running_stats"):
            findings.append(_norm_shift_cause(layer, evidence))
            continue
        findings.append(
            _cause(
                "negative_bias",
                layer.name,
                f"{_held(len(held), layer.dead, layer.name)} below 0 by a negative bias: "
                "without it their input term did reach above 0",
                _bias_evidence(obs.facts.layer(layer.producer), evidence),
            )
        )
    if not judged:
        return [
            Unjudged(
                "negative_bias",
                "no activation is fed directly by a layer with a bias or a normalisation shift",
            )
        ]
    return findings


def _held(held: int, dead: int, layer: str) -> str:
    """Which of a layer's dead units are held, in words: "the only dead unit of fc:relu is
    held", "all 4 dead units of fc:relu are held", "3 of the 5 dead units of ... are held"."""
    if dead == 1:
        return f"the only dead unit of {layer} is held"
    if held == dead:
        return f"all {dead} dead units of {layer} are held"
    return f"{held} of the {dead} dead units of {layer} are held"


def _norm_shift_cause(layer: LayerReport, evidence: dict[str, Any]) -> Finding:
    """``negative_norm_shift``: a normalisation layer's shift holds dead units below 0."""
    producer = layer.producer or "the normalisation layer"
    mean = layer.held_shift_mean
    evidence = {**evidence, "producer": producer}
    if mean is not None:
        evidence["shift_mean"] = round(mean, 4)
    if layer.start_preact_mean is not None and layer.start_preact_std:
        ratio = layer.start_preact_mean / layer.start_preact_std
        evidence["start_preact_mean_in_std"] = round(ratio, 2)
    if layer.held_by == "running_stats":
        what = (
            f"the running statistics of {producer} (in eval mode its shift, beta - gamma * "
            f"running mean / running std, averages {mean:.3g} over them)"
        )
    else:
        what = f"the shift (bias, beta) of {producer}, {mean:.3g} on average over them"
    return _cause(
        "negative_norm_shift",
        layer.name,
        f"{_held(evidence['held'], layer.dead, layer.name)} below 0 by {what}: without it "
        "their normalised input did reach above 0",
        evidence,
    )


def _bias_evidence(producer: LayerFacts | None, evidence: dict[str, Any]) -> dict[str, Any]:
    """``evidence`` plus the producer's bias statistics, where they were read."""
    if producer is not None:
        for key in ("bias_negative_share", "bias_mean", "bias_mean_in_preact_std"):
            value = getattr(producer, key)
            if value is not None:
                evidence[key] = value
    return evidence


def high_learning_rate(obs: Observations, t: Thresholds) -> Result:
    """Units alive at the start died, in windows with large updates or loss spikes."""
    died = [
        lay
        for lay in obs.layers
        if lay.can_die
        and lay.start_dead_fraction is not None
        and lay.dead_fraction - lay.start_dead_fraction >= t.died_during_training
    ]
    windows = obs.windows
    ratios = [
        (w, wl.name, wl.update_ratio)
        for w in windows
        for wl in w.layers
        if wl.update_ratio is not None
    ]
    spikes = [w for w in windows if _loss_spiked(w, t)]
    if not ratios and not spikes:
        return [
            Unjudged(
                "high_learning_rate",
                "no update size was measured (no optimizer step between sampled steps)",
            )
        ]
    if not died:
        return []
    large = [(w, name, r) for w, name, r in ratios if r >= t.high_update_ratio]
    if not large and not spikes:
        return []
    evidence: dict[str, Any] = {
        "died": {lay.name: [lay.start_dead_fraction, round(lay.dead_fraction, 4)] for lay in died}
    }
    if large:
        w, name, r = max(large, key=lambda item: item[2])
        evidence.update(largest_update_ratio=r, layer_of_largest=name, window=w.index)
    if spikes:
        evidence["loss_spike_windows"] = [w.index for w in spikes]
    rates = obs.facts.optimizer.learning_rates if obs.facts.optimizer else None
    if rates:
        evidence["learning_rates"] = rates
    worst = max(died, key=lambda lay: lay.dead_fraction - (lay.start_dead_fraction or 0))
    update = (
        f"updates reached {evidence['largest_update_ratio']:.2g}x the weights' size in one step"
        if large
        else "the loss spiked"
    )
    return [
        _cause(
            "high_learning_rate",
            worst.name,
            f"units died during training ({worst.name}: {worst.start_dead_fraction:.0%} dead "
            f"on the first batch, {worst.dead_fraction:.0%} now) and {update}: the learning "
            "rate throws units into the negative region",
            evidence,
        )
    ]


def _loss_spiked(w: Window, t: Thresholds) -> bool:
    return w.loss_nonfinite or bool(
        w.loss_max and w.loss_curve and w.loss_max > t.loss_spike * _median(w.loss_curve)
    )


def unstable_window(w: Window, t: Thresholds) -> bool:
    """The loss spiked or went non-finite, or a layer's update reached ``high_update_ratio``
    of its weights in one step: not a state worth returning to."""
    return _loss_spiked(w, t) or any(
        wl.update_ratio is not None and wl.update_ratio >= t.high_update_ratio for wl in w.layers
    )


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def unnormalized_inputs(obs: Observations, t: Thresholds) -> Result:
    """Inputs mostly negative or far off centre, and the first layer's units dead."""
    inputs = obs.facts.inputs
    if inputs is None:
        return [Unjudged("unnormalized_inputs", "no floating input batch was seen")]
    negative = inputs.mostly_negative_features >= t.negative_inputs_share
    off_centre = abs(inputs.mean) > t.off_centre * max(inputs.std, 1e-12)
    if not (negative or off_centre):
        return []
    first = obs.layers[0] if obs.layers else None  # layers come in forward order
    if first is None or not first.can_die or not first.dead:
        return []
    what = (
        f"{inputs.mostly_negative_features:.0%} of input features are negative in 99% of samples"
        if negative
        else f"the inputs' mean {inputs.mean:.3g} is "
        f"{abs(inputs.mean) / max(inputs.std, 1e-12):.1f} stds from 0"
    )
    return [
        _cause(
            "unnormalized_inputs",
            first.name,
            f"{what}, and {first.dead_fraction:.0%} of {first.name}'s units, the first to see "
            "them, are dead",
            {
                "input_mean": inputs.mean,
                "input_std": inputs.std,
                "negative_share": inputs.negative_share,
                "mostly_negative_features": inputs.mostly_negative_features,
                "first_layer_dead_fraction": round(first.dead_fraction, 4),
            },
        )
    ]


def deep_without_normalization(obs: Observations, t: Thresholds) -> Result:
    """A deep plain activation stack, no normalisation or skip path, with damage to show."""
    depth = len(obs.layers)
    facts = obs.facts
    if depth < t.deep_layers or facts.norm_layers:
        return []
    if facts.residual_adds is None:
        return [
            Unjudged("deep_without_normalization", "whether the model has skip paths is unknown")
        ]
    if facts.residual_adds:
        return []
    damage: dict[str, Any] = {}
    windows = _grad_windows(obs)
    if windows:
        norms = [wl.grad_norm for wl in windows[-1].layers if wl.grad_norm is not None]
        if len(norms) >= 2 and norms[-1] > 0:
            ratio = norms[0] / norms[-1]
            if ratio < t.vanishing_ratio or ratio > t.exploding_ratio:
                damage["grad_norm_ratio_first_to_last"] = ratio
    deep_half = [lay for lay in obs.layers[depth // 2 :] if lay.can_die]
    worst = max(deep_half, key=lambda lay: lay.dead_fraction, default=None)
    if worst is not None and worst.dead_fraction >= t.dead_error_fraction:
        damage["deep_layer_dead_fraction"] = {worst.name: round(worst.dead_fraction, 4)}
    stds = [lay.start_preact_std for lay in obs.layers if lay.start_preact_std]
    if len(stds) >= 2:
        change = stds[-1] / stds[0]
        if change < 1 / t.depth_signal_change or change > t.depth_signal_change:
            damage["signal_change_through_depth"] = change
    if not damage:
        return []
    shows = []
    if "grad_norm_ratio_first_to_last" in damage:
        shows.append(
            f"the first layer's gradient is {damage['grad_norm_ratio_first_to_last']:.2g}x "
            "the last one's"
        )
    if "deep_layer_dead_fraction" in damage:
        (name, fraction), *_ = damage["deep_layer_dead_fraction"].items()
        shows.append(f"{fraction:.0%} of {name}'s units are dead")
    if "signal_change_through_depth" in damage:
        shows.append(
            f"the pre-activations' spread changes {damage['signal_change_through_depth']:.2g}x "
            "from the first layer to the last"
        )
    return [
        _cause(
            "deep_without_normalization",
            None,
            f"{depth} activation layers in a plain stack with no normalisation layer and no "
            "skip path, and the depth shows: " + "; ".join(shows),
            {"activation_layers": depth, **damage},
        )
    ]


RULES: tuple[Rule, ...] = (
    unwatched_activations,
    nonfinite_values,
    dead_units,
    dying_units,
    loss_plateau,
    loss_diverging,
    identical_outputs,
    vanishing_gradients,
    exploding_gradients,
    zero_init,
    poor_init_scale,
    negative_bias,
    high_learning_rate,
    unnormalized_inputs,
    deep_without_normalization,
)


#: Rules that read the window history only: cheap enough to run at every window's end.
LIVE_RULES: tuple[Rule, ...] = (
    dying_units,
    loss_plateau,
    loss_diverging,
    identical_outputs,
    vanishing_gradients,
    exploding_gradients,
)


def run_rules(
    obs: Observations, thresholds: Thresholds | None = None, rules: Sequence[Rule] = RULES
) -> Diagnosis:
    """Apply the rules; symptoms' remedies are re-ranked by the causes found.

    A rule that raises is reported as unjudged rather than breaking the report.
    """
    thresholds = thresholds or Thresholds()
    findings: list[Finding] = []
    unjudged: list[Unjudged] = []
    for rule in rules:
        try:
            results = rule(obs, thresholds)
        except (ArithmeticError, ValueError, TypeError, IndexError) as error:
            unjudged.append(Unjudged(rule.__name__, f"could not be evaluated: {error}"))
            continue
        for result in results:
            (unjudged if isinstance(result, Unjudged) else findings).append(result)
    return Diagnosis(_fit_remedies(_rank_remedies(_grade_causes(findings)), obs), unjudged)


def _grade_causes(findings: list[Finding]) -> list[Finding]:
    """A cause is as severe as the worst symptom it can explain (same layer, or run-wide)."""
    graded = []
    for finding in findings:
        if finding.kind == "cause":
            related = [
                f
                for f in findings
                if f.kind == "symptom"
                and (f.layer is None or finding.layer is None or f.layer == finding.layer)
            ]
            severity = "error" if any(f.severity == "error" for f in related) else "warning"
            finding = replace(finding, severity=severity)
        graded.append(finding)
    return graded


#: Findings that are themselves evidence about the learning rate.
RATE_EVIDENCE = frozenset(
    {"high_learning_rate", "loss_diverging", "exploding_gradients", "nonfinite_values"}
)


def _fit_remedies(findings: list[Finding], obs: Observations) -> list[Finding]:
    """Keep the remedies that fit this network and this evidence: none for ReLU units in a
    network with no ReLU-family activation (GELU, SiLU, ...), and none that changes the learning
    rate unless a finding says something about the rate (the catalogue's ``rectifier_only`` and
    ``about_rate``)."""
    rectified = not obs.layers or any(layer.can_die for layer in obs.layers)
    rate_evidence = any(f.code in RATE_EVIDENCE for f in findings)
    fitted = []
    for finding in findings:
        keep = [
            remedy
            for remedy in finding.remedies
            if (rectified or remedy not in RECTIFIER_REMEDIES)
            and (rate_evidence or remedy not in RATE_REMEDIES)
        ]
        fitted.append(replace(finding, remedies=tuple(keep)))
    return fitted


def _rank_remedies(findings: list[Finding]) -> list[Finding]:
    """Put the remedies of the causes found first in every symptom's list."""
    cause_remedies: list[str] = []
    for finding in findings:
        if finding.kind == "cause":
            cause_remedies += [r for r in finding.remedies if r not in cause_remedies]
    if not cause_remedies:
        return findings
    ranked = []
    for finding in findings:
        if finding.kind == "symptom":
            own = [r for r in finding.remedies if r not in cause_remedies]
            finding = replace(finding, remedies=(*cause_remedies, *own))
        ranked.append(finding)
    return ranked
