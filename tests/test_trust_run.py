"""``reludoctor run`` can be trusted: it never writes outside ``--out``, never loses a report to
a scheduler's signal, never presents an older report as this run's, tells a bad ``--out``
before training, keeps every message to one line and is quiet when asked."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from test_run import dead_units, reludoctor_run, report, script

#: Seconds a subprocess may take: generous, for a loaded machine.
TIMEOUT = 300

#: Trains one model per class name in NAMES (each with a planted dead unit), in that order.
NAMED_MODELS = """
import torch
from torch import nn

def build(self):
    nn.Module.__init__(self)
    self.layer = nn.Linear(2, 4)
    with torch.no_grad():
        self.layer.bias[1] = -1e4

for name in NAMES:
    forward = lambda self, x: torch.relu(self.layer(x))
    model = type(name, (nn.Module,), {"__init__": build, "forward": forward})()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    for _ in range(3):
        optimizer.zero_grad(); model(torch.randn(8, 2)).sum().backward(); optimizer.step()
"""


def named_models(path: Path, names: list[str]) -> Path:
    path.write_text(f"NAMES = {names!r}\n{NAMED_MODELS}")
    return path


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def run_until_ready(tmp_path: Path, path: Path, *args: str) -> subprocess.Popen[str]:
    """``reludoctor run`` on ``path`` with the script's ``args``, once the script printed
    "trained"; the stopping signals at their defaults, whatever this process has (``nohup``)."""

    def default_signals() -> None:
        for signum in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)

    command = [sys.executable, "-m", "reludoctor", "run", "--out", str(tmp_path / "out")]
    process = subprocess.Popen(
        [*command, str(path), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        preexec_fn=default_signals,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(process.stdout.readline()), daemon=True)
    reader.start()
    reader.join(TIMEOUT)
    if lines != ["trained\n"]:
        process.kill()
        pytest.fail(f"the script did not get ready: {lines} {process.communicate()[1]}")
    return process


# -- Part 4: file names from model classes ---------------------------------------------------
def test_model_class_names_cannot_write_outside_out_and_each_gets_its_report(tmp_path):
    names = ["../../escaped", "a/b", "A\\B", "CON", ".hidden", "x:y*?", "a_b"]
    path = named_models(tmp_path / "train.py", names)
    out = tmp_path / "runs" / "out"
    command = [sys.executable, "-m", "reludoctor", "run", "-q", "--out", str(out), str(path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    stems = ["_.._escaped", "a_b", "A_B-2", "_CON", "hidden", "x_y__", "a_b-3"]
    reports = [f"{stem}{suffix}" for stem in stems for suffix in (".json", ".html")]
    expected = {"train.py", "runs/out/.reludoctor-run.json", *(f"runs/out/{r}" for r in reports)}
    assert files_under(tmp_path) == expected
    models = [json.loads((out / f"{stem}.json").read_text())["meta"]["model"] for stem in stems]
    assert models == names
    assert result.stderr.splitlines() == [f"report: {out / r}" for r in reports]


# -- Part 10: signals, stale reports, an unwritable --out -----------------------------------
@pytest.mark.parametrize(
    ("signum", "code", "ending"),
    [(signal.SIGTERM, 143, "terminated"), (signal.SIGHUP, 129, "hangup")],
)
def test_sigterm_and_sighup_write_the_reports_and_exit_as_a_shell_reports(
    tmp_path, signum, code, ending
):
    path = script(tmp_path, "print('trained', flush=True)\nimport time\ntime.sleep(600)")
    process = run_until_ready(tmp_path, path, "--steps", "6")
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=TIMEOUT)
    assert process.returncode == code, stderr
    data = report(tmp_path)
    assert data["meta"]["ending"] == ending and data["meta"]["steps"] == 6
    assert dead_units(data) == {"body.1": [2, 7, 11], "hidden:relu": [0, 5]}
    assert "Traceback" not in stderr


def test_only_signals_that_would_kill_the_script_stop_it_and_handlers_come_back(tmp_path):
    """A SIGHUP the caller ignores (``nohup``) stays ignored; a SIGTERM stops the script with
    its report; the handlers are as before once the run is over."""
    path = named_models(tmp_path / "train.py", ["Net"])
    path.write_text(
        path.read_text()
        + "import os, signal, time\n"
        + "os.kill(os.getpid(), signal.SIGHUP)\n"
        + "print('survived the hangup', flush=True)\n"
        + "os.kill(os.getpid(), signal.SIGTERM)\n"
        + "time.sleep(600)\n"
    )
    driver = textwrap.dedent(
        f"""
        import signal
        from reludoctor.run import ScriptRun
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        run = ScriptRun({str(path)!r}, [])
        code = run.run()
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        print(code, run.ending, run.reports[0].meta["steps"])
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", driver], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "survived the hangup\n143 terminated 3\n"


def test_a_previous_runs_reports_are_never_left_as_this_runs(tmp_path):
    from reludoctor.run import ScriptRun

    out = tmp_path / "out"
    first = ScriptRun(named_models(tmp_path / "first.py", ["Net"]), [])
    assert first.run() == 0
    first.write(out)
    (out / "notes.json").write_text("{}")  # the user's own: kept
    victim = tmp_path / "victim.json"  # outside out: a manifest cannot have it removed
    victim.write_text("{}")
    manifest = json.loads((out / ".reludoctor-run.json").read_text())
    manifest["reports"] += ["../victim.json", str(victim)]
    (out / ".reludoctor-run.json").write_text(json.dumps(manifest))

    result = reludoctor_run(tmp_path, str(named_models(tmp_path / "other.py", ["Other"])))
    assert result.returncode == 0, result.stderr
    assert files_under(out) == {".reludoctor-run.json", "notes.json", "Other.json", "Other.html"}
    assert victim.exists()

    (tmp_path / "noop.py").write_text("print('hello')\n")
    result = reludoctor_run(tmp_path, str(tmp_path / "noop.py"))
    assert result.returncode == 0 and "no report" in result.stderr
    assert files_under(out) == {".reludoctor-run.json", "notes.json"}


def test_the_checked_out_is_the_one_written_when_the_script_changes_directory(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    path = named_models(tmp_path / "train.py", ["Net"])
    path.write_text(f"import os\nos.chdir({str(elsewhere)!r})\n" + path.read_text())
    command = [sys.executable, "-m", "reludoctor", "run", "-q", "--out", "out", str(path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert files_under(tmp_path / "out") == {".reludoctor-run.json", "Net.json", "Net.html"}
    assert files_under(elsewhere) == set()


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_an_unwritable_out_fails_before_the_script_starts(tmp_path, where):
    (tmp_path / "file").write_text("not a folder")
    out = tmp_path / "file" if where == "a file" else tmp_path / "file" / "out"
    path = script(tmp_path, "")
    path.write_text("print('started', flush=True)\n" + path.read_text())
    command = [sys.executable, "-m", "reludoctor", "run", "--out", str(out), str(path)]
    result = subprocess.run(
        [*command, "--steps", "2"], capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path
    )
    assert result.returncode == 2
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    if where == "a file":
        assert line == f"error: --out {out} is a file: give a folder for the reports"
    else:
        assert line == (
            f"error: cannot write the reports into {out} (Not a directory: {out}): give --out "
            "a folder you can write"
        )


# -- Part 11: -q -------------------------------------------------------------------------------
def test_quiet_silences_the_findings_logged_while_training(tmp_path):
    path = tmp_path / "flat.py"  # outputs identical across inputs: a live finding at step 2
    path.write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn
            model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
            with torch.no_grad():
                model[2].weight.zero_()
            optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
            for _ in range(4):
                optimizer.zero_grad()
                model(torch.randn(16, 4)).pow(2).mean().backward()
                optimizer.step()
            """
        )
    )
    options = ["--window", "2", "--sample-every", "1"]
    live = "reludoctor at step 2: the network's outputs are nearly identical"
    loud = reludoctor_run(tmp_path, *options, str(path))
    assert loud.returncode == 0 and live in loud.stderr
    quiet = reludoctor_run(tmp_path, "-q", *options, str(path))
    assert quiet.returncode == 0, quiet.stderr
    out = tmp_path / "out"
    assert quiet.stderr.splitlines() == [
        f"report: {out / 'Sequential.json'}",
        f"report: {out / 'Sequential.html'}",
    ]


# -- Part 12: one-line messages, whatever the path's length ----------------------------------
def test_run_messages_are_one_line_under_a_long_path(tmp_path):
    folder = tmp_path / ("long-folder-name-" * 6) / ("another-long-folder-" * 6)
    folder.mkdir(parents=True)
    assert len(str(folder)) > 200

    bad = folder / "train.py"
    bad.write_text("this is not python at all\n")
    result = reludoctor_run(folder, str(bad))
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error: {bad} is not a Python script: SyntaxError")

    noop = folder / "noop.py"
    noop.write_text("pass\n")
    result = reludoctor_run(folder, str(noop))
    assert result.stderr.splitlines() == [
        f"reludoctor: {noop} trained no model that reludoctor could see (no module ran a "
        "forward in training mode with gradients on): no report"
    ]

    trains = named_models(folder / "net.py", ["Net"])
    result = reludoctor_run(folder, "-q", str(trains))
    out = folder / "out"
    assert result.stderr.splitlines() == [
        f"report: {out / 'Net.json'}",
        f"report: {out / 'Net.html'}",
    ]
