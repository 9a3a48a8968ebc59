"""torch.compile: a compiled model trains exactly as without reludoctor, and its report says
plainly that the compiled graph was not counted (never a crash, never a silent empty report)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import plant_dead, train
from torch import nn

import reludoctor as rd
from reludoctor import probes


class Net(nn.Module):
    """One module ReLU and one functional relu, with planted dead units."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(4, 8)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(8, 8)
        self.out = nn.Linear(8, 2)
        plant_dead(self.fc1, [1, 3], alive_bias=0.5, scale=0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.fc2(self.act(self.fc1(x)))))


def compiled(order: str, backend: str) -> tuple[nn.Module, rd.Monitor]:
    """(the compiled callable, its monitor), set up in the user's ``order``."""
    model = Net()
    if order == "watch, then torch.compile":
        doc = rd.watch(model, window=5)
        return torch.compile(model, backend=backend), doc
    if order == "torch.compile, then watch the wrapper":
        model = torch.compile(model, backend=backend)
    else:
        model.compile(backend=backend)  # in place
    with pytest.warns(RuntimeWarning, match="does not count inside torch.compile graphs"):
        return model, rd.watch(model, window=5)  # said at once: it is compiled already


@pytest.mark.parametrize(
    ("order", "backend"),
    [
        ("watch, then torch.compile", "inductor"),
        ("torch.compile, then watch the wrapper", "inductor"),
        ("model.compile(), then watch", "inductor"),
        ("watch, then torch.compile", "aot_eager"),
        ("torch.compile, then watch the wrapper", "eager"),
    ],
)
def test_a_compiled_model_trains_untouched_and_its_report_says_it_was_not_counted(order, backend):
    batches = [torch.randn(16, 4) for _ in range(4)]
    twin = torch.compile(Net(), backend=backend)
    expected = train(twin, None, 4, lambda step: batches[step], lr=0.1)
    call, doc = compiled(order, backend)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # nothing to warn of: the report says it
        losses = train(call, doc, 4, lambda step: batches[step], lr=0.1)
        doc.close()
        report = doc.report()
    assert losses == expected
    assert report.meta["compiled"] is True and report.meta["model"] == "Net"
    assert not report.healthy
    finding = next(f for f in report.findings if f.code == "unwatched_activations")
    assert finding.kind == "coverage" and "torch.compile" in finding.message
    patcher = probes._patcher()
    assert (patcher.functional.count, patcher.tensor.count) == (0, len(probes._WATCHED))


def test_watching_a_compiled_model_adds_no_graph_and_no_break():
    from torch._dynamo.utils import counters

    def graphs(watched: bool) -> tuple[int, int]:
        torch._dynamo.reset()
        counters.clear()
        model = torch.compile(Net(), backend="aot_eager")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            doc = rd.watch(model, window=3) if watched else None
        train(model, doc, 8, lambda _: torch.randn(16, 4), lr=0.1)
        breaks = sum(counters["graph_break"].values())
        return counters["stats"]["unique_graphs"], breaks

    assert graphs(watched=True) == graphs(watched=False) == (1, 0)


def test_an_uncompiled_model_says_it_ran_uncompiled():
    model = Net()
    with rd.watch(model, window=5) as doc:
        train(model, doc, 2, lambda _: torch.randn(16, 4))
    report = doc.report()
    assert report.meta["compiled"] is False
    assert report.layer("act").dead_units == [1, 3]


def test_reludoctor_run_on_a_script_that_compiles_its_model(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn

            model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
            compiled = torch.compile(model, backend="aot_eager")
            opt = torch.optim.SGD(model.parameters(), lr=0.01)
            for _ in range(4):
                opt.zero_grad()
                compiled(torch.randn(16, 4)).square().mean().backward()
                opt.step()
            print("trained")
            """
        )
    )
    command = [sys.executable, "-m", "reludoctor", "run", "-q", "--out", str(tmp_path / "out")]
    result = subprocess.run(
        [*command, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "trained\n"
    assert result.stderr.count("Warning") == 1  # said once, and torch's hook warning is not
    assert "does not count inside torch.compile graphs" in result.stderr
    report = rd.Report.load_json(tmp_path / "out" / "Sequential.json")
    assert report.meta["compiled"] is True
    assert "unwatched_activations" in {finding.code for finding in report.findings}
