"""The README's scenario table is the script's output, not a hand-made copy."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_script():
    spec = importlib.util.spec_from_file_location(
        "readme_tables", ROOT / "scripts" / "readme_tables.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_scenario_table_matches_a_fresh_run():
    script = load_script()
    table = script.scenario_table()
    assert "**no**" not in table  # every scenario yields what the brief expects
    current = script.section((ROOT / "README.md").read_text(), "scenario-outcomes")
    assert current == table, "README.md is stale: run python scripts/readme_tables.py"


def test_sections_are_replaced_between_their_markers_only():
    script = load_script()
    text = "a\n<!-- t:start -->\nold\n<!-- t:end -->\nb\n"
    assert (
        script.replace_section(text, "t", "new") == "a\n<!-- t:start -->\nnew\n<!-- t:end -->\nb\n"
    )
    assert script.section(script.replace_section(text, "t", "x|y"), "t") == "x|y"
