"""`reludoctor study`: the article's "Solution?" list measured on E1's data."""

from __future__ import annotations

import csv
import io
import json

import pytest
from typer.testing import CliRunner

from reludoctor.cli import app
from reludoctor.errors import InputError
from reludoctor.study import VARIANTS, Outcome, StudyResult, run_study, select


@pytest.fixture(scope="module")
def small_study() -> StudyResult:
    keys = ["baseline", "more_layers", "negative_uniform", "tanh", "batch_norm"]
    return run_study(samples=40_000, epochs=6, seeds=1, keys=keys)


def outcome(result: StudyResult, key: str) -> Outcome:
    return next(o for o in result.outcomes if o.key == key)


def test_the_dead_baseline_is_measured_and_diagnosed(small_study):
    for key in ("baseline", "more_layers"):
        dead = outcome(small_study, key)
        assert dead.verdict == "stuck" and dead.agrees is True
        assert dead.first_layer_grad == 0.0 and dead.dead_fraction == 1.0
        assert dead.causes == ["unnormalized_inputs"]
        assert dead.r2 < 0  # a dead unit predicts 0


def test_a_live_start_helps_and_contradicts_the_article(small_study):
    # weights in (-1, 0) on inputs in (-1, 0) give positive pre-activations: the unit lives
    live = outcome(small_study, "negative_uniform")
    assert live.verdict in ("learns", "learns slowly")
    assert live.first_layer_grad > 0 and live.dead_fraction == 0.0
    assert live.agrees is False
    lines = small_study.disagreements()
    assert any(line.startswith("uniform(-1, 0): the article:") for line in lines)


def test_activations_that_cannot_die_have_no_dead_fraction(small_study):
    tanh = outcome(small_study, "tanh")
    assert tanh.dead_fraction is None and tanh.first_layer_grad > 0
    batch_norm = outcome(small_study, "batch_norm")
    assert batch_norm.article is None and batch_norm.agrees is None
    assert batch_norm.verdict != "stuck" and batch_norm.causes == []


def test_the_treatment_column_names_the_remedy_that_lowered_the_loss(small_study):
    baseline = outcome(small_study, "baseline").treatment
    assert baseline is not None and baseline["steps"] == 200
    best = max(
        (t for t in baseline["trials"] if t["improvement"] is not None),
        key=lambda t: t["improvement"],
    )
    assert best["improvement"] >= 0.05 and best["loss"] < baseline["untreated_loss"]
    assert baseline["ranking"][0] == best["remedy"]
    assert baseline["verdict"] == f"{best['remedy']} {-best['improvement']:+.0%}"
    assert outcome(small_study, "batch_norm").treatment["verdict"] == "no finding to treat"


def test_the_treatment_can_be_left_out():
    result = run_study(samples=5_000, epochs=1, seeds=1, keys=["baseline"], treat_steps=0)
    assert result.outcomes[0].treatment is None and result.treat_steps == 0
    assert next(csv.DictReader(io.StringIO(result.to_csv())))["treatment"] == ""


def make_outcome(verdicts: list[str], article: str | None) -> Outcome:
    return Outcome("k", "k", {}, 1.0, 1.0, 0.0, None, 0.0, [], article, "", verdicts)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("verdicts", "verdict", "agrees_stuck", "agrees_helps"),
    [
        (["stuck"] * 3, "stuck", True, False),
        (["learns"] * 3, "learns", False, True),
        (["learns", "learns slowly"], "learns slowly", False, True),
        (["stuck", "learns", "learns"], "stuck in 1 of 3 runs", False, False),
    ],
)
def test_verdicts_over_seeds_and_agreement(verdicts, verdict, agrees_stuck, agrees_helps):
    assert make_outcome(verdicts, "stuck").verdict == verdict
    assert make_outcome(verdicts, "stuck").agrees is agrees_stuck
    assert make_outcome(verdicts, "helps").agrees is agrees_helps
    assert make_outcome(verdicts, None).agrees is None


def test_csv_and_json_are_written_and_read_back(small_study, tmp_path):
    csv_path, json_path = small_study.save(tmp_path / "new" / "folder")
    rows = list(csv.DictReader(io.StringIO(csv_path.read_text())))
    assert [r["key"] for r in rows] == [o.key for o in small_study.outcomes]
    assert rows[0]["verdict"] == "stuck" and rows[0]["causes"] == "unnormalized_inputs"
    assert rows[0]["treatment"] == small_study.outcomes[0].treatment["verdict"]
    data = json.loads(json_path.read_text())
    assert data["outcomes"][2]["changes"] == {"init": "negative_uniform"}
    assert data["disagreements"] == small_study.disagreements()
    assert data["treat_steps"] == 200
    assert data["outcomes"][0]["treatment"]["trials"][0]["remedy"]
    assert sorted(p.name for p in json_path.parent.iterdir()) == ["study.csv", "study.json"]


def test_the_grid_covers_the_articles_list():
    keys = {v.key for v in VARIANTS}
    wanted = {"baseline", "more_data", "dropout", "more_layers", "more_epochs", "he_normal"}
    wanted |= {"he_uniform", "lecun_uniform", "random_uniform", "negative_uniform", "tanh"}
    wanted |= {"sigmoid", "leaky_relu", "prelu", "elu", "selu", "batch_norm", "lower_lr"}
    assert keys == wanted
    selu = next(v for v in VARIANTS if v.key == "selu")
    assert selu.changes == {"activation": "selu", "init": "lecun_normal", "dropout": 0.1}


def test_bad_input_names_the_problem():
    with pytest.raises(InputError, match=r"unknown study variant.*nope.*baseline"):
        select(["baseline", "nope"])
    with pytest.raises(InputError, match="seeds >= 1"):
        run_study(seeds=0)
    with pytest.raises(InputError, match="treat_steps >= 0"):
        run_study(treat_steps=-1)


runner = CliRunner()


def test_cli_prints_the_table_and_writes_both_files(tmp_path):
    args = ["study", "--samples", "5000", "--epochs", "2", "--out", str(tmp_path)]
    result = runner.invoke(app, [*args, "--variant", "baseline", "--variant", "selu"])
    assert result.exit_code == 0, result.output
    assert "baseline" in result.output and "SELU" in result.output
    assert "target y = -x @ [1, 2, 3, 4]" in result.output
    assert "treatment" in result.output and "for 200 steps" in result.output
    assert (tmp_path / "study.csv").exists() and (tmp_path / "study.json").exists()
    as_json = runner.invoke(app, [*args, "--variant", "baseline", "--json"])
    assert as_json.exit_code == 0
    assert json.loads(as_json.stdout)["outcomes"][0]["verdict"] == "stuck"
    untreated = runner.invoke(app, [*args, "--variant", "baseline", "--treat-steps", "0"])
    assert untreated.exit_code == 0 and "treatment" not in untreated.output


def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path):
    result = runner.invoke(app, ["study", "--variant", "nope", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert "unknown study variant" in result.stderr
    assert not (tmp_path / "x").exists()
    blocker = tmp_path / "file"
    blocker.write_text("keep")
    args = ["study", "--samples", "2000", "--epochs", "1", "--variant", "baseline"]
    result = runner.invoke(app, [*args, "--out", str(blocker)])
    assert result.exit_code == 2 and "cannot write the study" in result.stderr
    assert blocker.read_text() == "keep"
