"""``reludoctor scan`` on hostile and broken files: nothing runs, bad input exits 2 with one
line, and every message says what was wrong (issue 16, parts 1, 7 and 11)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from reludoctor.cli import app
from tests.fixtures.models import mlp, planted_mlp

runner = CliRunner()
FACTORY = "tests.fixtures.models:mlp"


class TouchesAFile:
    """Unpickling this creates the file at ``path``: what a stranger's code could do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (open, (str(self.path), "w"))


@pytest.fixture
def probe(tmp_path: Path) -> Path:
    path = tmp_path / "probe.npy"
    np.save(path, np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32))
    return path


@pytest.fixture
def exported(tmp_path: Path) -> Path:
    """An ordinary ``torch.export.save`` archive with a dynamic batch dimension."""
    path = tmp_path / "model.pt2"
    batch = torch.export.Dim("batch")
    program = torch.export.export(planted_mlp(), (torch.randn(8, 4),), dynamic_shapes=({0: batch},))
    torch.export.save(program, path)
    return path


def rewritten(source: Path, target: Path, change) -> Path:
    """A copy of the archive ``source`` with each member's bytes passed through
    ``change(name, data)`` (names without the archive's root folder)."""
    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(target, "w") as out:
        root = archive.namelist()[0].split("/")[0]
        for info in archive.infolist():
            name = info.filename.removeprefix(f"{root}/")
            out.writestr(f"{target.stem}/{name}", change(name, archive.read(info)))
    return target


def touching_pickle(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save(TouchesAFile(marker), buffer)
    return buffer.getvalue()


def scan(*args: object) -> object:
    return runner.invoke(app, ["scan", *(str(a) for a in args)])


def assert_bad_input(result, *phrases: str) -> None:
    """Exit 2 with exactly one line, holding every phrase."""
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    for phrase in phrases:
        assert phrase in lines[0], lines[0]


def test_pt2_with_a_pickled_weight_runs_nothing_without_trust(tmp_path, exported, probe):
    marker = tmp_path / "pwned"

    def change(name: str, data: bytes) -> bytes:
        if name == "data/weights/weight_0":
            return touching_pickle(marker)
        if name == "data/weights/model_weights_config.json":
            config = json.loads(data)
            config["config"]["0.weight"]["use_pickle"] = True
            return json.dumps(config).encode()
        return data

    evil = rewritten(exported, tmp_path / "evil.pt2", change)
    assert_bad_input(scan(evil, "--data", probe), "data/weights/weight_0", "--trust")
    assert not marker.exists()
    # trusted, torch.export.load is let to unpickle it (and so runs its code)
    scan(evil, "--data", probe, "--trust")
    assert marker.exists()


def test_pt2_with_pickled_sample_inputs_runs_nothing_without_trust(tmp_path, exported, probe):
    marker = tmp_path / "pwned"

    def change(name: str, data: bytes) -> bytes:
        return touching_pickle(marker) if name == "data/sample_inputs/model.pt" else data

    evil = rewritten(exported, tmp_path / "evil.pt2", change)
    assert_bad_input(scan(evil, "--data", probe), "data/sample_inputs/model.pt", "--trust")
    assert not marker.exists()
    scan(evil, "--data", probe, "--trust")
    assert marker.exists()


TOUCH = "__import__('pathlib').Path('MARKER').touch()"


def in_symbolic_shape(program: dict) -> None:
    """torch.export.load evaluates symbolic shapes with sympy.sympify."""
    size = program["graph_module"]["graph"]["tensor_values"]["input"]["sizes"][0]
    size["as_expr"]["expr_str"] = f"{TOUCH} or {size['as_expr']['expr_str']}"


def in_guard(program: dict) -> None:
    """.module() compiles guards into the module's code."""
    program["guards_code"] = [TOUCH]


def in_tensor_named_metadata(program: dict) -> None:
    """Free text is let be in node metadata only, not under any key named so."""

    def rename(value: object) -> None:
        if isinstance(value, dict):
            if value.get("as_tensor") == {"name": "input"}:
                value["as_tensor"] = {"name": "metadata"}
            for item in value.values():
                rename(item)
        elif isinstance(value, list):
            for item in value:
                rename(item)

    rename(program)
    values = program["graph_module"]["graph"]["tensor_values"]
    values["metadata"] = values.pop("input")
    in_symbolic_shape({"graph_module": {"graph": {"tensor_values": {"input": values["metadata"]}}}})


@pytest.mark.parametrize("inject", [in_symbolic_shape, in_guard, in_tensor_named_metadata])
def test_pt2_with_python_in_its_program_runs_nothing_without_trust(
    tmp_path, exported, probe, inject
):
    marker = tmp_path / "pwned"

    def change(name: str, data: bytes) -> bytes:
        if name != "models/model.json":
            return data
        program = json.loads(data)
        inject(program)
        return json.dumps(program).replace("MARKER", marker.as_posix()).encode()

    evil = rewritten(exported, tmp_path / "evil.pt2", change)
    assert_bad_input(scan(evil, "--data", probe), "Python code in models/model.json", "--trust")
    assert not marker.exists()
    scan(evil, "--data", probe, "--trust")
    assert marker.exists()  # the check above guarded a real way in


def test_ordinary_exported_programs_load_without_trust(tmp_path, exported, probe):
    result = scan(exported, "--data", probe, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["layers"][0]["dead_units"] == [1, 4]
    # guards and symbolic expressions of a conv net with automatic dynamic shapes are plain
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten())
    auto = torch.export.Dim.AUTO
    program = torch.export.export(
        conv, (torch.randn(4, 3, 8, 8),), dynamic_shapes=({0: auto, 2: auto, 3: auto},)
    )
    path = tmp_path / "conv.pt2"
    torch.export.save(program, path)
    images = tmp_path / "images.npy"
    np.save(images, np.random.default_rng(0).normal(size=(6, 3, 10, 10)).astype(np.float32))
    assert scan(path, "--data", images, "--quiet").exit_code == 0


@pytest.mark.parametrize("suffix", [".pt", ".ts"])
def test_corrupt_zip_directory_exits_2(tmp_path, probe, suffix):
    path = tmp_path / f"model{suffix}"
    if suffix == ".pt":
        torch.save(mlp().state_dict(), path)
    else:
        torch.jit.script(mlp()).save(str(path))
    data = bytearray(path.read_bytes())
    entry = data.rfind(b"PK\x01\x02")  # the last central directory entry
    data[entry : entry + 4] = b"XXXX"
    path.write_bytes(bytes(data))
    assert_bad_input(scan(path, "--data", probe, "--model", FACTORY), "damaged zip archive")


def test_model_factory_that_raises_exits_2(tmp_path, probe, monkeypatch):
    (tmp_path / "raising_factory.py").write_text(
        "def build():\n    raise ValueError('no GPU here')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    weights = tmp_path / "weights.pt"
    torch.save(mlp().state_dict(), weights)
    result = scan(weights, "--data", probe, "--model", "raising_factory:build")
    assert_bad_input(result, "--model raising_factory:build raised ValueError: no GPU here")


def test_model_factory_that_needs_arguments_exits_2(tmp_path, probe, monkeypatch):
    (tmp_path / "factory_with_args.py").write_text("def build(width):\n    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    weights = tmp_path / "weights.pt"
    torch.save(mlp().state_dict(), weights)
    result = scan(weights, "--data", probe, "--model", "factory_with_args:build")
    assert_bad_input(result, "needs arguments (width)", "takes none")


def test_a_static_batch_pt2_takes_whole_batches_of_its_size_and_says_what_is_left_out(
    tmp_path, probe
):
    path = tmp_path / "static.pt2"
    torch.export.save(torch.export.export(mlp(), (torch.randn(8, 4),)), path)
    for extra in ([], ["--batch-size", 5]):  # 20 samples: batches of 8, the last 4 left out
        result = scan(path, "--data", probe, "--json", *extra)
        assert result.exit_code in (0, 1), result.output
        data = json.loads(result.stdout)
        assert [layer["inputs"] for layer in data["layers"]] == [16]
        assert data["meta"]["probe_note"].endswith(
            "the last 4 of 20 samples left out (not a whole batch)"
        )
    assert data["meta"]["probe_note"].startswith("batches of 8 samples, the size the program")


def test_a_static_batch_pt2_with_fewer_samples_than_its_batch_exits_2(tmp_path, probe):
    path = tmp_path / "static.pt2"
    torch.export.save(torch.export.export(mlp(), (torch.randn(32, 4),)), path)
    result = scan(path, "--data", probe)
    assert_bad_input(result, "exported for batches of 32 samples", "the probe data has 20")


def test_sparse_probe_data_exits_2(tmp_path, exported):
    sparse = tmp_path / "probe.pt"
    torch.save(torch.randn(20, 4).to_sparse(), sparse)
    assert_bad_input(scan(exported, "--data", sparse), "sparse", "to_dense()")


def test_batch_size_beyond_int64_exits_2_and_big_ones_mean_one_batch(exported, probe):
    result = scan(exported, "--data", probe, "--batch-size", "99999999999999999999")
    assert result.exit_code == 2, result.output
    assert "--batch-size" in result.output and "Traceback" not in result.output
    result = scan(exported, "--data", probe, "--batch-size", 2**62, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["meta"]["batches"] == 1


def test_a_directory_given_as_a_file_says_so(tmp_path, exported, probe):
    assert_bad_input(scan(tmp_path, "--data", probe), f"{tmp_path} is a directory")
    assert_bad_input(scan(exported, "--data", tmp_path), f"{tmp_path} is a directory")


def test_random_bytes_are_not_a_pytorch_file(tmp_path, probe):
    path = tmp_path / "model.pt"
    data = np.random.default_rng(0).bytes(1000)
    assert data[:1] != b"\x80"  # not even the start of a pickle
    path.write_bytes(data)
    assert_bad_input(scan(path, "--data", probe), "is not a PyTorch file")


@pytest.mark.parametrize("name", ["model.pt", "model.pt2", "model.ts", "probe.npy"])
def test_an_empty_file_says_so(tmp_path, exported, probe, name):
    empty = tmp_path / "empty" / name
    empty.parent.mkdir()
    empty.touch()
    args = [exported, "--data", empty] if name == "probe.npy" else [empty, "--data", probe]
    assert_bad_input(scan(*args), f"{empty} is empty")


def test_state_dict_mismatch_lists_missing_and_unexpected_keys(tmp_path, probe):
    path = tmp_path / "weights.pt"
    state = mlp().state_dict()
    state["extra.weight"] = state.pop("2.bias")
    torch.save(state, path)
    result = scan(path, "--data", probe, "--model", FACTORY)
    assert_bad_input(result, 'Missing key(s) in state_dict: "2.bias"', '"extra.weight"')


def test_installed_command_finds_factories_in_the_current_directory(tmp_path, probe):
    command = Path(sys.executable).with_name("reludoctor")
    if not command.exists():
        pytest.skip("the reludoctor console script is not installed beside this Python")
    (tmp_path / "localmodels.py").write_text(
        "import torch\n\ndef build():\n    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())\n"
    )
    weights = tmp_path / "weights.pt"
    torch.manual_seed(0)
    torch.save(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU()).state_dict(), weights)
    src = str(Path(__file__).resolve().parents[1] / "src")  # this checkout's reludoctor
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [str(command), "scan", "weights.pt", "--data", str(probe), "--model", "localmodels:build"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode in (0, 1), result.stderr
    assert "cannot import" not in result.stderr


def test_export_load_warnings_do_not_reach_the_user(tmp_path, exported, probe):
    # a weight the config names is missing: torch.export.load logs a whole traceback, then
    # fails on its fallback to the older format
    broken = rewritten(exported, tmp_path / "broken.pt2", lambda name, data: data)
    with zipfile.ZipFile(broken) as archive:
        kept = [(i, archive.read(i)) for i in archive.infolist() if "weight_0" not in i.filename]
    with zipfile.ZipFile(broken, "w") as archive:
        for info, data in kept:
            archive.writestr(info, data)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "reludoctor", "scan", str(broken), "--data", str(probe)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr
    assert "not a readable torch.export program" in result.stderr
