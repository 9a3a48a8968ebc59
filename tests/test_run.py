"""``reludoctor run train.py``: an unmodified script, watched through global hooks."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

#: A plain training script: no reludoctor import. Layer "0" (nn.ReLU as "1") has planted dead
#: units; the second hidden layer goes through F.relu, with its own planted dead units.
SCRIPT = """
import sys
import torch
import torch.nn.functional as F
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.ReLU())
        self.hidden = nn.Linear(16, 12)
        self.head = nn.Linear(12, 1)

    def forward(self, x):
        return self.head(F.relu(self.hidden(self.body(x))))

torch.manual_seed(0)
net = Net()
with torch.no_grad():
    for layer in (net.body[0], net.hidden):
        layer.weight.abs_()
        layer.bias.fill_(0.1)
    net.body[0].bias[[2, 7, 11]] = -1e4
    net.hidden.bias[[0, 5]] = -1e4
optimizer = torch.optim.SGD(net.parameters(), lr=1e-4)
steps = int(sys.argv[sys.argv.index("--steps") + 1])
for step in range(steps):
    x = torch.rand(32, 6)
    loss = (net(x) - x.sum(1, keepdim=True)).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    with torch.no_grad():  # validation: not a training forward
        net.eval(); net(torch.rand(8, 6)); net.train()
{ending}
"""


def script(tmp_path: Path, ending: str = "") -> Path:
    path = tmp_path / "train.py"
    path.write_text(textwrap.dedent(SCRIPT).replace("{ending}", ending))
    return path


def reludoctor_run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "reludoctor", "run", "--out", str(tmp_path / "out"), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)


def report(tmp_path: Path, name: str = "Net") -> dict:
    return json.loads((tmp_path / "out" / f"{name}.json").read_text())


def dead_units(data: dict) -> dict[str, list[int]]:
    return {layer["name"]: layer["dead_units"] for layer in data["layers"]}


def test_a_plain_script_gets_its_planted_units_reported_exactly(tmp_path):
    result = reludoctor_run(tmp_path, "--window", "10", str(script(tmp_path)), "--steps", "30")
    assert result.returncode == 0, result.stderr
    data = report(tmp_path)
    assert dead_units(data) == {"body.1": [2, 7, 11], "hidden:relu": [0, 5]}
    assert data["meta"]["steps"] == 30
    assert data["meta"]["ending"] == "finished"
    assert [w["end_step"] for w in data["windows"]] == [10, 20, 30]
    assert all(w["loss_mean"] is not None for w in data["windows"])  # the script's loss
    assert data["facts"]["optimizer"]["type"] == "SGD"
    # validation forwards are not counted, nor the first training forward (the model is found
    # in it): 32 training samples a step from the second on
    assert [w["layers"][0]["samples"] for w in data["windows"]] == [9 * 32, 320, 320]
    assert (tmp_path / "out" / "Net.html").read_text().startswith("<!DOCTYPE html>")
    assert "report:" in result.stderr and "Net.json" in result.stderr


def test_sys_exit_code_passes_through_and_the_report_is_written(tmp_path):
    path = script(tmp_path, "sys.exit(3)")
    result = reludoctor_run(tmp_path, str(path), "--steps", "5")
    assert result.returncode == 3
    data = report(tmp_path)
    assert data["meta"]["ending"] == "exit" and data["meta"]["steps"] == 5


def test_an_exception_exits_1_with_the_scripts_traceback_and_a_report(tmp_path):
    path = script(tmp_path, "raise RuntimeError('diverged')")
    result = reludoctor_run(tmp_path, str(path), "--steps", "4")
    assert result.returncode == 1
    assert "RuntimeError: diverged" in result.stderr
    assert 'train.py", line' in result.stderr and "runpy" not in result.stderr
    assert report(tmp_path)["meta"]["ending"] == "error"


def _ctrl_c_stops() -> None:
    """In the child before it runs: SIGINT as a terminal delivers it (a process started
    while SIGINT is ignored keeps ignoring it, and Python then raises no KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_writes_the_report_and_exits_130(tmp_path):
    path = script(tmp_path, "print('trained', flush=True)\nimport time\ntime.sleep(60)")
    command = [
        sys.executable,
        "-m",
        "reludoctor",
        "run",
        "--out",
        str(tmp_path / "out"),
        str(path),
        "--steps",
        "6",
    ]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        preexec_fn=_ctrl_c_stops,  # a terminal's Ctrl-C, whatever the test process ignores
    )
    assert process.stdout.readline().strip() == "trained"
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)  # as reludoctor_run allows a run
    assert process.returncode == 130, stderr
    data = report(tmp_path)
    assert data["meta"]["ending"] == "interrupted" and data["meta"]["steps"] == 6


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "error: no script at {path}: give the path of a Python training script"),
        ("this is not python at all\n", "error: {path} is not a Python script: SyntaxError"),
        (b"\x00\x01binary", "error: {path} is not a Python script: "),
    ],
)
def test_bad_scripts_get_a_clear_error(tmp_path, content, message):
    path = tmp_path / "train.py"
    if isinstance(content, str):
        path.write_text(content)
    elif content is not None:
        path.write_bytes(content)
    result = reludoctor_run(tmp_path, str(path))
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith(message.format(path=path))
    if content is not None:
        assert line.endswith("; reludoctor run runs Python training scripts")
    assert not (tmp_path / "out").exists()


def test_a_script_that_trains_nothing_says_so(tmp_path):
    path = tmp_path / "noop.py"
    path.write_text("print('hello')\n")
    result = reludoctor_run(tmp_path, str(path))
    assert result.returncode == 0 and result.stdout == "hello\n"
    assert result.stderr == (
        f"reludoctor: {path} trained no model that reludoctor could see (no module ran a forward "
        "in training mode with gradients on): no report\n"
    )


def test_two_models_with_their_own_optimizers_each_get_their_steps(tmp_path):
    from reludoctor.run import ScriptRun

    path = tmp_path / "gan.py"
    path.write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn
            g = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 2))
            d = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 1))
            opt_g = torch.optim.Adam(g.parameters())
            opt_d = torch.optim.SGD(d.parameters(), lr=0.01)
            for step in range(6):
                opt_d.zero_grad(); d(torch.randn(4, 2)).mean().backward(); opt_d.step()
                if step % 2 == 0:
                    opt_g.zero_grad(); d(g(torch.randn(4, 2))).mean().backward(); opt_g.step()
            """
        )
    )
    run = ScriptRun(path, [], window=2)
    assert run.run() == 0
    steps = {r.facts["optimizer"]["type"]: r.meta["steps"] for r in run.reports}
    assert steps == {"SGD": 6, "Adam": 3}
    assert [p.name for p in run.write(tmp_path / "out")] == [
        "Sequential.json",
        "Sequential.html",
        "Sequential-2.json",
        "Sequential-2.html",
    ]


def test_a_script_that_watches_its_model_itself_keeps_its_own_monitor(tmp_path):
    from reludoctor.run import ScriptRun

    path = tmp_path / "own.py"
    path.write_text(
        textwrap.dedent(
            """
            import torch, reludoctor as rd
            model = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.ReLU())
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            with rd.watch(model, window=2) as doc:
                for _ in range(3):
                    opt.zero_grad(); model(torch.randn(4, 2)).sum().backward(); opt.step()
                    doc.step()
            assert doc.report().meta["steps"] == 3
            """
        )
    )
    run = ScriptRun(path, [], window=2)
    with pytest.warns(RuntimeWarning, match="not watching Sequential"):
        assert run.run() == 0
    assert run.watched == []


def test_repair_runs_the_autopilot_on_an_unmodified_script(tmp_path):
    path = tmp_path / "narrow.py"
    path.write_text(
        "import dataclasses\n"
        "from reludoctor.scenarios import REPAIR_SCENARIOS\n"
        "scenario = dataclasses.replace(REPAIR_SCENARIOS['narrow-circles'], epochs=8)\n"
        "scenario.run(watch=False)\n"
    )
    result = reludoctor_run(tmp_path, "--repair", "--window", "50", "-q", str(path))
    assert result.returncode == 0, result.stderr
    data = report(tmp_path, "Sequential")
    actions = data["meta"]["autopilot"]
    assert actions and actions[0]["action"] == "revive"
    assert "identical" in actions[0]["evidence"]
