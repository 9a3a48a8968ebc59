"""Remedies: He/LeCun initialisation, activation swaps, batch norm, lower learning rate, and
their undo (including the roll-back of a remedy that fails part-way)."""

from __future__ import annotations

import copy
import json
import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from conftest import identity_relu, leftovers, randn_input, swapped_globals, train
from torch import nn

from reludoctor.errors import InputError
from reludoctor.fix.remedies import (
    RemedyError,
    RemedyRecord,
    add_batch_norm,
    following_activations,
    kaiming_init,
    lecun_init,
    lower_learning_rate,
    swap_activation,
)


@pytest.fixture(autouse=True)
def _no_global_leak():
    """conftest's check that no wrapper leaks, without its full ``gc.collect()`` (about 0.1 s
    a test, most of this file's time): remedies install no wrappers, and the scan behind
    ``swap_activation(example=...)`` removes its own before returning, so none waits on the
    collector (a leak fails here at once instead)."""
    assert not swapped_globals(), "a previous test leaked wrappers"
    yield
    assert not swapped_globals(), f"wrappers still installed after the test: {swapped_globals()}"


class FunctionalNet(nn.Module):
    """Its only activation is an ``F.relu`` call in ``forward``: no module to rewrite."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


class Nested(nn.Module):
    """A Sequential body inside a custom module, then an output layer."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU6())
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.body(x))


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert list(state) == list(saved)
    for key, value in saved.items():
        assert torch.equal(state[key], value), key


def std(tensor: torch.Tensor) -> float:
    return float(tensor.detach().double().std())


# -- following_activations ---------------------------------------------------------------------


def test_following_activations_pairs_each_layer_with_the_next_activation():
    model = nn.Sequential(
        nn.ReLU(),  # before any layer: belongs to none
        nn.Linear(4, 8),
        nn.BatchNorm1d(8),
        nn.Dropout(0.1),
        nn.ReLU(),
        nn.Tanh(),  # a second activation: the first one counts
        nn.Linear(8, 8),
        nn.LeakyReLU(0.2),
        nn.Linear(8, 2),
    )
    after = following_activations(model)
    assert list(after) == ["1", "6", "8"]
    assert after["1"] is model[4]
    assert after["6"] is model[7]
    assert after["8"] is None


def test_following_activations_sees_no_functional_call():
    assert following_activations(FunctionalNet()) == {"fc1": None, "fc2": None}


# -- kaiming_init -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("activation", "gain"),
    [
        (nn.ReLU(), math.sqrt(2.0)),
        (nn.LeakyReLU(0.2), math.sqrt(2.0 / (1 + 0.2**2))),
        (nn.PReLU(init=0.5), math.sqrt(2.0 / (1 + 0.5**2))),
        (nn.Tanh(), 5.0 / 3.0),
    ],
    ids=["relu", "leaky_relu", "prelu", "tanh"],
)
def test_kaiming_normal_std_uses_the_gain_of_the_following_activation(activation, gain):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(400, 300), activation, nn.Linear(300, 10))
    with torch.no_grad():
        model[0].weight.mul_(10.0)
        model[0].bias.fill_(3.0)
    record = kaiming_init(model)
    weight = model[0].weight
    assert std(weight) == pytest.approx(gain / math.sqrt(400), rel=0.03)
    assert abs(float(weight.detach().mean())) < 0.1 * gain / math.sqrt(400)
    assert torch.count_nonzero(model[0].bias) == 0
    assert record.remedy == "kaiming_init"
    assert record.changed[0].startswith("0: He normal, fan_in")
    assert record.details == {"mode": "fan_in", "distribution": "normal"}


def test_kaiming_describes_the_leaky_slope():
    model = nn.Sequential(nn.Linear(4, 8), nn.LeakyReLU(0.2), nn.Linear(8, 1))
    assert kaiming_init(model).changed == ["0: He normal, fan_in, leaky_relu slope 0.2"]


def test_kaiming_fan_out_uses_the_output_width():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(400, 100), nn.ReLU(), nn.Linear(100, 1))
    record = kaiming_init(model, mode="fan_out")
    assert std(model[0].weight) == pytest.approx(math.sqrt(2.0 / 100), rel=0.03)
    assert record.details["mode"] == "fan_out"
    kaiming_init(model, mode="fan_in")
    assert std(model[0].weight) == pytest.approx(math.sqrt(2.0 / 400), rel=0.03)


def test_kaiming_uniform_is_bounded_by_the_he_limit():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(400, 300), nn.ReLU(), nn.Linear(300, 1))
    kaiming_init(model, distribution="uniform")
    limit = math.sqrt(2.0) * math.sqrt(3.0 / 400)
    weight = model[0].weight.detach().abs()
    assert float(weight.max()) <= limit
    assert float(weight.max()) > 0.99 * limit
    assert std(model[0].weight) == pytest.approx(math.sqrt(2.0 / 400), rel=0.03)


def test_kaiming_conv_fan_in_counts_the_kernel():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(16, 32, 5), nn.ReLU(), nn.Conv2d(32, 4, 1))
    kaiming_init(model)
    assert std(model[0].weight) == pytest.approx(math.sqrt(2.0 / (16 * 5 * 5)), rel=0.05)
    assert torch.count_nonzero(model[0].bias) == 0


def test_kaiming_leaves_the_output_layer_alone_and_says_so():
    model = Nested()
    head = snapshot(model.head)
    record = kaiming_init(model)
    assert [c.split(":")[0] for c in record.changed] == ["body.0", "body.2"]
    assert len(record.skipped) == 1 and record.skipped[0].startswith("head:")
    assert "output layer" in record.skipped[0]
    assert_same_state(model.head, head)
    assert torch.count_nonzero(model.body[0].bias) == 0


def test_kaiming_undo_restores_the_exact_weights():
    model = mlp()
    before = snapshot(model)
    record = kaiming_init(model)
    assert not torch.equal(model[0].weight, before["0.weight"])
    record.undo()
    assert_same_state(model, before)
    # a second undo has nothing left to do and must not disturb anything
    with torch.no_grad():
        model[0].weight.add_(1.0)
    changed = snapshot(model)
    record.undo()
    assert_same_state(model, changed)


@pytest.mark.parametrize(
    "kwargs", [{"mode": "fan_avg"}, {"distribution": "gaussian"}, {"mode": "FAN_IN"}]
)
def test_kaiming_rejects_bad_mode_or_distribution(kwargs):
    model = mlp()
    before = snapshot(model)
    with pytest.raises(RemedyError, match="mode must be"):
        kaiming_init(model, **kwargs)
    assert_same_state(model, before)


@pytest.mark.parametrize(
    "model",
    [nn.Sequential(nn.ReLU(), nn.Tanh()), nn.Sequential(nn.Linear(4, 2)), FunctionalNet()],
    ids=["no_layer", "no_activation", "functional_only"],
)
def test_kaiming_needs_a_layer_followed_by_an_activation_module(model):
    before = snapshot(model)
    with pytest.raises(RemedyError, match="kaiming_init"):
        kaiming_init(model)
    assert_same_state(model, before)


def test_remedy_error_is_an_input_error():
    assert issubclass(RemedyError, InputError)
    with pytest.raises(InputError):
        kaiming_init(nn.Sequential(nn.ReLU()))


def test_kaiming_on_a_frozen_layer_rolls_back_every_earlier_change():
    model = mlp()
    model[2].weight.requires_grad_(False)
    before = copy.deepcopy(model)
    with pytest.raises(RemedyError, match=r"2\.weight") as caught:
        kaiming_init(model)
    assert "frozen" in str(caught.value)
    # layer "0" was re-initialised before layer "2" was reached: it must be back as it was
    for (name, param), (_, old) in zip(
        model.named_parameters(), before.named_parameters(), strict=True
    ):
        assert torch.equal(param, old), name
        assert param.requires_grad == old.requires_grad


def test_a_frozen_output_layer_is_no_obstacle():
    model = mlp()
    model[4].requires_grad_(False)
    head = snapshot(model[4])
    record = kaiming_init(model)
    assert len(record.changed) == 2
    assert_same_state(model[4], head)


# -- lecun_init ---------------------------------------------------------------------------------


def test_lecun_normal_std_is_one_over_sqrt_fan_in():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(400, 300), nn.SELU(), nn.Linear(300, 10))
    with torch.no_grad():
        model[0].bias.fill_(1.0)
    output = snapshot(model[2])
    record = lecun_init(model)
    assert std(model[0].weight) == pytest.approx(1.0 / math.sqrt(400), rel=0.03)
    assert torch.count_nonzero(model[0].bias) == 0
    assert record.remedy == "lecun_init"
    assert record.changed == ["0: LeCun normal"]
    assert record.skipped[0].startswith("2:")
    assert_same_state(model[2], output)


def test_lecun_uniform_stays_within_its_limit():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(400, 300), nn.ReLU(), nn.Linear(300, 10))
    record = lecun_init(model, distribution="uniform")
    limit = math.sqrt(3.0 / 400)
    weight = model[0].weight.detach().abs()
    assert float(weight.max()) <= limit
    assert float(weight.max()) > 0.99 * limit
    assert std(model[0].weight) == pytest.approx(1.0 / math.sqrt(400), rel=0.03)
    assert record.changed == ["0: LeCun uniform"]


def test_lecun_rejects_a_bad_distribution_and_undoes():
    model = mlp()
    before = snapshot(model)
    with pytest.raises(RemedyError, match="distribution"):
        lecun_init(model, distribution="truncated")
    assert_same_state(model, before)
    lecun_init(model).undo()
    assert_same_state(model, before)


def test_lecun_on_a_frozen_layer_rolls_back():
    model = mlp()
    model[2].bias.requires_grad_(False)
    before = snapshot(model)
    with pytest.raises(RemedyError, match=r"2\.bias"):
        lecun_init(model)
    assert_same_state(model, before)


# -- swap_activation ----------------------------------------------------------------------------


def test_swap_replaces_nested_relu_modules_with_the_given_kwargs():
    model = Nested()
    old = [model.body[1], model.body[3]]
    record = swap_activation(model, "leaky_relu", negative_slope=0.1)
    for position in (1, 3):
        assert type(model.body[position]) is nn.LeakyReLU
        assert model.body[position].negative_slope == 0.1
    assert record.changed == ["body.1: ReLU -> LeakyReLU", "body.3: ReLU6 -> LeakyReLU"]
    assert record.details == {"to": "leaky_relu", "negative_slope": 0.1}
    record.undo()
    assert model.body[1] is old[0] and model.body[3] is old[1]


def test_swap_defaults_to_leaky_relu():
    model = identity_relu()
    swap_activation(model)
    assert type(model[1]) is nn.LeakyReLU
    assert model[1].negative_slope == nn.LeakyReLU().negative_slope


@pytest.mark.parametrize(
    ("to", "kwargs", "expected"),
    [
        ("leaky_relu", {"negative_slope": 0.1}, lambda x: F.leaky_relu(x, 0.1)),
        ("prelu", {"init": 0.3}, lambda x: torch.where(x > 0, x, 0.3 * x)),
        ("elu", {"alpha": 0.5}, lambda x: F.elu(x, alpha=0.5)),
        ("celu", {"alpha": 2.0}, lambda x: F.celu(x, alpha=2.0)),
        ("gelu", {}, F.gelu),
    ],
)
def test_swapped_model_computes_the_new_activation(to, kwargs, expected):
    model = identity_relu(4)  # output = activation(input)
    x = -torch.rand(3, 4) - 0.5  # all negative: ReLU gives 0 everywhere
    assert torch.count_nonzero(model(x)) == 0
    relu = model[1]
    record = swap_activation(model, to, **kwargs)
    with torch.no_grad():
        out = model(x)
    assert torch.count_nonzero(out) == out.numel()
    torch.testing.assert_close(out, expected(x))
    record.undo()
    assert model[1] is relu
    assert torch.count_nonzero(model(x)) == 0


def test_swap_to_prelu_passes_num_parameters_and_matches_the_dtype():
    model = mlp().double()
    record = swap_activation(model, "prelu", num_parameters=8, init=0.5)
    for position in (1, 3):
        assert model[position].weight.shape == (8,)
        assert model[position].weight.dtype == torch.float64
        assert torch.all(model[position].weight == 0.5)
    assert model(torch.randn(5, 4, dtype=torch.float64)).dtype == torch.float64
    assert len(record.changed) == 2


@pytest.mark.parametrize(
    ("to", "kwargs", "match"),
    [
        ("swish", {}, "unknown activation 'swish'"),
        ("ReLU", {}, "unknown activation"),
        ("leaky_relu", {"slope": 0.1}, "does not take"),
        ("gelu", {"negative_slope": 0.1}, "does not take"),
    ],
)
def test_swap_rejects_unknown_targets_and_bad_kwargs_without_changing_the_model(to, kwargs, match):
    model = mlp()
    children = list(model.children())
    before = snapshot(model)
    with pytest.raises(RemedyError, match=match):
        swap_activation(model, to, **kwargs)
    assert all(a is b for a, b in zip(model.children(), children, strict=True))
    assert_same_state(model, before)


def test_swap_rejects_a_bad_kwarg_value_as_remedy_error():
    model = mlp()
    relu = model[1]
    with pytest.raises(RemedyError):
        swap_activation(model, "prelu", num_parameters=-1)
    assert model[1] is relu


def test_swap_to_selu_brings_alpha_dropout_and_lecun_weights():
    torch.manual_seed(6)
    model = nn.Sequential(
        nn.Linear(400, 300), nn.ReLU(), nn.Dropout(0.3), nn.Linear(300, 10), nn.Dropout(0.1)
    )
    before = snapshot(model)
    old = list(model.children())
    record = swap_activation(model, "selu")
    assert type(model[1]) is nn.SELU
    assert [type(model[i]) for i in (2, 4)] == [nn.AlphaDropout, nn.AlphaDropout]
    assert (model[2].p, model[4].p) == (0.3, 0.1)
    assert std(model[0].weight) == pytest.approx(1.0 / math.sqrt(400), rel=0.03)
    assert std(model[3].weight) == pytest.approx(1.0 / math.sqrt(300), rel=0.1)
    assert torch.count_nonzero(model[0].bias) == 0
    assert torch.count_nonzero(model[3].bias) == 0
    assert "2: Dropout(0.3) -> AlphaDropout(0.3)" in record.changed
    assert model(torch.randn(6, 400)).shape == (6, 10)
    record.undo()
    assert all(a is b for a, b in zip(model.children(), old, strict=True))
    assert_same_state(model, before)


def test_swap_to_selu_with_a_frozen_layer_rolls_back_the_swap_too():
    model = mlp()
    model[4].weight.requires_grad_(False)
    old = list(model.children())
    before = snapshot(model)
    with pytest.raises(RemedyError, match=r"4\.weight"):
        swap_activation(model, "selu")
    assert all(a is b for a, b in zip(model.children(), old, strict=True))
    assert_same_state(model, before)


def test_swap_finds_functional_calls_with_an_example():
    model = FunctionalNet()
    before = snapshot(model)
    record = swap_activation(model, "leaky_relu", example=torch.randn(16, 4))
    assert record.changed == []
    assert len(record.skipped) == 1
    assert record.skipped[0].startswith("fc1")
    assert "functional call" in record.skipped[0]
    assert "leaky_relu" in record.skipped[0]
    assert_same_state(model, before)
    assert not leftovers(model)


def test_swap_without_modules_or_example_is_an_error():
    model = FunctionalNet()
    with pytest.raises(RemedyError, match="example="):
        swap_activation(model)


def test_swap_without_example_says_functional_calls_were_not_looked_for():
    record = swap_activation(mlp(), "elu")
    assert len(record.changed) == 2
    assert any("not looked for" in s for s in record.skipped)


def test_swap_with_example_lists_only_functional_calls():
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(4, 8)
            self.act = nn.ReLU()
            self.fc2 = nn.Linear(8, 8)

        def forward(self, x):
            return F.relu(self.fc2(self.act(self.fc1(x))))

    model = Mixed()
    record = swap_activation(model, "elu", example=torch.randn(8, 4))
    assert record.changed == ["act: ReLU -> ELU"]
    assert len(record.skipped) == 1 and record.skipped[0].startswith("fc2")
    assert type(model.act) is nn.ELU


# -- add_batch_norm -----------------------------------------------------------------------------


def test_batch_norm_goes_between_each_layer_and_its_relu():
    model = mlp()
    before = snapshot(model)
    record = add_batch_norm(model)
    assert list(model._modules) == ["0", "0_batch_norm", "1", "2", "2_batch_norm", "3", "4"]
    for name in ("0", "2"):
        norm = model._modules[f"{name}_batch_norm"]
        assert type(norm) is nn.BatchNorm1d
        assert norm.num_features == model._modules[name].out_features
    state = model.state_dict()
    for key, value in before.items():
        assert torch.equal(state[key], value), key
    assert record.changed == [
        "0: BatchNorm1d inserted after it as 0_batch_norm",
        "2: BatchNorm1d inserted after it as 2_batch_norm",
    ]
    assert any("optimizer" in s for s in record.skipped)
    out = model(torch.randn(5, 4))
    assert out.shape == (5, 2)
    # the inserted norm is in the forward path: the first layer's output is normalised
    hidden = model[1](model[0](torch.randn(64, 4)))
    assert hidden.mean(0).abs().max() < 1e-5


def test_batch_norm_for_conv_uses_out_channels():
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 6 * 6, 2))
    add_batch_norm(model)
    norm = model._modules["0_batch_norm"]
    assert type(norm) is nn.BatchNorm2d and norm.num_features == 6
    assert model(torch.randn(4, 3, 8, 8)).shape == (4, 2)


def test_batch_norm_only_where_the_relu_follows_directly():
    model = nn.Sequential(
        nn.Linear(4, 8), nn.Dropout(0.1), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1)
    )
    record = add_batch_norm(model)
    assert list(model._modules) == ["0", "1", "2", "3", "3_batch_norm", "4", "5"]
    assert record.changed == ["3: BatchNorm1d inserted after it as 3_batch_norm"]
    # once inserted, nothing is followed directly by a ReLU any more
    with pytest.raises(RemedyError, match=r"nn\.Sequential"):
        add_batch_norm(model)


def test_batch_norm_inside_a_nested_sequential():
    model = Nested()
    record = add_batch_norm(model)
    assert [c.split(":")[0] for c in record.changed] == ["body.0", "body.2"]
    assert "body.0_batch_norm.weight" in model.state_dict()
    assert "body.0.weight" in model.state_dict()
    assert model(torch.randn(3, 4)).shape == (3, 2)


def test_batch_norm_joins_the_optimizer_as_a_new_group():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    first = opt.param_groups[0]
    record = add_batch_norm(model, opt)
    assert len(opt.param_groups) == 2 and opt.param_groups[0] is first
    norms = [model._modules["0_batch_norm"], model._modules["2_batch_norm"]]
    expected = [p for norm in norms for p in norm.parameters()]
    added = opt.param_groups[1]["params"]
    assert len(added) == len(expected) == 4
    assert all(a is b for a, b in zip(added, expected, strict=True))
    assert record.changed[-1] == "optimizer: new parameter group with 4 tensors"
    assert not any("optimizer" in s for s in record.skipped)
    bias_before = norms[0].bias.detach().clone()
    train_with(model, opt)
    assert not torch.equal(norms[0].bias, bias_before)


def train_with(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    make = randn_input(16, 4)
    for step in range(2):
        opt.zero_grad()
        (model(make(step)) - 1.0).square().mean().backward()
        opt.step()


def test_batch_norm_undo_restores_children_and_the_optimizer():
    model = mlp()
    children = list(model.children())
    keys = list(model._modules)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    record = add_batch_norm(model, opt)
    train_with(model, opt)  # momentum buffers for the new parameters now exist
    new_params = list(opt.param_groups[1]["params"])
    assert all(p in opt.state for p in new_params)
    record.undo()
    assert list(model._modules) == keys
    assert all(a is b for a, b in zip(model.children(), children, strict=True))
    assert len(opt.param_groups) == 1
    assert not any(p in opt.state for p in new_params)
    train(model, None, 1, randn_input(4, 4), lr=0.1)  # the model still trains


def test_batch_norm_undo_when_the_old_group_has_as_many_tensors():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU())  # 2 tensors, like one BatchNorm1d
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    record = add_batch_norm(model, opt)
    record.undo()
    assert len(opt.param_groups) == 1
    assert list(model._modules) == ["0", "1"]


def test_batch_norm_name_clash_keeps_every_child():
    model = nn.Sequential(
        OrderedDict(fc=nn.Linear(4, 8), act=nn.ReLU(), fc_batch_norm=nn.Linear(8, 2))
    )
    old = list(model.children())
    add_batch_norm(model)
    assert any(isinstance(m, nn.BatchNorm1d) for m in model.children())
    assert [m for m in model.children() if not isinstance(m, nn.BatchNorm1d)] == old


def test_batch_norm_follows_the_model_training_mode():
    model = mlp().eval()
    add_batch_norm(model)
    assert not model._modules["0_batch_norm"].training
    assert model(torch.randn(1, 4)).shape == (1, 2)


def test_batch_norm_refuses_a_functional_model():
    model = FunctionalNet()
    before = snapshot(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RemedyError, match=r"nn\.Sequential"):
        add_batch_norm(model, opt)
    assert_same_state(model, before)
    assert len(opt.param_groups) == 1


# -- lower_learning_rate ------------------------------------------------------------------------


def two_group_optimizer() -> torch.optim.Optimizer:
    model = mlp()
    return torch.optim.SGD(
        [
            {"params": model[0].parameters(), "lr": 0.1},
            {"params": model[2].parameters(), "lr": 0.03},
        ],
        lr=0.5,
    )


@pytest.mark.parametrize("factor", [10.0, 4, 1.5])
def test_lower_learning_rate_divides_every_group(factor):
    opt = two_group_optimizer()
    old = [g["lr"] for g in opt.param_groups]
    record = lower_learning_rate(opt, factor)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([lr / factor for lr in old])
    assert len(record.changed) == 2
    assert record.changed[0].startswith("param group 0: lr 0.1 -> ")
    assert record.details == {"factor": factor}
    record.undo()
    assert [g["lr"] for g in opt.param_groups] == old


def test_lower_learning_rate_defaults_to_ten():
    opt = two_group_optimizer()
    lower_learning_rate(opt)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01, 0.003])


@pytest.mark.parametrize(
    "factor", [1, 1.0, 0.5, 0, -2.0, math.nan, math.inf, -math.inf, "10", None, True]
)
def test_lower_learning_rate_rejects_bad_factors(factor):
    opt = two_group_optimizer()
    old = [g["lr"] for g in opt.param_groups]
    with pytest.raises(RemedyError, match="factor"):
        lower_learning_rate(opt, factor)
    assert [g["lr"] for g in opt.param_groups] == old


def test_lower_learning_rate_needs_param_groups_with_lr():
    class NoLr:
        param_groups = [{"params": []}]  # noqa: RUF012

    with pytest.raises(RemedyError, match="no learning rate"):
        lower_learning_rate(NoLr())
    with pytest.raises(RemedyError, match="no learning rate"):
        lower_learning_rate(object())


# -- RemedyRecord -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "apply",
    [
        lambda: kaiming_init(mlp()),
        lambda: lecun_init(mlp()),
        lambda: swap_activation(mlp(), "leaky_relu", negative_slope=0.1),
        lambda: add_batch_norm(mlp()),
        lambda: lower_learning_rate(two_group_optimizer(), 2.0),
    ],
    ids=["kaiming", "lecun", "swap", "batch_norm", "lr"],
)
def test_record_to_dict_round_trips_through_json(apply):
    record = apply()
    data = record.to_dict()
    assert set(data) == {"remedy", "changed", "skipped", "details"}
    assert json.loads(json.dumps(data)) == data
    assert data["remedy"] == record.remedy and data["changed"] == record.changed
    assert data["changed"]
    data["changed"].append("tampered")
    data["details"]["extra"] = 1
    assert "tampered" not in record.changed and "extra" not in record.details


def test_record_undo_runs_in_reverse_order():
    record = RemedyRecord("manual")
    tensor = torch.zeros(3)
    record.save_tensor(tensor)
    tensor.fill_(1.0)
    record.save_tensor(tensor)
    tensor.fill_(2.0)
    record.undo()
    assert torch.equal(tensor, torch.zeros(3))
