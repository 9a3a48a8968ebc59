"""A normalisation layer's shift as a cause of dead units: Conv -> BatchNorm -> ReLU, the
standard CNN block, with a negative beta (training) or running statistics that push eval
inputs below 0 (scan); the remedy that sets the shift back to 0 revives them."""

from __future__ import annotations

import pytest
import torch
from conftest import train
from torch import nn

import reludoctor as rd
from reludoctor.fix.remedies import RemedyError, reset_norm_shift

HELD = [1, 4, 6]


class Block(nn.Module):
    """Conv (no bias) -> BatchNorm -> ReLU -> pooled head, beta -5 on ``HELD`` channels."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.head = nn.Linear(8, 2)
        with torch.no_grad():
            self.bn.bias[HELD] = -5.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu(self.bn(self.conv(x))).mean((2, 3)))


def images(_step: int = 0) -> torch.Tensor:
    return torch.randn(8, 3, 6, 6)


def causes(report: rd.Report) -> dict[str, rd.Finding]:
    return {f.code: f for f in report.findings if f.kind == "cause"}


def test_a_negative_batch_norm_shift_is_named_as_the_cause():
    model = Block()
    with rd.watch(model, window=3) as doc:
        train(model, doc, 3, images)
    report = doc.report()
    assert report.layer("relu").dead_units == HELD
    finding = causes(report)["negative_norm_shift"]
    assert finding.layer == "relu"
    assert "shift (bias, beta) of bn" in finding.message
    assert finding.evidence["held_units"] == HELD and finding.evidence["producer"] == "bn"
    assert finding.evidence["shift_mean"] == pytest.approx(-5.0, abs=0.01)
    assert finding.remedies[0] == "reset_norm_shift"
    assert "negative_bias" not in {u["code"] for u in report.unjudged}


def test_running_statistics_that_push_eval_inputs_below_zero_are_named():
    model = Block().eval()
    with torch.no_grad():
        model.bn.bias.zero_()
        model.bn.running_mean[HELD] = 50.0  # far above what eval inputs give
    report = rd.scan(model, torch.randn(64, 3, 6, 6))
    assert report.layer("relu").dead_units == HELD
    finding = causes(report)["negative_norm_shift"]
    assert "running statistics of bn" in finding.message
    assert report.layer("relu").held_by == "running_stats"


def test_a_layer_norm_shift_before_a_relu_is_found_too():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        model[1].bias[[0, 5]] = -10.0
    with rd.watch(model) as doc:
        train(model, doc, 3, lambda _: torch.randn(16, 4))
    report = doc.report()
    assert report.layer("2").held_by == "norm_shift"
    assert causes(report)["negative_norm_shift"].evidence["held_units"] == [0, 5]


def test_a_healthy_batch_norm_block_has_no_cause_and_is_judged():
    model = Block()
    with torch.no_grad():
        model.bn.bias.zero_()
    with rd.watch(model, window=3) as doc:
        train(model, doc, 3, images)
    report = doc.report()
    assert report.layer("relu").dead == 0
    assert not causes(report)
    assert "negative_bias" not in {u["code"] for u in report.unjudged}


def test_setting_the_shift_back_to_zero_revives_the_units_and_can_be_undone():
    model = Block()
    record = reset_norm_shift(model)
    assert record.changed == ["bn: 3 negative shifts set to 0 (mean -5)"]
    assert (model.bn.bias >= 0).all()
    with rd.watch(model, window=3) as doc:
        train(model, doc, 3, images)
    assert doc.report().layer("relu").dead == 0  # the fix worked
    record.undo()
    assert model.bn.bias[HELD].tolist() == [-5.0, -5.0, -5.0]


def test_the_remedy_refuses_a_model_without_a_normalisation_layer():
    with pytest.raises(RemedyError, match="no batch, group or layer norm"):
        reset_norm_shift(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
