"""The package's layout holds: a light `import reludoctor`, and no private name of one module
used by another (the layering itself is checked by `lint-imports`, run by ./dev test)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parent.parent / "src" / "reludoctor"

#: What a PyTorch user's `import reludoctor` (and watching, scanning, reading a report) must
#: not load: other frameworks, TensorBoard's writer, and the multi-process machinery.
HEAVY = (
    "tensorflow",
    "keras",
    "tensorboard",
    "lightning",
    "matplotlib",
    "reludoctor.keras.watch",
    "reludoctor.probe.distributed",
    "reludoctor.report.tensorboard",
)


def _loaded_after(code: str) -> set[str]:
    script = f"import sys, json\n{code}\nprint(json.dumps(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300
    )
    return set(json.loads(result.stdout.splitlines()[-1]))


def _heavy(loaded: set[str]) -> list[str]:
    return sorted(name for name in loaded if name.split(".")[0] in HEAVY or name in HEAVY)


def test_import_reludoctor_loads_only_the_package():
    loaded = _loaded_after("import reludoctor")
    assert sorted(name for name in loaded if name.startswith("reludoctor")) == ["reludoctor"]
    assert "torch" not in loaded


@pytest.mark.parametrize(
    "code",
    [
        "import reludoctor as rd; rd.watch, rd.scan, rd.treat, rd.Report, rd.Thresholds",
        # a watched training step and its report
        "import torch, reludoctor as rd\n"
        "net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())\n"
        "with rd.watch(net) as doc:\n"
        "    net(torch.randn(8, 4)).sum().backward(); doc.step()\n"
        "doc.report().to_json()",
    ],
)
def test_watching_with_pytorch_loads_no_other_framework(code):
    assert _heavy(_loaded_after(code)) == []


def test_public_names_resolve_and_unknown_ones_fail_clearly():
    import reludoctor as rd

    for name in rd.__all__:
        assert getattr(rd, name) is not None
    assert rd.remedies.kaiming_init is not None  # a public submodule, as an attribute
    with pytest.raises(AttributeError, match="no attribute 'wacth'"):
        _ = rd.wacth


def _module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_uses(path: Path, package: Path = SOURCE) -> list[str]:
    """Private names of other reludoctor modules that ``path`` (in ``package``) imports or
    reads."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    here = _module_name(path, package)
    uses, aliases = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("reludoctor"):
            for alias in node.names:
                target = f"{node.module}.{alias.name}"
                if node.module != here and _private(alias.name):
                    uses.append(f"{here} imports {target}")
                aliases[alias.asname or alias.name] = target
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("reludoctor"):
                    aliases[alias.asname or alias.name.split(".")[0]] = alias.name
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and _private(node.attr)
        ):
            uses.append(f"{here} reads {aliases[node.value.id]}.{node.attr}")
    return uses


def test_no_private_name_crosses_modules():
    found = [use for path in sorted(SOURCE.rglob("*.py")) for use in private_uses(path)]
    assert found == []


def test_the_private_name_check_finds_one(tmp_path):
    fake = tmp_path / "reludoctor" / "probe" / "probes.py"
    fake.parent.mkdir(parents=True)
    fake.write_text(
        "from reludoctor.probe.tracker import _step, merge\n"
        "from reludoctor.probe.probes import _own\n"  # its own private name: fine
        "from reludoctor import text\n"
        "text._x, text.__doc__\n"
    )
    assert private_uses(fake, tmp_path / "reludoctor") == [
        "reludoctor.probe.probes imports reludoctor.probe.tracker._step",
        "reludoctor.probe.probes reads reludoctor.text._x",
    ]
