"""The console summary: worst layers first, findings, remedies, names shown as text."""

from __future__ import annotations

import io

from conftest import layer_report
from rich.console import Console

from reludoctor.diagnose.rules import Observations, run_rules
from reludoctor.diagnose.summaries import LayerReport
from reludoctor.report.console import print_summary
from reludoctor.report.report import Report


def layer(name: str, units: int, dead: list[int], kind: str = "relu") -> LayerReport:
    return layer_report(name, units, dead, via="module", kind=kind)


def render(report: Report, **kwargs) -> str:
    buffer = io.StringIO()
    console = Console(file=buffer, width=120, color_system=None, force_terminal=False)
    print_summary(report, console, **kwargs)
    return buffer.getvalue()


def make_report(layers: list[LayerReport]) -> Report:
    return Report(layers=layers, windows=[], findings=run_rules(Observations(layers, [])).findings)


def test_worst_layers_come_first_with_findings_and_remedies():
    report = make_report(
        [layer("healthy", 10, []), layer("half", 10, [0, 1, 2, 3, 4]), layer("one", 10, [7])]
    )
    text = render(report)
    assert "unhealthy" in text
    rows = [line.split("│")[1].strip() for line in text.splitlines() if line.startswith("│")]
    assert rows == ["half", "one", "healthy"]
    assert "error   dead_units: 5 of 10 units (50%) in half" in text
    assert "warning dead_units: 1 of 10 units (10%) in one" in text
    assert "(revive_units)" in text


def test_stuck_units_of_leaky_activations_are_marked_not_dead_and_ranked_last():
    report = make_report([layer("leaky", 10, list(range(10)), "prelu"), layer("one", 10, [7])])
    text = render(report)
    rows = [line.split("│")[1:5] for line in text.splitlines() if line.startswith("│")]
    assert [r[0].strip() for r in rows] == ["one", "leaky"]
    assert rows[1][3].strip() == "10*"
    assert "stuck, not dead" in text
    assert "in leaky" not in text  # no dead_units finding for it
    assert "stuck, not dead" not in render(make_report([layer("one", 10, [7])]))


def test_healthy_report_says_so_and_long_lists_are_cut():
    layers = [layer(f"layer{i}", 4, []) for i in range(15)]
    text = render(make_report(layers), max_layers=10)
    assert text.startswith("healthy")
    assert "... and 5 more layers" in text


def test_markup_in_layer_names_is_printed_verbatim():
    name = "[bold red]x[/] <img src=x onerror=alert(1)>"
    text = render(make_report([layer(name, 4, [0, 1, 2, 3])]))
    assert "[bold red]x[/]" in text


def test_empty_report():
    assert "no ReLU-family activation was seen" in render(make_report([]))
