"""The HTML report: one self-contained file, opened in headless Chromium."""

from __future__ import annotations

import io
import json
import re
import struct

import pytest
import torch
from browser import open_page, print_pdf
from conftest import plant_dead
from rich.console import Console
from torch import nn

import reludoctor as rd
from reludoctor.api.monitor import silenced_live_findings
from reludoctor.report.console import print_summary
from reludoctor.report.html import NO_WINDOWS, render_html
from reludoctor.report.report import Report
from reludoctor.scenarios import HighLearningRate

SECTIONS = ["summary", "dead-heatmap", "loss", "units", "histograms", "gradients", "details"]
HOSTILE = "<img src=x onerror=alert(1)>"


class Hostile(nn.Module):
    """A model whose ReLU module has a name that is also HTML."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 16)
        self.add_module(HOSTILE, nn.ReLU())
        self.out = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(getattr(self, HOSTILE)(self.fc(x)))


def hostile_report() -> Report:
    torch.manual_seed(0)
    model = Hostile()
    dead = plant_dead(model.fc, [1, 4, 9])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(256, 6), torch.randint(0, 2, (256,))
    with silenced_live_findings(), rd.watch(model, optimizer=opt, window=5) as doc:
        for step in range(20):
            batch = slice(step * 12 % 240, step * 12 % 240 + 16)
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            doc.step(loss=loss)
    report = doc.report()
    assert report.layer(HOSTILE).dead_units == dead
    return report


def png_size(path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", header[16:24])


@pytest.fixture(scope="module")
def e4_page(tmp_path_factory):
    folder = tmp_path_factory.mktemp("e4")
    with silenced_live_findings():
        report = HighLearningRate().run().report
    path = report.save_html(folder / "report.html")
    return report, path, open_page(path, folder / "report.png")


def test_the_report_opens_with_every_section_and_no_console_message(e4_page):
    _, _, page = e4_page
    assert page.console == []
    for section in SECTIONS:
        assert f'id="{section}"' in page.dom, section
    assert page.dom.count("<svg") == 5  # heatmap, loss, unit grids, histograms, gradients
    assert "Unhealthy" in page.dom and "high learning rate" in page.dom
    assert "lower_learning_rate(optimizer, factor=10)" in page.dom  # the code change to make
    width, height = png_size(page.screenshot)
    assert (width, height) == (1280, 4000)
    assert page.screenshot.stat().st_size > 50_000  # drawn, not blank


def test_the_report_prints(e4_page, tmp_path):
    _, path, _ = e4_page
    pages = print_pdf(path, tmp_path / "report.pdf")
    assert 2 <= pages <= 12


def test_the_report_is_self_contained(e4_page):
    _, path, _ = e4_page
    text = path.read_text()
    # nothing to fetch: no script, no external stylesheet, image or font
    assert "<script" not in text and "<link" not in text and "@import" not in text
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", text)
    assert not re.search(r"url\(\s*['\"]?(https?:|//)", text)


def test_a_layer_named_like_html_is_shown_as_text(tmp_path):
    report = hostile_report()
    path = report.save_html(tmp_path / "report.html")
    page = open_page(path, tmp_path / "report.png", height=1200)
    assert page.console == []
    assert "<img" not in page.dom
    assert "&lt;img src=x onerror=alert(1)&gt;" in page.dom
    assert "alert(1)>" not in page.dom.replace("&gt;", "")  # never as markup


def test_the_harness_sees_console_errors(tmp_path):
    path = tmp_path / "bad.html"
    path.write_text("<html><body><script>console.error('boom')</script></body></html>")
    page = open_page(path, tmp_path / "bad.png", height=200)
    assert any("boom" in line for line in page.console)


def test_a_run_without_windows_says_so():
    report = Report(layers=hostile_report().layers, windows=[], findings=[])
    page = render_html(report)
    for section in SECTIONS:
        assert f'id="{section}"' in page
    assert page.count(NO_WINDOWS) == 3  # heatmap, loss, gradients
    assert page.count("<svg") == 2  # unit grids and histograms come from the layers


def test_names_with_dollar_signs_are_not_read_as_mathematics():
    report = hostile_report()
    report.layers[0].name = "a$b$c"
    page = render_html(report)
    assert "a$b$c" in page


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    report = hostile_report()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        report.save_html(tmp_path / "missing" / "report.html")
    assert not (tmp_path / "missing").exists()
    target = tmp_path / "report.html"
    target.write_text("previous")

    def broken(report):
        raise RuntimeError("drawing failed")

    monkeypatch.setattr("reludoctor.report.plots.gradient_norms", broken)
    with pytest.raises(RuntimeError, match="drawing failed"):
        report.save_html(target)
    assert target.read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


def test_dormant_counts_read_the_same_in_the_table_and_the_unit_grid():
    from conftest import layer_report

    from reludoctor.report import plots

    layer = layer_report(units=10, dead=[0, 1], dormant_units=[0, 1, 2, 3], fire_rate=[0.0] * 10)
    grid = plots.unit_grids([layer])
    assert "4 dormant (2 of them dead)" in grid and "dormant, not dead" in grid
    report = Report(layers=[layer], windows=[], findings=[], unjudged=[], meta={})
    row = re.search(r"<tr[^>]*><td class=name>fc:relu</td>.*?</tr>", render_html(report), re.S)
    assert row is not None and "<td class=num>4</td>" in row.group(0)
    assert layer.dormant == 4


def test_the_header_counts_in_words_one_window_one_step_one_layer():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    with rd.watch(model, window=5) as doc:
        model(torch.randn(8, 3)).sum().backward()
        doc.step()
    header = render_html(doc.report()).split("</header>")[0]
    assert "1 step" in header and "1 window of 5 steps" in header
    assert "1 activation layer" in header and "1 windows" not in header


def test_gradients_of_one_window_are_bars_and_many_windows_lines():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU())

    def plot(steps: int) -> str:
        with rd.watch(model, window=5, sample_every=1) as doc:
            for _ in range(steps):
                model(torch.randn(16, 4)).sum().backward()
                doc.step()
        from reludoctor.report import plots

        return plots.gradient_norms(doc.report())

    assert "one window, to step 5" in plot(5)
    lines = plot(15)
    assert "step (end of window)" in lines and "one window" not in lines


def test_a_symlog_gradient_axis_has_ticks_only_at_zero_and_whole_decades():
    import matplotlib.pyplot as plt
    import numpy as np

    from reludoctor.report.plots import _gradient_scale

    fig, ax = plt.subplots()
    try:
        _gradient_scale(ax.yaxis, ax.set_yscale, np.array([0.0, 0.0011, 160.0]))
        assert ax.get_yscale() == "symlog"
        assert list(ax.yaxis.get_major_locator().locs) == [0.0, *(10.0**d for d in range(-3, 4))]
        _gradient_scale(ax.xaxis, ax.set_xscale, np.array([0.5, 2.0]))  # within 100x: linear
        assert ax.get_xscale() == "linear"
    finally:
        plt.close(fig)


def test_asinh_histogram_ticks_are_few_and_never_crowd_zero():
    from reludoctor.report.plots import _asinh_ticks

    ticks = _asinh_ticks(-2e4, 30.0, 0.1)
    assert 0.0 in ticks and ticks == sorted(ticks)
    negative, positive = [t for t in ticks if t < 0], [t for t in ticks if t > 0]
    assert 1 <= len(negative) <= 3 and 1 <= len(positive) <= 3
    assert min(abs(t) for t in ticks if t) >= 0.3  # 3 linear widths from 0
    assert -1e4 in negative  # the far end is labelled


def test_folded_findings_are_counted_in_words():
    from reludoctor.diagnose.findings import Finding

    findings = [
        Finding("symptom", "dead_units", "warning", name, f"{name} has dead units")
        for name in ("a", "b")
    ]
    page = render_html(Report(layers=[], windows=[], findings=findings, unjudged=[], meta={}))
    assert "<summary>1 more dead units finding: b</summary>" in page


def _half_dead_scan(thresholds: rd.Thresholds | None) -> Report:
    model = nn.Sequential(nn.Linear(4, 10), nn.ReLU())
    with torch.no_grad():
        model[0].bias[:5] = -1e4
    return rd.scan(model, torch.randn(64, 4), thresholds=thresholds)


@pytest.mark.parametrize(("error_level", "css"), [(None, "bad"), (0.9, "warn")])
def test_layer_colours_follow_the_runs_thresholds(error_level, css):
    thresholds = None if error_level is None else rd.Thresholds(dead_error_fraction=error_level)
    report = Report.from_dict(json.loads(_half_dead_scan(thresholds).to_json()))  # via JSON
    assert report.dead_error_fraction == (error_level or rd.Thresholds.dead_error_fraction)
    row = re.search(r"<tr([^>]*)><td class=name>1</td>", render_html(report))
    assert row is not None and row.group(1) == f' class="{css}"'
    buffer = io.StringIO()
    print_summary(report, Console(file=buffer, width=120, force_terminal=True))
    line = next(text for text in buffer.getvalue().splitlines() if " 50" in text)
    assert ("\x1b[31m" in line) == (css == "bad")  # red where the level calls it an error
