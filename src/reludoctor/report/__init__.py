"""Views of one Report: console, JSON (and HTML, TensorBoard later)."""

from reludoctor.report.model import LayerReport, Report, Window, WindowLayer

__all__ = ["LayerReport", "Report", "Window", "WindowLayer"]
