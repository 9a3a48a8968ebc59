"""Rules: pure functions from what was observed to findings. They never touch a model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from reludoctor.findings import Finding
from reludoctor.report.model import LayerReport, Window

#: Seed 002: "over ~40% dead units severely harms training" - the error threshold.
DEAD_ERROR_FRACTION = 0.40
#: How many dead unit indices a finding quotes as evidence (the report holds all of them).
EVIDENCE_UNITS = 20


@dataclass(frozen=True)
class Thresholds:
    """Every threshold a rule uses, overridable per call."""

    dead_error_fraction: float = DEAD_ERROR_FRACTION


@dataclass(frozen=True)
class Observations:
    """What the rules see: the layer summaries, the window history and model facts."""

    layers: list[LayerReport]
    windows: list[Window]
    facts: dict[str, Any] = field(default_factory=dict)


Rule = Callable[[Observations, Thresholds], list[Finding]]


def dead_units(obs: Observations, thresholds: Thresholds) -> list[Finding]:
    """One finding per layer with units that never fired over the report's final span."""
    findings = []
    for layer in obs.layers:
        if not layer.dead:
            continue
        severity = "error" if layer.dead_fraction >= thresholds.dead_error_fraction else "warning"
        evidence: dict[str, Any] = {
            "dead": layer.dead,
            "units": layer.units,
            "dead_fraction": round(layer.dead_fraction, 4),
            "dead_units": layer.dead_units[:EVIDENCE_UNITS],
            "samples": layer.samples,
        }
        if layer.max_preactivation is not None:
            margins = [layer.max_preactivation[u] for u in layer.dead_units]
            finite = [m for m in margins if m is not None]
            if finite:
                evidence["highest_dead_preactivation"] = max(finite)
        if obs.windows:
            evidence["steps"] = [obs.windows[0].start_step, obs.windows[-1].end_step]
        message = (
            f"{layer.dead} of {layer.units} units ({layer.dead_fraction:.0%}) in {layer.name} "
            f"never had a positive pre-activation over {layer.samples} samples"
        )
        if severity == "error":
            message += f"; at {thresholds.dead_error_fraction:.0%} or more, training suffers"
        findings.append(
            Finding(
                kind="symptom",
                code="dead_units",
                severity=severity,
                layer=layer.name,
                message=message,
                evidence=evidence,
                remedies=("revive_units", "kaiming_init", "leaky_relu", "lower_learning_rate"),
            )
        )
    return findings


RULES: tuple[Rule, ...] = (dead_units,)


def run_rules(obs: Observations, thresholds: Thresholds | None = None) -> list[Finding]:
    """Apply every rule; the findings come back in rule order."""
    thresholds = thresholds or Thresholds()
    findings: list[Finding] = []
    for rule in RULES:
        findings.extend(rule(obs, thresholds))
    return findings
