"""A :class:`~reludoctor.report.report.Report` from observations: the rules' diagnosis with
the layers, windows and facts it judged."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from reludoctor.diagnose.rules import Observations, run_rules
from reludoctor.diagnose.thresholds import Thresholds
from reludoctor.report.report import Report


def build_report(
    observations: Observations, thresholds: Thresholds, meta: dict[str, Any]
) -> Report:
    """The rules' diagnosis of ``observations`` as a :class:`Report`; ``meta`` gains the
    thresholds the views colour by and the time."""
    diagnosis = run_rules(observations, thresholds)
    meta = {
        **meta,
        "dead_error_fraction": thresholds.dead_error_fraction,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return Report(
        layers=observations.layers,
        windows=observations.windows,
        findings=diagnosis.findings,
        meta=meta,
        facts=observations.facts.to_dict(),
        unjudged=[u.to_dict() for u in diagnosis.unjudged],
    )
