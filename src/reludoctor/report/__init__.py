"""Views of one Report: console, JSON (and HTML, TensorBoard later)."""

from reludoctor.diagnose.summaries import LayerReport, Window, WindowLayer
from reludoctor.report.report import Report

__all__ = ["LayerReport", "Report", "Window", "WindowLayer"]
