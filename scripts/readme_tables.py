"""Write the README's outcome tables from measurements, never by hand.

    python scripts/readme_tables.py            # scenario outcomes (about 20 s)
    python scripts/readme_tables.py --study    # also the study grid (about 3 minutes)
    python scripts/readme_tables.py --treat    # also rd.treat and live revival (about 30 s)
    python scripts/readme_tables.py --check    # exit 1 when the scenario table is stale

Each table lives in README.md between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``.
The scenario table holds finding codes only, so it is the same on every machine; the study
table holds numbers from the machine that ran it.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

from reludoctor.api.monitor import silenced_live_findings
from reludoctor.api.treat import treat
from reludoctor.diagnose.summaries import Window
from reludoctor.scenarios import SCENARIOS, HighLearningRate
from reludoctor.study import StudyResult, run_study

#: Steps each remedy trains for in the treatment table (E4's own run is 50 steps).
TREAT_STEPS = {"e4": 50}

README = Path(__file__).resolve().parent.parent / "README.md"


def _codes(codes: list[str]) -> str:
    return ", ".join(f"`{c}`" for c in codes) or "none"


def scenario_table() -> str:
    """Run every scenario at its defaults, watched, and tabulate what the rules found."""
    torch.set_num_threads(2)
    rows = [
        "| scenario | the brief's cause | causes found | symptoms found | as expected |",
        "|---|---|---|---|---|",
    ]
    for key, scenario_type in SCENARIOS.items():
        scenario = scenario_type()
        with silenced_live_findings():
            report = scenario.run().report
        assert report is not None
        causes = [f.code for f in report.causes()]
        symptoms = list(dict.fromkeys(f.code for f in report.findings if f.kind == "symptom"))
        expected = set(scenario.expected_causes) == set(causes) and (
            set(scenario.expected_symptoms) <= set(symptoms)
        )
        if not scenario.expected_causes:
            expected = expected and report.healthy
        rows.append(
            f"| {key}: {scenario.name} | {_codes(list(scenario.expected_causes))} "
            f"| {_codes(causes)} | {_codes(symptoms)} | {'yes' if expected else '**no**'} |"
        )
    return "\n".join(rows)


def study_table(result: StudyResult) -> str:
    """The study grid as Markdown, with where it disagrees with the article."""
    rows = [
        f"{result.samples} samples, {result.epochs} epochs, {result.seeds} seeds per variant, "
        f"{result.seconds:.0f} s on the machine that wrote this table. treatment: `rd.treat` "
        f"on the first seed's fresh model, {result.treat_steps} steps per remedy.",
        "",
        "| variant | train loss | val loss | R^2 | dead | grad L1 | diagnosis | verdict "
        "| article | treatment |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for o in result.outcomes:
        dead = f"{o.dead_fraction:.0%}" if o.dead_fraction is not None else "-"
        mark = " **(disagrees)**" if o.agrees is False else ""
        rows.append(
            f"| {o.label} | {o.train_loss:.3g} | {o.val_loss:.3g} | {o.r2:.2f} | {dead} "
            f"| {o.first_layer_grad:.2g} | {_codes(o.causes)} | {o.verdict}{mark} "
            f"| {o.article or '-'} | {o.treatment['verdict'] if o.treatment else '-'} |"
        )
    return "\n".join(rows)


def treatment_table() -> str:
    """rd.treat on every scenario: the top remedy against the untreated copy."""
    torch.set_num_threads(2)
    rows = [
        "| scenario | steps | untreated loss | worst layer dead, untreated | top remedy | its loss "
        "| worst layer dead, treated |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, scenario_type in SCENARIOS.items():
        scenario = scenario_type(**({"samples": 20_000} if key == "e1" else {}))
        setup = scenario.build()
        batches = setup.batches(scenario.batch_size)
        steps = TREAT_STEPS.get(key, 200)
        with silenced_live_findings():
            result = treat(setup.model, setup.optimizer, batches, setup.loss_fn, steps=steps)
        winner = result.winner
        untreated_dead = f"{result.untreated_worst_dead_fraction:.0%}"
        if winner is None:
            remedy, loss, dead = "none recommended", "-", "-"
        else:
            remedy = f"`{winner.label}`"
            loss = f"{winner.loss:.3g}"
            dead = f"{winner.worst_dead_fraction:.0%}"
        rows.append(
            f"| {key} | {steps} | {result.untreated_loss:.3g} | {untreated_dead} | {remedy} "
            f"| {loss} | {dead} |"
        )
    return "\n".join(rows)


#: Seeds of E4 in the live-revival table.
REVIVAL_SEEDS = range(5)


def revival_table() -> str:
    """E4 with and without live revival, per seed: the loss over the last window, the
    validation loss and the alive share at the end, and what revival did."""
    rows = [
        "| seed | without revival: last-window loss | validation | alive "
        "| with `revive=True`: last-window loss | validation | alive | revival's actions |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for seed in REVIVAL_SEEDS:
        cells = [str(seed)]
        for revive in (False, True):
            with silenced_live_findings():
                result = HighLearningRate(seed=seed).run(revive=revive)
            report = result.report
            assert report is not None
            dead = report.mortal_dead_fraction() or 0.0
            cells += [
                _window_loss(report.windows[-1]),
                f"{result.val_loss[-1]:.3g}",
                f"{1 - dead:.0%}",
            ]
        actions = report.meta.get("revivals", [])
        cells.append(
            ", ".join(f"{a['action']} at {a['step']}" for a in actions if _acted(a)) or "none"
        )
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _window_loss(window: Window) -> str:
    if window.loss_nonfinite or window.loss_mean is None:
        return "inf/NaN"
    return f"{window.loss_mean:.3g}"


def _acted(action: dict) -> bool:
    return action["action"] == "rewind" or bool(action.get("revived"))


def replace_section(text: str, name: str, body: str) -> str:
    """``text`` with the section ``name`` replaced by ``body``."""
    pattern = re.compile(rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)", re.DOTALL)
    if not pattern.search(text):
        raise SystemExit(f"README.md has no <!-- {name}:start/end --> markers")
    return pattern.sub(lambda m: f"{m.group(1)}{body}\n{m.group(2)}", text)


def section(text: str, name: str) -> str:
    match = re.search(rf"<!-- {name}:start -->\n(.*?)\n<!-- {name}:end -->", text, re.DOTALL)
    return match.group(1) if match else ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when the table is stale")
    parser.add_argument("--study", action="store_true", help="also run and write the study")
    parser.add_argument("--treat", action="store_true", help="also rd.treat and live revival")
    args = parser.parse_args()
    text = README.read_text()
    table = scenario_table()
    if args.check:
        if section(text, "scenario-outcomes") != table:
            print("README.md's scenario table is stale: run python scripts/readme_tables.py")
            return 1
        return 0
    text = replace_section(text, "scenario-outcomes", table)
    if args.study:
        text = replace_section(text, "study", study_table(run_study()))
    if args.treat:
        text = replace_section(text, "treatment", treatment_table())
        text = replace_section(text, "revival", revival_table())
    README.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
