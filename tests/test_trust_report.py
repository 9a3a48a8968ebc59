"""Trust in the report views (issue 16): a report's values never become HTML or terminal
control, a corrupt report is exit 2 with one line, and a save never destroys what it reads."""

from __future__ import annotations

import functools
import io
import json
import os
from collections import Counter
from collections.abc import Callable
from html.parser import HTMLParser

import pytest
from conftest import layer_report
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console
from typer.testing import CliRunner

import reludoctor.report.report as model
from reludoctor.cli import app
from reludoctor.diagnose.findings import Finding
from reludoctor.diagnose.summaries import Window, WindowLayer
from reludoctor.errors import InputError
from reludoctor.report.console import print_summary
from reludoctor.report.html import render_html
from reludoctor.report.report import Report
from reludoctor.text import printable

runner = CliRunner()

#: Pieces of text that would be markup, or would hide or reorder text, if passed through raw.
FRAGMENTS = [
    "<script>alert(1)</script>",
    '"><img src=x onerror=alert(1)>',
    "'><svg onload=alert(2)>",
    "</style><b id=style>",
    "</script><i>",
    "</textarea></title></pre><marquee>",
    "<!--",
    "-->",
    "<![CDATA[",
    "]]>",
    "&lt;&amp;&#x3c;",
    "\x00\x07\x1b[2J\x1b]0;pwned\x07\x7f\x9b",
    "\u202eevil\u2066",
    "\r\n\t",
    "[/]",
    "[bold]x",
    "$x^2$",
    "\\",
    "_",
]
#: One string of 100,000 characters, markup throughout (put in one field of an example).
LONG = ("<b onclick=x>" * 10_000)[:100_000]

hostile = st.lists(
    st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=12)), min_size=1, max_size=4
).map("".join)


def _report(text: Callable[[str], str]) -> Report:
    """A report with something in every section; ``text(slot)`` fills each string field, one
    slot per field (a layer's name is one slot wherever the name is repeated)."""
    names = [text("layer0"), text("layer1")]
    layers = [
        layer_report(
            names[0],
            8,
            [0, 1, 2, 3, 4],
            kind="relu",
            via=text("via"),
            source=text("source"),
            producer=text("producer"),
            dormant_units=[5],
            fire_rate=[0.0] * 5 + [0.5] * 3,
            grad_norm=0.5,
            preact_histogram={"edges": [-1.0, 0.0, 1.0], "start": [3, 1], "end": [4, 0]},
        ),
        layer_report(names[1], 4, [0], kind=text("kind"), via=text("via1"), grad_norm=1.0),
    ]
    windows = [
        Window(
            index,
            index * 5,
            index * 5 + 5,
            True,
            [WindowLayer(name, 8, 5, 0.6, 100, grad_norm=0.5) for name in names],
            loss_curve=[1.0, 0.5],
        )
        for index in range(2)
    ]

    def finding(layer: str, slot: str) -> Finding:
        return Finding(
            "cause",
            text("code"),
            "error",
            layer,
            text(f"message{slot}"),
            {text("key"): text(f"evidence{slot}"), "list": [text(f"item{slot}")]},
            (text("remedy"), "kaiming_init"),
        )

    meta = {
        "model": text("model"),
        "created": text("created"),
        "steps": text("steps"),
        "window": text("window"),
        "dormancy_threshold": text("dormancy"),
        "ranks": {
            "world_size": text("world"),
            "rank": text("rank"),
            "missing": [text("missing")],
            "missing_since_step": text("since"),
        },
        text("metakey"): text("metavalue"),
    }
    return Report(
        layers=layers,
        windows=windows,
        findings=[finding(names[0], "0"), finding(names[1], "1")],
        meta=meta,
        facts={"layers": [{"name": names[0]}], text("factkey"): text("fact")},
        unjudged=[{"code": text("unjudged"), "reason": text("reason")}],
    )


class _Elements(HTMLParser):
    """Each element's tag and attribute names, counted outside inline SVG and as a set inside
    it (where the number of text elements follows the text); and the text shown."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.html: Counter[tuple[str, tuple[str, ...]]] = Counter()
        self.svg: set[tuple[str, tuple[str, ...]]] = set()
        self.depth = 0  # of <svg> elements open
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element = (tag, tuple(sorted(name for name, _ in attrs)))
        if self.depth:
            self.svg.add(element)
        else:
            self.html[element] += 1
        self.depth += tag == "svg"

    def handle_endtag(self, tag: str) -> None:
        if tag == "svg" and self.depth:
            self.depth -= 1

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _elements(page: str) -> _Elements:
    parser = _Elements()
    parser.feed(page)
    parser.close()
    return parser


@functools.cache
def _benign() -> _Elements:
    return _elements(render_html(_report(lambda slot: slot)))


@pytest.mark.filterwarnings("ignore:Glyph .* missing from font")
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(hostile, min_size=1, max_size=32), st.integers(0, 31))
def test_hostile_strings_in_every_report_field_add_no_html_element_or_attribute(draws, long):
    filled: dict[str, str] = {}

    def text(slot: str) -> str:
        """A hostile string per slot (the ``long``-th gets :data:`LONG` too); the number in
        front keeps slots distinct, as in the benign report, and no label starts with '_'
        (which matplotlib leaves out of a legend)."""
        if slot not in filled:
            index = len(filled)
            filled[slot] = f"{index}{draws[index % len(draws)]}{LONG if index == long else ''}"
        return filled[slot]

    page = _elements(render_html(_report(text)))
    assert page.html == _benign().html
    assert page.svg <= _benign().svg, page.svg - _benign().svg
    shown = "".join(page.text)
    assert printable(filled["layer0"], keep_newlines=True) in shown
    assert "\x1b" not in shown and "\u202e" not in shown


def _saved(tmp_path, change: Callable[[dict], None], name: str = "run.json"):
    data = Report(
        layers=[layer_report("fc:relu", 4, [1])],
        windows=[],
        findings=[Finding("symptom", "dead_units", "error", "fc:relu", "1 of 4 dead")],
        meta={"steps": 5, "window": 5},
    ).to_dict()
    change(data)
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["layers"][0].update(dead="3"), "layers[0].dead should be a whole number"),
        (
            lambda d: d["findings"][0].update(severity="fatal"),
            "findings[0].severity should be one of 'error', 'warning', 'info'",
        ),
        (lambda d: d["meta"].update(steps="<script>x</script>"), "meta.steps should be a whole"),
        (lambda d: d["meta"].update(window=[5]), "meta.window should be a whole number"),
        (lambda d: d["layers"][0].update(dead_units=[-9]), "layers[0].dead_units should hold"),
        (lambda d: d["layers"][0].update(fire_rate=["x"]), "layers[0].fire_rate[0] should be"),
        (lambda d: d["findings"][0].update(remedies="abc"), "remedies should be a list of str"),
        (lambda d: d["unjudged"].append({"code": 3}), "unjudged[0].code should be a string"),
        (lambda d: d["meta"].update(ranks={"missing": "1"}), "meta.ranks.missing should be"),
        (
            lambda d: d["layers"][0].update(preact_histogram={"edges": [0], "start": [1, 2]}),
            "layers[0].preact_histogram should have edges and one count fewer",
        ),
        (lambda d: d.update(windows={}), "windows should be a list of objects, not an object"),
        (lambda d: d["layers"][0].update(name="\ud800"), "layers[0].name is not valid Unicode"),
    ],
    ids=[
        "dead-string",
        "severity-fatal",
        "steps-string",
        "window-list",
        "unit-out-of-range",
        "fire-rate-string",
        "remedies-string",
        "unjudged-number",
        "ranks-missing-string",
        "histogram-shape",
        "windows-object",
        "lone-surrogate",
    ],
)
def test_wrong_typed_fields_are_refused_on_load_naming_the_field(tmp_path, change, message):
    path = _saved(tmp_path, change)
    with pytest.raises(InputError, match="corrupt reludoctor report") as caught:
        Report.load_json(path)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d["layers"][0].update(dead="3"),
        lambda d: d["findings"][0].update(severity="fatal"),
        lambda d: d["meta"].update(steps="<script>alert(1)</script>"),
    ],
    ids=["dead-string", "severity-fatal", "steps-markup"],
)
def test_report_command_exits_2_on_wrong_typed_fields(tmp_path, change):
    path = _saved(tmp_path, change)
    result = runner.invoke(app, ["report", str(path), "-o", str(tmp_path / "r.html")])
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and "corrupt reludoctor report" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "r.html").exists()


def test_report_command_exits_2_on_100k_deep_nesting(tmp_path):
    deep = 100_000
    path = tmp_path / "deep.json"
    path.write_text('{"schema_version": 1, "layers": ' + "[" * deep + "]" * deep + "}")
    nested = _saved(tmp_path, lambda d: d["meta"].update(x=json.loads("[" * 200 + "]" * 200)))
    for run in (path, nested):
        result = runner.invoke(app, ["report", str(run), "-o", str(tmp_path / "r.html")])
        assert result.exit_code == 2, result.output
        assert result.output.count("\n") == 1 and "nested" in result.output
        assert "Traceback" not in result.output
    assert not (tmp_path / "r.html").exists()


def test_schema_versions_compare_as_numbers(tmp_path, monkeypatch):
    def version(value: object) -> Callable[[dict], None]:
        return lambda d: d.update(schema_version=value)

    with pytest.raises(InputError, match=r"0\.5, older than the 1"):
        Report.load_json(_saved(tmp_path, version(0.5)))
    assert Report.load_json(_saved(tmp_path, version(1.0))).layers[0].dead == 1
    monkeypatch.setattr(model, "SCHEMA_VERSION", 9)
    for newer in (10, "10", 9.5):
        with pytest.raises(InputError, match="newer than the 9"):
            Report.load_json(_saved(tmp_path, version(newer)))
    for older in (8, "8.9", 0.5):
        with pytest.raises(InputError, match="older than the 9"):
            Report.load_json(_saved(tmp_path, version(older)))
    assert Report.load_json(_saved(tmp_path, version("9"))).layers[0].dead == 1
    with pytest.raises(InputError, match="schema_version should be a number, not the string"):
        Report.load_json(_saved(tmp_path, version("nine")))


def test_report_command_refuses_to_write_over_its_own_input(tmp_path):
    run = _saved(tmp_path, lambda d: None, "a.json")
    before = run.read_bytes()
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.html").symlink_to(run)
    as_html = _saved(tmp_path, lambda d: None, "b.html")
    cases = [
        [str(run), "-o", str(run)],
        [str(run), "-o", str(tmp_path / "sub" / ".." / "a.json")],
        [str(run), "-o", str(tmp_path / "link.html")],
        [str(as_html)],  # the default output: RUN with .html
    ]
    for args in cases:
        result = runner.invoke(app, ["report", *args])
        assert result.exit_code == 2, (args, result.output)
        assert "is the input report" in result.output and result.output.count("\n") == 1
    assert run.read_bytes() == before and (tmp_path / "link.html").is_symlink()
    assert json.loads(as_html.read_text())["schema_version"] == 1


def test_saves_reach_the_disk_before_they_replace_the_file(tmp_path, monkeypatch):
    target = tmp_path / "report.json"
    target.write_text("previous")
    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        calls.append("fsync")
        real_fsync(fd)

    def replace(source: str, target: os.PathLike[str]) -> None:
        calls.append(f"replace {os.path.basename(target)}")
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    report = Report(layers=[layer_report()], windows=[], findings=[])
    old = os.umask(0o022)
    try:
        report.save_json(target)
        report.save_html(tmp_path / "report.html")
    finally:
        os.umask(old)
    assert calls == ["fsync", "replace report.json", "fsync", "replace report.html"]
    assert Report.load_json(target).layers == report.layers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "report.json"]
    assert {oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()} == {"0o644"}

    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError, match="No space"):
        Report(layers=[], windows=[], findings=[]).save_json(target)
    assert Report.load_json(target).layers == report.layers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "report.json"]


#: Names that are terminal control or rich markup when printed raw.
TERMINAL_NAMES = ["\x1b]0;pwned\x07", "\x1b[2Jclear", "[/]", "[bold]x", "\u202eevil"]


def test_escape_sequences_and_markup_in_names_never_reach_the_terminal():
    layers = [
        layer_report(name, 4, [0, 1, 2], kind=kind)
        for name, kind in zip(
            TERMINAL_NAMES, ["relu", "[/]", "\x1b[31m", "relu", "relu"], strict=True
        )
    ]
    findings = [
        Finding("symptom", "dead\x1b[8m", "error", name, f"3 of 4 dead in {name}")
        for name in TERMINAL_NAMES
    ]
    report = Report(layers=layers, windows=[], findings=findings)
    buffer = io.StringIO()
    print_summary(report, Console(file=buffer, width=200, color_system=None))
    text = buffer.getvalue()
    assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text
    for shown in ("pwned", "?[2Jclear", "[/]", "[bold]x", "?evil", "in [/]", "dead?[8m"):
        assert shown in text, shown


def test_report_command_prints_no_escape_sequence_or_markup_from_the_report(tmp_path):
    layers = [layer_report(name, 4, [0, 1, 2]) for name in TERMINAL_NAMES]
    report = Report(layers=layers, windows=[], findings=[])
    folder = tmp_path / "[bold]x\x1b[2J"  # no "/" in a file name: "[bold]" is the markup
    folder.mkdir()
    report.save_json(folder / "run.json")
    result = runner.invoke(app, ["report", str(folder / "run.json")])
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "\x07" not in result.output
    assert "pwned" in result.output and "[bold]x" in result.output
    assert f"report:{tmp_path}/[bold]x?[2J/run.html" in "".join(result.output.split())


def test_demo_prints_an_out_folder_with_markup_verbatim(tmp_path):
    out = tmp_path / "[bold]demo\x1b[2J"
    args = ["demo", "--out", str(out), "--epochs", "1", "--samples", "100", "-q"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output
    assert f"report:{out.parent}/[bold]demo?[2J/report.json" in "".join(result.output.split())


def test_findings_logged_while_training_carry_no_escape_sequence(caplog):
    from collections import OrderedDict

    import torch
    from torch import nn

    import reludoctor as rd

    evil = "act\x1b]0;pwned\x07"
    model = nn.Sequential(OrderedDict(fc=nn.Linear(4, 4), **{evil: nn.ReLU()}))
    with torch.no_grad():
        model.fc.weight.copy_(torch.eye(4))
        model.fc.bias.zero_()
    with caplog.at_level("WARNING", logger="reludoctor"), rd.watch(model, window=2) as doc:
        for step in range(6):  # alive in the first window, dying after it
            model(torch.rand(8, 4) * (1 if step < 2 else -1))
            doc.step()
    logged = [record.getMessage() for record in caplog.records]
    assert any("act?]0;pwned?" in message and "dying" in message for message in logged)
    assert not any("\x1b" in message or "\x07" in message for message in logged)
