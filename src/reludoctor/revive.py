"""Reviving dead units in place (the public path; it lives in :mod:`reludoctor.fix.revive`).

Example:
    >>> from reludoctor.revive import revive_units
    >>> callable(revive_units)
    True
"""

from reludoctor.fix.revive import UnitFlow, revive_units, trace_unit_flow

__all__ = ["UnitFlow", "revive_units", "trace_unit_flow"]
