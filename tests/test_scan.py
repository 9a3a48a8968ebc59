"""rd.scan: every kind of probe data, planted dead units, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import reludoctor as rd
from reludoctor.errors import InputError
from tests.fixtures.models import PLANTED, planted_mlp


def conv_net(dead_channels: tuple[int, ...]) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 6 * 6, 2))
    with torch.no_grad():
        model[0].bias.fill_(0.5)
        model[0].bias[list(dead_channels)] = -1e4
    return model


@pytest.mark.parametrize(
    "make_data",
    [
        lambda x: x,
        lambda x: x.numpy().astype(np.float64),
        lambda x: DataLoader(TensorDataset(x, torch.zeros(len(x))), batch_size=32),
        lambda x: [x[:100], x[100:]],
        lambda x: ((batch, None) for batch in x.split(50)),
    ],
    ids=["tensor", "numpy-float64", "dataloader", "list", "generator-of-tuples"],
)
def test_scan_reports_planted_dead_units_exactly(make_data):
    torch.manual_seed(1)
    report = rd.scan(planted_mlp(), make_data(torch.randn(300, 4)))
    (layer,) = report.layers
    assert layer.dead_units == sorted(PLANTED)
    assert layer.samples == 300
    assert report.meta["samples"] == 300


def test_scan_conv_channels_and_restores_training_mode():
    model = conv_net(dead_channels=(0, 5))
    model.train()
    report = rd.scan(model, torch.randn(40, 3, 8, 8), batch_size=16)
    (layer,) = report.layers
    assert layer.units == 6
    assert layer.dead_units == [0, 5]
    assert report.meta["batches"] == 3
    assert model.training
    assert "forward" not in model.__dict__


def test_scan_runs_in_eval_mode_without_grad():
    seen = {}

    class Probe(nn.Module):
        def forward(self, x):
            seen["training"] = self.training
            seen["grad"] = torch.is_grad_enabled()
            return x

    model = nn.Sequential(nn.Linear(4, 4), Probe(), nn.ReLU())
    rd.scan(model, torch.randn(10, 4))
    assert seen == {"training": False, "grad": False}


def test_scan_dict_batches_are_keyword_arguments():
    class KeywordModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, features):
            return torch.relu(self.fc(features))

    model = KeywordModel()
    with torch.no_grad():
        model.fc.bias.copy_(torch.tensor([-1e4, 0.5, 0.5]))
    report = rd.scan(model, [{"features": torch.randn(64, 4)}])
    assert report.layer("fc:relu").dead_units == [0]


def test_scan_of_exported_program_sees_aten_activations():
    model = planted_mlp()
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (torch.randn(8, 4),), dynamic_shapes=({0: batch},))
    report = rd.scan(program.module(), torch.randn(200, 4))
    (layer,) = report.layers
    assert layer.dead_units == sorted(PLANTED)
    assert layer.name == "1"


def test_scan_shape_mismatch_names_both_shapes():
    with pytest.raises(InputError) as caught:
        rd.scan(planted_mlp(), torch.randn(10, 5))
    message = str(caught.value)
    assert "(10, 5)" in message
    assert "(batch, ..., 4)" in message


def test_scan_conv_shape_mismatch_names_channels():
    with pytest.raises(InputError, match=r"\(batch, 3, H, W\)"):
        rd.scan(conv_net(()), torch.randn(4, 1, 8, 8))


@pytest.mark.parametrize(
    "data", [torch.randn(0, 4), [], np.zeros((0, 4), dtype=np.float32)], ids=str
)
def test_scan_empty_data_is_refused(data):
    with pytest.raises(InputError, match="empty"):
        rd.scan(planted_mlp(), data)


def test_scan_rejects_non_module_and_bad_batch_size():
    with pytest.raises(TypeError, match="str"):
        rd.scan("model.pt", torch.randn(3, 4))
    with pytest.raises(ValueError, match="batch_size"):
        rd.scan(planted_mlp(), torch.randn(3, 4), batch_size=0)
    with pytest.raises(InputError, match="int"):
        rd.scan(planted_mlp(), 5)


def test_scan_model_raising_inside_forward_leaves_nothing_behind():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            torch.relu(self.fc(x))
            raise RuntimeError("boom")

    model = Broken()
    with pytest.raises(InputError, match="boom"):
        rd.scan(model, torch.randn(3, 4))
    assert "forward" not in model.__dict__
    assert torch.relu(torch.tensor([-1.0])).item() == 0.0
    assert torch.nn.functional.relu.__module__ == "torch.nn.functional"


def test_scan_counts_nonfinite_activations_without_crashing():
    model = planted_mlp()
    data = torch.randn(50, 4)
    data[3, 0] = float("nan")
    report = rd.scan(model, data)
    (layer,) = report.layers
    assert layer.nonfinite_units > 0
    report.to_json()  # stays valid JSON with NaN inside


def test_scan_of_model_without_activations_warns_and_is_empty():
    with pytest.warns(RuntimeWarning, match="no ReLU-family activation"):
        report = rd.scan(nn.Linear(4, 2), torch.randn(5, 4))
    assert report.layers == []
    assert report.healthy
