"""rd.watch(log_dir=...): what a real training run writes, read back with TensorBoard's reader."""

from __future__ import annotations

import html
import math
import os
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import identity_relu, leftovers, plant_dead
from tensorboard.backend.event_processing import event_accumulator
from torch import nn

import reludoctor as rd
from reludoctor.errors import InputError
from reludoctor.report.tensorboard import findings_markdown, layer_tag

STEPS = 20
WINDOW = 5
BATCH = 32
#: Planted dead from the start in the first layer, and killed after step 10 (so the dead
#: fraction rises and the live ``dying_units`` finding is announced at step 15).
DEAD_FROM_START = list(range(8))
KILLED_LATER = list(range(8, 14))
VALID_TAG = re.compile(r"[A-Za-z0-9_.\-/]+")


def small_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3)
    )
    plant_dead(model[0], DEAD_FROM_START)
    return model


def read_log(log_dir: Path) -> event_accumulator.EventAccumulator:
    """Every event under ``log_dir`` (size guidance 0: nothing sampled away)."""
    size_guidance = dict.fromkeys(event_accumulator.DEFAULT_SIZE_GUIDANCE, 0)
    acc = event_accumulator.EventAccumulator(str(log_dir), size_guidance=size_guidance)
    acc.Reload()
    return acc


def scalars(acc: event_accumulator.EventAccumulator, tag: str) -> dict[int, float]:
    return {event.step: event.value for event in acc.Scalars(tag)}


def texts(acc: event_accumulator.EventAccumulator, tag: str) -> dict[int, str]:
    return {event.step: event.tensor_proto.string_val[0].decode() for event in acc.Tensors(tag)}


def f32(value: float) -> float:
    """What a TensorBoard scalar (float32) holds for ``value``."""
    return float(np.float32(value))


def window_values(window: rd.Window) -> dict[str, dict]:
    """Each layer's histogram values, as the window carries them."""
    return {
        wl.name: {"preactivation": wl.preactivation_values, "unit_gradient": wl.unit_gradients}
        for wl in window.layers
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A watched training run with a log: the monitor, its log, and what it saw."""
    log_dir = tmp_path_factory.mktemp("run") / "logs" / "first"  # made by rd.watch
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    values: dict[int, dict[str, dict]] = {}
    announced: dict[int, list[rd.Finding]] = defaultdict(list)
    doc = rd.watch(
        model,
        optimizer=opt,
        window=WINDOW,
        log_dir=log_dir,
        on_window=lambda w: values.__setitem__(w.end_step, window_values(w)),
        on_finding=lambda f: announced[doc.steps].append(f),
    )
    for step in range(1, STEPS + 1):
        opt.zero_grad()
        loss = model(torch.randn(BATCH, 6)).square().mean()
        loss.backward()
        opt.step()
        doc.step(loss=loss)
        if step == 10:
            plant_dead(model[0], KILLED_LATER)
    doc.close()
    return doc, read_log(log_dir), values, dict(announced), log_dir


def test_scalars_are_the_report_window_values(run):
    doc, acc, _, _, log_dir = run
    report = doc.report()
    assert len(list(log_dir.glob("events.out.tfevents.*"))) == 1
    assert [w.end_step for w in report.windows] == [5, 10, 15, 20]
    assert [layer.name for layer in report.layers] == ["1", "3"]
    for index, name in enumerate(["1", "3"]):
        rows = [w.layers[index] for w in report.windows]
        assert all(row.name == name for row in rows)
        steps = [w.end_step for w in report.windows]
        assert scalars(acc, f"dead_fraction/{name}") == {
            s: f32(row.dead_fraction) for s, row in zip(steps, rows, strict=True)
        }
        assert scalars(acc, f"alive_units/{name}") == {
            s: row.units - row.dead for s, row in zip(steps, rows, strict=True)
        }
        measured = {
            s: f32(row.grad_norm)
            for s, row in zip(steps, rows, strict=True)
            if row.grad_norm is not None
        }
        assert 0 < len(measured) < len(steps)  # sample_every=10: some windows have none
        assert scalars(acc, f"grad_norm/{name}") == measured
    # The planted units, then the killed ones, show up in the first layer's dead fraction.
    assert scalars(acc, "dead_fraction/1") == {5: 0.5, 10: 0.5, 15: 0.875, 20: 0.875}
    assert scalars(acc, "loss") == {w.end_step: f32(w.loss_mean) for w in report.windows}
    dead_all = {
        w.end_step: f32(sum(row.dead for row in w.layers) / sum(row.units for row in w.layers))
        for w in report.windows
    }
    assert scalars(acc, "dead_fraction/all") == dead_all
    assert dead_all[5] == f32(8 / 28)


def test_histograms_hold_the_window_values(run):
    _, acc, values, _, _ = run
    units = {"1": 16, "3": 12}
    for name, width in units.items():
        for kind, size in (("preactivation", BATCH * width), ("unit_gradient", width)):
            events = acc.Histograms(f"{kind}/{name}")
            expected = {s: v[name][kind] for s, v in values.items() if v[name][kind] is not None}
            assert sorted(expected) == [5, 15]  # the windows with a sampled step
            assert [e.step for e in events] == [5, 15]
            for event in events:
                histo, sample = event.histogram_value, expected[event.step]
                assert histo.num == sample.size == size
                assert histo.min == sample.min() and histo.max == sample.max()
                assert histo.sum == pytest.approx(float(sample.sum()), rel=1e-6)
    # The planted units' pre-activations (about -1e4) are in the first layer's histogram.
    assert acc.Histograms("preactivation/1")[0].histogram_value.min < -9000


def test_new_findings_are_written_at_the_window_end_that_announced_them(run):
    _, acc, _, announced, _ = run
    written = texts(acc, "findings")
    assert written == {step: findings_markdown(found) for step, found in announced.items()}
    dying = next(f for f in announced[15] if f.code == "dying_units" and f.layer == "1")
    assert f"- **error** `dying_units` in layer `1`: {html.escape(dying.message)}" in written[15]
    assert "rose from 50% to 88%" in dying.message
    # Each (code, layer) is written once, at its first announcement.
    item = re.compile(r"^- \*\*\w+\*\* `(\w+)`(?: in layer `([^`]*)`)?", re.M)
    codes = item.findall("\n".join(written.values()))
    assert len(codes) == len(set(codes)) == sum(len(found) for found in announced.values())


def test_the_diagnosis_is_written_on_close(run):
    doc, acc, _, _, _ = run
    report = doc.report()
    diagnosis = texts(acc, "diagnosis")
    assert list(diagnosis) == [STEPS]
    text = diagnosis[STEPS]
    assert text.startswith("**Diagnosis: unhealthy**")
    dead = next(f for f in report.findings if f.code == "dead_units" and f.layer == "1")
    assert f"- **error** `dead_units` in layer `1`: {html.escape(dead.message)}" in text
    assert "14 of 16 units" in dead.message
    for remedy in dead.remedies:
        assert f"(`{remedy}`)" in text
    assert text.count("\n- **") == len(report.findings)


def test_closing_twice_and_stepping_after_close_write_nothing_more(tmp_path):
    model = small_model()
    doc = rd.watch(model, window=WINDOW, log_dir=tmp_path)
    for _ in range(WINDOW):
        model(torch.randn(BATCH, 6)).sum().backward()
        doc.step(loss=1.0)
    doc.close()
    doc.close()
    assert doc.tensorboard is not None and doc.tensorboard.closed
    for _ in range(WINDOW):
        doc.step(loss=1.0)
    assert doc.steps == 2 * WINDOW and len(doc.tracker.windows) == 2
    acc = read_log(tmp_path)
    assert list(scalars(acc, "loss")) == [WINDOW]
    assert list(texts(acc, "diagnosis")) == [WINDOW]
    assert len(list(tmp_path.iterdir())) == 1


class OddNames(nn.Module):
    """Activations whose names are no valid tags, or whose cleaned names collide."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.add_module("odd name<x>", nn.ReLU())
        self.add_module("odd_name_x_", nn.ReLU())
        self.add_module("all", nn.ReLU())

    def forward(self, x):
        h = self.fc(x)
        outputs = [module(h) for name, module in self.named_children() if name != "fc"]
        return torch.stack(outputs).sum(0)


def test_odd_layer_names_get_valid_distinct_tags(tmp_path):
    model = OddNames()
    with rd.watch(model, window=2, log_dir=tmp_path) as doc:
        for _ in range(4):
            model(torch.randn(8, 4)).sum().backward()
            doc.step()
    names = ["odd name<x>", "odd_name_x_", "all"]
    assert doc.layer_names == names
    tags = doc.tensorboard.tags
    assert tags == {"odd name<x>": "odd_name_x_", "odd_name_x_": "odd_name_x__2", "all": "all_2"}
    acc = read_log(tmp_path)
    report = doc.report()
    for index, name in enumerate(names):
        assert VALID_TAG.fullmatch(tags[name])
        expected = {w.end_step: f32(w.layers[index].dead_fraction) for w in report.windows}
        assert scalars(acc, f"dead_fraction/{tags[name]}") == expected
    all_layers = {w.end_step: f32(sum(r.dead for r in w.layers) / 24) for w in report.windows}
    assert scalars(acc, "dead_fraction/all") == all_layers


def test_non_finite_values_are_left_out_of_histograms_and_the_loss(tmp_path):
    model = identity_relu(4)  # the pre-activation is the input
    x = torch.randn(8, 4)
    x[0, 0], x[1, 1] = math.nan, math.inf
    with rd.watch(model, window=1, log_dir=tmp_path) as doc:
        loss = model(x).sum()
        loss.backward()
        doc.step(loss=loss)
    acc = read_log(tmp_path)
    histo = acc.Histograms("preactivation/1")[0].histogram_value
    pre = model[0](x).detach()  # NaN and inf spread over rows 0 and 1 (inf * 0 is NaN)
    finite = pre[torch.isfinite(pre)]
    assert histo.num == finite.numel() == 24
    assert histo.max == float(finite.max())
    assert "loss" not in acc.Tags()["scalars"]
    assert list(scalars(acc, "dead_fraction/1")) == [1]


def test_findings_markdown_keeps_odd_names_literal():
    finding = rd.Finding("symptom", "dead_units", "error", "a`b<c>", "units in a`b<c> died")
    assert findings_markdown([finding]) == (
        "- **error** `dead_units` in layer `` a`b<c> ``: units in a`b&lt;c&gt; died"
    )


def test_layer_tag():
    assert layer_tag("encoder.block-1/relu") == "encoder.block-1/relu"
    assert layer_tag("a b:c<d>é") == "a_b_c_d__"
    assert layer_tag("/lead/") == "lead"
    assert layer_tag("") == "_"


def test_leaky_layers_are_left_out_of_the_overall_dead_fraction(tmp_path):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.LeakyReLU())
    plant_dead(model[0], range(4))
    plant_dead(model[2], range(8))
    with rd.watch(model, window=2, log_dir=tmp_path) as doc:
        for _ in range(2):
            model(torch.randn(8, 4)).sum().backward()
            doc.step()
    acc = read_log(tmp_path)
    assert scalars(acc, "dead_fraction/3") == {2: 1.0}  # never positive, but not mortal
    assert scalars(acc, "dead_fraction/all") == {2: 0.5}
    assert "loss" not in acc.Tags()["scalars"]  # no loss recorded


def test_a_file_as_log_dir_is_refused_before_anything_is_written(tmp_path):
    model = small_model()
    path = tmp_path / "events.txt"
    path.write_text("keep me")
    with pytest.raises(InputError, match=rf"log_dir '{re.escape(str(path))}' is a file"):
        rd.watch(model, log_dir=path)
    with pytest.raises(InputError, match=r"cannot write TensorBoard logs to log_dir .*events\.txt"):
        rd.watch(model, log_dir=path / "below")
    assert path.read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["events.txt"]
    assert not leftovers(model), leftovers(model)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes anywhere")
def test_an_unwritable_log_dir_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        with pytest.raises(InputError, match="pass a directory you can write to"):
            rd.watch(small_model(), log_dir=locked)
    finally:
        locked.chmod(0o700)
    assert not any(locked.iterdir())


def test_a_log_dir_that_is_no_path_is_a_type_error():
    with pytest.raises(TypeError, match="log_dir must be a path"):
        rd.watch(small_model(), log_dir=3)


def test_without_tensorboard_the_error_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    model = small_model()
    with pytest.raises(ImportError, match="pip install tensorboard"):
        rd.watch(model, log_dir=tmp_path / "logs")
    assert not leftovers(model), leftovers(model)
    assert not (tmp_path / "logs").exists()


def test_without_log_dir_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # SummaryWriter's default would be ./runs
    model = small_model()
    with rd.watch(model, window=WINDOW) as doc:
        for _ in range(2 * WINDOW):
            model(torch.randn(BATCH, 6)).sum().backward()
            doc.step(loss=1.0)
    assert doc.tensorboard is None
    assert len(doc.tracker.windows) == 2
    assert not list(tmp_path.iterdir())
