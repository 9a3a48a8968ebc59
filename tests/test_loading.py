"""Loading checkpoints and probe data: the safe default, and every supported format."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch

from reludoctor.errors import InputError, UntrustedFileError
from reludoctor.loading import load_model, load_probe_data
from tests.fixtures.models import planted_mlp

FACTORY = "tests.fixtures.models:planted_mlp"


def test_state_dict_needs_and_uses_factory(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(planted_mlp().state_dict(), path)
    with pytest.raises(InputError, match="--model"):
        load_model(path)
    model = load_model(path, factory=FACTORY)
    assert torch.equal(model[0].bias, planted_mlp()[0].bias)


def test_nested_checkpoint_state_dict(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"epoch": 3, "model_state_dict": planted_mlp().state_dict()}, path)
    assert isinstance(load_model(path, factory=FACTORY), torch.nn.Module)


def test_pickled_module_is_refused_unless_trusted(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(planted_mlp(), path)
    with pytest.raises(UntrustedFileError, match="--trust") as caught:
        load_model(path)
    assert "arbitrary code" in str(caught.value)
    assert isinstance(load_model(path, trust=True), torch.nn.Module)


def test_export_program_and_torchscript(tmp_path):
    model = planted_mlp()
    example = torch.randn(8, 4)
    pt2 = tmp_path / "model.pt2"
    batch = torch.export.Dim("batch")
    torch.export.save(torch.export.export(model, (example,), dynamic_shapes=({0: batch},)), pt2)
    assert torch.allclose(load_model(pt2)(example), model(example))
    scripted = tmp_path / "model.ts"
    torch.jit.script(model).save(str(scripted))
    converted = load_model(scripted, example=example)
    assert torch.allclose(converted(example), model(example))


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("no_colon", "package.module:function"),
        ("not.a.real.module:f", "cannot import"),
        ("tests.fixtures.models:missing", "no function"),
        ("tests.fixtures.models:not_a_model", "not a torch.nn.Module"),
    ],
)
def test_bad_factories(tmp_path, factory, message):
    path = tmp_path / "weights.pt"
    torch.save(planted_mlp().state_dict(), path)
    with pytest.raises(InputError, match=message):
        load_model(path, factory=factory)


def test_state_dict_that_does_not_fit(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"0.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(InputError, match="does not fit"):
        load_model(path, factory=FACTORY)


def test_missing_files(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_model(tmp_path / "nope.pt")
    with pytest.raises(InputError, match="does not exist"):
        load_probe_data(tmp_path / "nope.npy")


def test_probe_data_formats(tmp_path):
    x = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "one.npz", anything=x)
    np.savez(tmp_path / "many.npz", x=x, y=np.zeros(6))
    np.savez(tmp_path / "ambiguous.npz", a=x, b=x)
    torch.save(torch.from_numpy(x), tmp_path / "x.pt")
    torch.save({"inputs": torch.from_numpy(x)}, tmp_path / "dict.pt")
    for name in ("x.npy", "one.npz", "many.npz", "x.pt", "dict.pt"):
        assert np.array_equal(load_probe_data(tmp_path / name).numpy(), x), name
    assert np.array_equal(load_probe_data(tmp_path / "ambiguous.npz", key="b").numpy(), x)
    with pytest.raises(InputError, match="--data-key"):
        load_probe_data(tmp_path / "ambiguous.npz")
    with pytest.raises(InputError, match="no array 'c'"):
        load_probe_data(tmp_path / "ambiguous.npz", key="c")


def test_pickled_probe_data_is_refused(tmp_path):
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputError):
        load_probe_data(tmp_path / "objects.npy")
    torch.save({"x": Fraction(1, 3)}, tmp_path / "objects.pt")
    with pytest.raises(UntrustedFileError):
        load_probe_data(tmp_path / "objects.pt")


class ConvHead(torch.nn.Module):
    """Conv -> ReLU module, then a Linear -> F.relu with two units held dead by their bias."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 6, 3)
        self.act = torch.nn.ReLU()
        self.fc = torch.nn.Linear(6, 5)
        with torch.no_grad():
            self.fc.weight.abs_()  # its inputs are non-negative: each unit fires...
            self.fc.bias.fill_(0.1)
            self.fc.bias[[1, 3]] = -100.0  # ... but these two

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.relu(self.fc(self.act(self.conv(x)).mean((2, 3))))


def test_an_exported_program_is_named_and_diagnosed_as_the_module_it_came_from(tmp_path):
    import reludoctor as rd

    model = ConvHead().eval()
    probe = torch.randn(40, 3, 8, 8)
    path = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(model, (probe[:8],)), path)
    exported = rd.scan(load_model(path), probe, batch_size=8)
    original = rd.scan(model, probe, batch_size=8)
    assert [layer.name for layer in exported.layers] == ["act", "fc:relu"]
    assert [layer.name for layer in exported.layers] == [layer.name for layer in original.layers]
    assert exported.layer("act").unit_dim == 1 and exported.layer("act").units == 6
    assert exported.layer("fc:relu").dead_units == original.layer("fc:relu").dead_units == [1, 3]

    def causes(report):
        return sorted((f.code, f.layer) for f in report.findings if f.kind == "cause")

    assert causes(exported) == causes(original) == [("negative_bias", "fc:relu")]


class ConvBatchNorm(torch.nn.Module):
    """Conv (no bias) -> BatchNorm -> ReLU, three channels held below 0 by beta."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, bias=False)
        self.bn = torch.nn.BatchNorm2d(8)
        self.relu = torch.nn.ReLU()
        self.head = torch.nn.Linear(8, 2)
        with torch.no_grad():
            self.bn.bias[[0, 2, 7]] = -50.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_an_exported_conv_batch_norm_block_finds_the_same_shift_as_the_module():
    import reludoctor as rd

    model = ConvBatchNorm().eval()
    probe = torch.randn(32, 3, 8, 8)
    program = torch.export.export(model, (probe[:8],))
    exported = rd.scan(program.module(), probe, batch_size=8)
    original = rd.scan(model, probe, batch_size=8)
    for report in (exported, original):
        layer = report.layer("relu")
        assert (layer.unit_dim, layer.units, layer.dead_units) == (1, 8, [0, 2, 7])
        assert layer.held_by == "norm_shift"
    assert sorted(f.code for f in exported.causes()) == ["negative_norm_shift"]
    assert [f.message for f in exported.causes()] == [f.message for f in original.causes()]
