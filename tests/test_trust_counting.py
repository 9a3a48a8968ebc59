"""Trust: what reludoctor counts is never wrong, and watching never breaks a run.

Non-finite values neither make a unit alive nor erase other units' counts; an error of
reludoctor's own (or a part it cannot see) leaves training untouched, the process's global
state as it was, and a report that says what it could not see.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import leftovers, plant_dead, train
from torch import nn

import reludoctor as rd
from reludoctor.probe import probes
from reludoctor.probe.tracker import Tracker


def planted(units: int = 16, dead: tuple[int, ...] = (1, 4, 7, 9, 12)) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, units), nn.ReLU(), nn.Linear(units, 2))
    plant_dead(model[0], dead, alive_bias=0.5, scale=0.1)
    return model


def assert_a_fresh_watch_is_exact() -> None:
    """Global state is as before: no patch left acquired, and counting is exact again."""
    patcher = probes._patcher()
    assert (patcher.functional.count, patcher.adds.count) == (0, 0)
    assert patcher.tensor.count == len(probes._WATCHED)
    model = planted()
    with rd.watch(model, window=5) as doc:
        train(model, doc, 3, lambda _: torch.randn(32, 4))
    assert doc.report().layer("1").dead_units == [1, 4, 7, 9, 12]


def scan_codes(report: rd.Report) -> set[str]:
    return {finding.code for finding in report.findings}


# -- 5. one NaN hides no dead unit -------------------------------------------------------------


def test_one_nan_in_the_probe_data_hides_no_dead_unit():
    model = planted()
    probe = torch.randn(5000, 4)  # 20,000 values
    probe[1234, 2] = math.nan
    report = rd.scan(model, probe)
    layer = report.layer("1")
    assert layer.dead_units == [1, 4, 7, 9, 12]
    assert layer.nonfinite_units == 16  # the NaN row reaches every unit
    assert len(layer.dormant_units) == 5  # the dead ones, not every unit
    assert not report.healthy
    finding = next(f for f in report.findings if f.code == "nonfinite_values")
    assert finding.severity == "error" and finding.layer == "1"
    assert finding.evidence["nonfinite_units"] == 16


def test_one_infinity_in_the_probe_data_hides_no_dead_unit():
    model = planted(dead=(2, 5, 11))
    probe = torch.randn(5000, 4)
    probe[77, 0] = math.inf
    report = rd.scan(model, probe)
    assert report.layer("1").dead_units == [2, 5, 11]
    assert "nonfinite_values" in scan_codes(report) and not report.healthy


def test_a_nan_input_in_training_keeps_the_window_and_names_its_step():
    model = planted()

    def make_input(step: int) -> torch.Tensor:
        x = torch.randn(32, 4)
        if step == 4:  # the fifth step
            x[3, 1] = math.nan
        return x

    with rd.watch(model, window=10) as doc:
        train(model, doc, 8, make_input)  # no optimizer: the weights stay finite
    report = doc.report()
    layer = report.layer("1")
    assert layer.dead_units == [1, 4, 7, 9, 12]
    assert layer.nonfinite_first_step == 5
    finding = next(f for f in report.findings if f.code == "nonfinite_values")
    assert "first in step 5" in finding.message and finding.evidence["first_step"] == 5


def test_the_first_nonfinite_step_survives_the_window_it_was_seen_in():
    model = planted()

    def make_input(step: int) -> torch.Tensor:
        x = torch.randn(32, 4)
        if step in (6, 8):  # steps 7 and 9: the second window, steps 6-10
            x[0, 0] = math.inf
        return x

    with rd.watch(model, window=5) as doc:
        train(model, doc, 12, make_input)
    layer = doc.report().layer("1")  # the last closed window and the open one
    assert layer.nonfinite_first_step == 7 and layer.dead_units == [1, 4, 7, 9, 12]


def watched_as_on_a_gpu(
    model: nn.Module, batches: list[torch.Tensor], pending_limit: int
) -> tuple[rd.Report, Any]:
    """Train on ``batches`` with each call's maxima kept for a fold every ``pending_limit``
    calls, as on a GPU (forced on the CPU after the first forward): (report, layer)."""
    with rd.watch(model, window=100) as doc:
        train(model, doc, 1, lambda _: batches[0])
        [layer] = doc.tracker.layers
        layer.pending_limit = pending_limit
        train(model, doc, len(batches) - 1, lambda step: batches[step + 1])
    return doc.report(), layer


def test_the_accelerator_path_counts_finite_values_exactly_without_a_sync():
    # on a GPU per-call maxima wait in layer.pending (no host check); forced here on the CPU
    model = planted()
    batches = [torch.randn(32, 4) for _ in range(7)]
    batches[4][5, 2] = math.nan
    batches[5][0, 0] = math.inf
    report, layer = watched_as_on_a_gpu(model, batches, pending_limit=3)
    assert report.layer("1").dead_units == [1, 4, 7, 9, 12]
    assert report.layer("1").nonfinite_units == 16
    assert report.layer("1").nonfinite_first_step == 5
    layer.fold()
    pre = model[0](torch.cat(batches)).detach()  # every finite value counts, NaN rows' too
    expected = torch.where(pre.isfinite(), pre, -math.inf).amax(0)
    assert torch.equal(layer.max_pre, expected)


def test_on_the_accelerator_path_a_nan_leaves_out_only_its_samples_channel_values():
    # a conv channel is reduced per sample first (a full pass fewer on a GPU): a NaN leaves
    # out that sample's other values of the channel, never another sample's
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 1), nn.ReLU())
    batches = [torch.randn(4, 2, 3, 3) for _ in range(4)]
    batches[2][1] *= 10  # sample 1 holds each channel's largest values
    batches[2][1, 0, 2, 2] = math.nan  # reaches every channel of sample 1, step 3
    report, layer = watched_as_on_a_gpu(model, batches, pending_limit=4)
    assert report.layer("1").nonfinite_units == 4 and report.layer("1").nonfinite_first_step == 3
    layer.fold()
    kept = [batches[0], batches[1], batches[2][[0, 2, 3]], batches[3]]
    expected = model[0](torch.cat(kept)).detach().amax((0, 2, 3))
    assert torch.equal(layer.max_pre, expected)
    pre = model[0](torch.cat(batches)).detach()
    exact = torch.where(pre.isfinite(), pre, -math.inf).amax((0, 2, 3))
    assert (layer.max_pre < exact).all()  # sample 1's finite values were left out


def test_units_with_only_nonfinite_values_are_not_called_dead():
    model = planted(units=8, dead=(0,))
    with torch.no_grad():
        model[0].weight[3] = math.nan
    report = rd.scan(model, torch.randn(200, 4))
    layer = report.layer("1")
    assert layer.dead_units == [0] and layer.nonfinite_units == 1


# -- 6. a failed watch never poisons the process -----------------------------------------------


def test_watching_a_scripted_model_leaves_it_untouched_and_says_so():
    model = planted()
    scripted = torch.jit.script(model)
    x = torch.randn(8, 4)
    expected = scripted(x)
    with pytest.warns(RuntimeWarning, match="TorchScript"), rd.watch(scripted) as doc:
        out = scripted(x)
        out.sum().backward()
        doc.step()
    assert torch.equal(out, expected)
    report = doc.report()
    assert not report.healthy
    finding = next(f for f in report.findings if f.code == "unwatched_activations")
    assert finding.kind == "coverage" and "torch.jit.script" in finding.message
    assert report.meta["model"] == "Sequential"
    assert_a_fresh_watch_is_exact()


def test_a_scripted_submodule_is_listed_and_the_rest_is_watched():
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scripted = torch.jit.script(nn.Sequential(nn.Linear(4, 8), nn.ReLU()))
            self.fc = nn.Linear(8, 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.relu(self.fc(self.scripted(x)))

    model = Mixed()
    plant_dead(model.fc, [2], alive_bias=0.5, scale=0.01)
    with rd.watch(model, window=5) as doc:
        train(model, doc, 3, lambda _: torch.randn(16, 4))
    report = doc.report()
    assert [(lay.name, lay.dead_units) for lay in report.layers] == [("fc:relu", [2])]
    finding = next(f for f in report.findings if f.code == "unwatched_activations")
    assert finding.evidence["unwatched"][0]["module"] == "scripted"
    assert not report.healthy
    assert not leftovers(model)
    assert_a_fresh_watch_is_exact()


def test_an_error_of_reludoctors_own_never_reaches_the_training_loop(monkeypatch):
    def broken(self, layer, x):
        raise RuntimeError("a bug in the tracker")

    model, twin = planted(), planted()
    monkeypatch.setattr(Tracker, "observe_input", broken)
    x = torch.randn(16, 4)
    warned = pytest.warns(RuntimeWarning, match="a bug in the tracker")
    with warned, rd.watch(model, window=5) as doc:
        losses = train(model, doc, 3, lambda _: x, lr=0.1)
    assert losses == train(twin, None, 3, lambda _: x, lr=0.1)  # bit-identical training
    report = doc.report()
    assert not report.healthy
    spots = next(f for f in report.findings if f.code == "unwatched_activations")
    assert "a bug in the tracker" in spots.message and "step 1" in spots.message
    monkeypatch.undo()
    assert_a_fresh_watch_is_exact()


def test_a_failure_while_entering_the_forward_releases_every_global_patch(monkeypatch):
    def broken(self):
        raise RuntimeError("cannot hook")

    monkeypatch.setattr(probes.Probes, "_start_discovery", broken)
    model = planted()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with rd.watch(model) as doc:
            model(torch.randn(4, 4)).sum().backward()
            doc.step()
    assert "cannot hook" in doc.tracker.failure
    monkeypatch.undo()
    assert_a_fresh_watch_is_exact()


# -- 8. runs that work without reludoctor work with it -----------------------------------------


def test_float64_default_dtype_is_watched_exactly():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = planted()
        with rd.watch(model, window=5, sample_every=1) as doc:
            train(model, doc, 3, lambda _: torch.randn(32, 4), lr=0.01)
    finally:
        torch.set_default_dtype(previous)
    report = doc.report()
    assert report.layer("1").dead_units == [1, 4, 7, 9, 12]
    assert report.layer("1").grad_norm is not None
    assert doc.tracker.failure is None


def test_a_first_forward_in_inference_mode_then_training():
    model = planted()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with rd.watch(model, window=5, sample_every=1) as doc:
        with torch.inference_mode():
            model(torch.randn(32, 4))
        train(model, doc, 3, lambda _: torch.randn(32, 4), lr=0.01)
        opt.step()
    assert doc.tracker.failure is None
    assert doc.report().layer("1").dead_units == [1, 4, 7, 9, 12]


def test_reludoctor_run_keeps_scripts_that_run_without_it_running(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(
        textwrap.dedent(
            """
            import torch
            import torch.nn.functional as F
            from torch import nn

            torch.set_default_dtype(torch.float64)

            class Net(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.block = torch.jit.script(nn.Sequential(nn.Linear(4, 8), nn.ReLU()))
                    self.fc = nn.Linear(8, 8)
                    self.out = nn.Linear(8, 1)

                def forward(self, x):
                    return self.out(F.relu(self.fc(self.block(x))))

            model = Net()
            opt = torch.optim.SGD(model.parameters(), lr=0.01)
            with torch.inference_mode():
                model(torch.randn(4, 4))
            for _ in range(12):
                opt.zero_grad()
                model(torch.randn(16, 4)).square().mean().backward()
                opt.step()
            print("trained")
            """
        )
    )
    command = [sys.executable, "-m", "reludoctor", "run", "--out", str(tmp_path / "out")]
    result = subprocess.run(
        [*command, "--window", "5", str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "trained\n"
    report = rd.Report.load_json(tmp_path / "out" / "Net.json")
    assert [layer.name for layer in report.layers] == ["fc:relu"]
    assert "unwatched_activations" in scan_codes(report)


# -- 9. units follow the layer that produced the values ----------------------------------------


@pytest.mark.parametrize("inplace", [True, False])
def test_an_activation_on_a_view_counts_the_producing_layers_units(inplace):
    class Viewed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 12)
            self.out = nn.Linear(12, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc(x)
            if inplace:
                F.relu(h.view(-1, 3, 4), inplace=True)
            else:
                h = F.relu(h.view(-1, 3, 4)).view(-1, 12)
            return self.out(h)

    model = Viewed()
    dead = plant_dead(model.fc, [0, 5, 11], alive_bias=0.5, scale=0.1)
    with rd.watch(model, window=5, sample_every=1) as doc:
        train(model, doc, 3, lambda _: torch.randn(16, 4))
    layer = doc.report().layer("fc:relu")
    assert (layer.units, layer.dead_units) == (12, dead)
    assert layer.fire_rate is not None and layer.fire_rate[0] == 0 and layer.fire_rate[1] == 1


def test_an_error_at_a_windows_end_never_reaches_the_training_loop():
    def broken(window):
        raise OSError("disk full")

    model = planted()
    warned = pytest.warns(RuntimeWarning, match="disk full")
    with warned, rd.watch(model, window=2, on_window=broken) as doc:
        train(model, doc, 5, lambda _: torch.randn(16, 4))
    assert doc.steps == 5
    report = doc.report()
    assert not report.healthy and "step 2" in report.findings[0].message
    with pytest.raises(ValueError, match="scalar loss"):
        doc.step(loss=torch.ones(3))  # misuse is still said at once


def test_an_error_of_its_own_never_raises_even_when_warnings_are_errors(monkeypatch, caplog):
    def broken(self, layer, x):
        raise RuntimeError("a bug in the tracker")

    monkeypatch.setattr(Tracker, "observe_input", broken)
    model = planted()
    with warnings.catch_warnings(), caplog.at_level("ERROR", logger="reludoctor"):
        warnings.simplefilter("error")  # as under python -W error
        with rd.watch(model, window=5) as doc:
            train(model, doc, 2, lambda _: torch.randn(8, 4))
    assert "a bug in the tracker" in caplog.text and doc.tracker.failure is not None
