"""The experiments of the brief (E1-E5) and healthy controls, as small reusable objects.

Each scenario builds its model, data, optimizer and loss from a seed, and runs with or without
the monitor; demo, study and the tests share them. ``expected_causes`` records what the
brief says went wrong - for tests and the README table only: the rules never see it.

    >>> from reludoctor.scenarios import ZeroInit
    >>> result = ZeroInit(epochs=1).run()
    >>> [f.code for f in result.report.causes()]
    ['zero_init']
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

import reludoctor
from reludoctor.report.report import Report

Batches = Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]]


@dataclass
class Setup:
    """Everything one run needs: built fresh, deterministically, for each run."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]

    def batches(self, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The training split as (inputs, targets) batches of ``size``, in order."""
        x, y = self.train
        return list(zip(x.split(size), y.split(size), strict=True))


@dataclass
class RunResult:
    """What a run produced: per-epoch losses, the trained model and, when watched, the report."""

    model: nn.Module
    train_loss: list[float]
    val_loss: list[float]
    report: Report | None = None
    steps: int = 0


@dataclass
class Scenario:
    """Base: subclasses build the :class:`Setup`; :meth:`run` trains it."""

    epochs: int = 5
    batch_size: int = 32
    seed: int = 0
    window: int = 50

    name: ClassVar[str] = ""
    expected_causes: ClassVar[tuple[str, ...]] = ()
    expected_symptoms: ClassVar[tuple[str, ...]] = ()

    def build(self) -> Setup:
        raise NotImplementedError

    def run(
        self,
        *,
        watch: bool = True,
        setup: Setup | None = None,
        max_steps: int | None = None,
        on_epoch: Callable[[int, float, float], None] | None = None,
        **watch_kwargs: Any,
    ) -> RunResult:
        """Train for ``epochs`` (or ``max_steps``); with ``watch`` a report comes back."""
        setup = setup or self.build()
        model, optimizer = setup.model, setup.optimizer
        doc = None
        if watch:
            watch_kwargs.setdefault("window", self.window)
            doc = reludoctor.watch(model, optimizer=optimizer, **watch_kwargs)
        generator = torch.Generator().manual_seed(self.seed + 1)
        x_train, y_train = setup.train
        train_losses: list[float] = []
        val_losses: list[float] = []
        steps = 0
        try:
            for epoch in range(self.epochs):
                order = torch.randperm(len(x_train), generator=generator)
                total, count = torch.zeros(()), 0
                for batch in order.split(self.batch_size):
                    loss = setup.loss_fn(model(x_train[batch]), y_train[batch])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    if doc is not None:
                        doc.step(loss=loss)
                    total += loss.detach() * len(batch)
                    count += len(batch)
                    steps += 1
                    if max_steps is not None and steps >= max_steps:
                        break
                train_losses.append(float(total) / max(count, 1))
                val_losses.append(self._evaluate(setup))
                if on_epoch is not None:
                    on_epoch(epoch, train_losses[-1], val_losses[-1])
                if max_steps is not None and steps >= max_steps:
                    break
            report = doc.report() if doc is not None else None
        finally:
            if doc is not None:
                doc.close()
        if report is not None:
            report.meta.update(
                {"scenario": self.name, "train_loss": train_losses, "val_loss": val_losses}
            )
        return RunResult(model, train_losses, val_losses, report, steps)

    @staticmethod
    def _evaluate(setup: Setup) -> float:
        return float(setup.loss_fn(evaluated(setup.model, setup.val[0]), setup.val[1]))


def _split(
    x: torch.Tensor, y: torch.Tensor, train_fraction: float
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    cut = int(len(x) * train_fraction)
    return (x[:cut], y[:cut]), (x[cut:], y[cut:])


# -- E1 ----------------------------------------------------------------------------------------


def _positive_uniform(weight: torch.Tensor) -> None:
    nn.init.uniform_(weight, 0.0, 1.0)


def _lecun_uniform(weight: torch.Tensor) -> None:
    limit = math.sqrt(3.0 / weight.shape[1])
    nn.init.uniform_(weight, -limit, limit)


#: Initialisers of the study's grid, by their Keras names; biases always start at 0.
INITIALISERS: dict[str, Callable[[torch.Tensor], None]] = {
    "positive_uniform": _positive_uniform,
    "he_normal": lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu"),
    "he_uniform": lambda w: nn.init.kaiming_uniform_(w, nonlinearity="relu"),
    "lecun_normal": lambda w: nn.init.kaiming_normal_(w, nonlinearity="linear"),
    "lecun_uniform": _lecun_uniform,
    "random_uniform": lambda w: nn.init.uniform_(w, -0.05, 0.05),  # Keras's RandomUniform
    "negative_uniform": lambda w: nn.init.uniform_(w, -1.0, 0.0),
}

#: Activations of the study's grid (PyTorch's defaults: LeakyReLU's slope is 0.01).
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": nn.LeakyReLU,
    "prelu": nn.PReLU,
    "elu": nn.ELU,
    "selu": nn.SELU,
}


def dense_stack(
    sizes: list[int],
    *,
    activation: str = "relu",
    init: str = "positive_uniform",
    dropout: float = 0.0,
    batch_norm: bool = False,
) -> nn.Sequential:
    """Dense layers of ``sizes``, each followed by ``activation`` (the output layer too, as in
    "Is ReLU Dead?"), with optional dropout on each layer's input (AlphaDropout for SELU)
    and batch norm before each activation."""
    layers: dict[str, nn.Module] = {}
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes), start=1):
        if dropout:
            dropout_type = nn.AlphaDropout if activation == "selu" else nn.Dropout
            layers[f"dropout{i}"] = dropout_type(dropout)
        linear = nn.Linear(n_in, n_out)
        INITIALISERS[init](linear.weight)
        nn.init.zeros_(linear.bias)
        layers[f"dense{i}"] = linear
        if batch_norm:
            layers[f"batch_norm{i}"] = nn.BatchNorm1d(n_out)
        layers[f"{activation}{i}"] = ACTIVATIONS[activation]()
    return nn.Sequential(OrderedDict(layers))


@dataclass
class IsReluDead(Scenario):
    """E1, after seed 001: inputs uniform in (-1, 0), one dense unit with a ReLU.

    The article shows its code only as images and never states the target; here the target
    is a fixed linear function of x that a live ReLU could fit, ``y = -x @ [1, 2, 3, 4] +
    noise`` (positive, because x is negative). The weights start random but positive,
    uniform in (0, 1), the bias at zero - so every pre-activation ``w @ x`` is negative,
    the unit outputs 0 for every input, gets no gradient, and train and validation loss stay
    flat for all epochs, as the article observed.

    The other fields are the knobs of the article's "Solution?" list that ``reludoctor
    study`` turns: ``hidden`` widths of extra ReLU layers, the initialiser (a key of
    :data:`INITIALISERS`), the activation (a key of :data:`ACTIVATIONS`), dropout on each
    layer's input, batch norm before each activation and Adam's learning rate.
    """

    samples: int = 200_000
    epochs: int = 25
    batch_size: int = 256
    lr: float = 1e-3
    train_fraction: float = 0.7
    window: int = 100
    hidden: tuple[int, ...] = ()
    init: str = "positive_uniform"
    activation: str = "relu"
    dropout: float = 0.0
    batch_norm: bool = False

    name: ClassVar[str] = "E1 Is ReLU Dead? (inputs uniform in (-1, 0), one ReLU layer)"
    expected_causes: ClassVar[tuple[str, ...]] = ("unnormalized_inputs",)
    expected_symptoms: ClassVar[tuple[str, ...]] = ("dead_units", "loss_plateau")

    def make_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed)
        x = -torch.rand(self.samples, 4, generator=generator)
        true_weights = torch.tensor([1.0, 2.0, 3.0, 4.0])
        y = -(x @ true_weights) + 0.1 * torch.randn(self.samples, generator=generator)
        return x, y[:, None]

    def build_model(self) -> nn.Module:
        torch.manual_seed(self.seed)
        return dense_stack(
            [4, *self.hidden, 1],
            activation=self.activation,
            init=self.init,
            dropout=self.dropout,
            batch_norm=self.batch_norm,
        )

    def build(self) -> Setup:
        model = self.build_model()
        train, val = _split(*self.make_data(), self.train_fraction)
        optimizer = torch.optim.Adam(model.parameters(), lr=self.lr)
        return Setup(model, optimizer, F.mse_loss, train, val)


# -- E2 ----------------------------------------------------------------------------------------


def mlp(sizes: list[int], activation: Callable[[], nn.Module] = nn.ReLU) -> nn.Sequential:
    """Dense layers of ``sizes`` with ``activation`` between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


@dataclass
class KerasMLP(Scenario):
    """E2, after seed 000: Dense 784-128-64-10 with ReLU, Adam, cross-entropy, 1,000
    standard-normal samples with random labels, 5 epochs at Keras's batch of 32.

    The article expects units to die at once; measured, they do not: standard-normal inputs
    and PyTorch's default initialisation keep about half of each layer's units firing on
    every batch, and the loss falls as the network memorises the random labels. So its
    expected diagnosis is none: reludoctor must not raise a false alarm here.
    """

    samples: int = 1000
    lr: float = 1e-3

    name: ClassVar[str] = "E2 Keras MLP (784-128-64-10, random inputs and labels)"

    def build(self) -> Setup:
        torch.manual_seed(self.seed)
        generator = torch.Generator().manual_seed(self.seed)
        x = torch.randn(self.samples, 784, generator=generator)
        y = torch.randint(0, 10, (self.samples,), generator=generator)
        model = mlp([784, 128, 64, 10])
        optimizer = torch.optim.Adam(model.parameters(), lr=self.lr)
        return Setup(model, optimizer, F.cross_entropy, (x, y), (x[:200], y[:200]))


# -- E3 ----------------------------------------------------------------------------------------


@dataclass
class ZeroInit(Scenario):
    """E3, after seed 003: a 10-input, 5-unit ReLU layer with all-zero weights (and bias):
    every pre-activation is exactly 0, so every output is 0 and no gradient flows back."""

    samples: int = 2000
    lr: float = 1e-2

    name: ClassVar[str] = "E3 all-zero initialisation (10 inputs, 5 ReLU units)"
    expected_causes: ClassVar[tuple[str, ...]] = ("zero_init",)
    expected_symptoms: ClassVar[tuple[str, ...]] = ("dead_units", "identical_outputs")

    def build(self) -> Setup:
        torch.manual_seed(self.seed)
        generator = torch.Generator().manual_seed(self.seed)
        x = torch.randn(self.samples, 10, generator=generator)
        y = x[:, :3].sum(1, keepdim=True).abs()
        model = mlp([10, 5, 1])
        with torch.no_grad():
            model[0].weight.zero_()
            model[0].bias.zero_()
        optimizer = torch.optim.SGD(model.parameters(), lr=self.lr)
        train, val = _split(x, y, 0.8)
        return Setup(model, optimizer, F.mse_loss, train, val)


# -- E4 ----------------------------------------------------------------------------------------


def he_init(model: nn.Module) -> nn.Module:
    """He (Kaiming) normal weights and zero biases on every Linear/Conv layer."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return model


@dataclass
class HighLearningRate(Scenario):
    """E4, after seed 003: start from He initialisation and take 50 SGD steps with learning
    rate 10: the first updates throw the units' pre-activations far below 0 and the outputs
    collapse to one value. (A classifier: cross-entropy's bounded gradients keep the run
    finite, where a squared error would overflow to NaN in a few steps.)"""

    samples: int = 1600
    lr: float = 10.0
    epochs: int = 1
    window: int = 10

    name: ClassVar[str] = "E4 learning rate 10 from He initialisation (50 SGD steps)"
    expected_causes: ClassVar[tuple[str, ...]] = ("high_learning_rate",)
    expected_symptoms: ClassVar[tuple[str, ...]] = ("dead_units", "identical_outputs")

    def build(self) -> Setup:
        torch.manual_seed(self.seed)
        generator = torch.Generator().manual_seed(self.seed)
        x = torch.randn(self.samples, 10, generator=generator)
        y = (x[:, :5].sum(1) > 0).long()
        model = he_init(mlp([10, 64, 64, 2]))
        optimizer = torch.optim.SGD(model.parameters(), lr=self.lr)
        return Setup(model, optimizer, F.cross_entropy, (x, y), (x[:400], y[:400]))


# -- E5 ----------------------------------------------------------------------------------------


@dataclass
class DeepPlain(Scenario):
    """E5, after seed 003: a 20-layer plain ReLU stack (width 64, PyTorch's default
    initialisation), no batch norm, no skip connections: the signal shrinks layer after
    layer, the gradients reaching the first layers vanish and the deep units die."""

    samples: int = 2000
    depth: int = 20
    width: int = 64
    lr: float = 1e-2

    name: ClassVar[str] = "E5 20-layer plain ReLU stack, no batch norm or skip connections"
    expected_causes: ClassVar[tuple[str, ...]] = ("deep_without_normalization",)
    expected_symptoms: ClassVar[tuple[str, ...]] = ("vanishing_gradients",)

    def build(self) -> Setup:
        torch.manual_seed(self.seed)
        generator = torch.Generator().manual_seed(self.seed)
        x = torch.randn(self.samples, 16, generator=generator)
        teacher = torch.randn(16, 4, generator=generator)
        y = (x @ teacher).argmax(1)  # learnable: a fixed linear teacher's choice
        model = mlp([16] + [self.width] * self.depth + [4])
        optimizer = torch.optim.SGD(model.parameters(), lr=self.lr, momentum=0.9)
        train, val = _split(x, y, 0.8)
        return Setup(model, optimizer, F.cross_entropy, train, val)


# -- healthy controls --------------------------------------------------------------------------


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8x8 digits, standardised per pixel (no download)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[order], y[order]


def _digits_setup(model: nn.Module, lr: float) -> Setup:
    """Digits classification with Adam: 80% to train on, 20% to validate."""
    x, y = digits()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    train, val = _split(x, y, 0.8)
    return Setup(model, optimizer, F.cross_entropy, train, val)


@dataclass
class DigitsMLP(Scenario):
    """Healthy control: digits, MLP 64-128-64-10 with ReLU, Adam 1e-3, standardised inputs."""

    epochs: int = 8
    lr: float = 1e-3

    name: ClassVar[str] = "control: digits MLP (64-128-64-10, Adam)"

    def build(self) -> Setup:
        torch.manual_seed(self.seed)
        return _digits_setup(mlp([64, 128, 64, 10]), self.lr)


class SmallCNN(nn.Module):
    """Two 3x3 convolutions with batch norm and ReLU, then a dense head (for 8x8 digits)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.view(-1, 1, 8, 8)).flatten(1))


@dataclass
class DigitsCNN(Scenario):
    """Healthy control: digits, a small CNN with batch norm, Adam 1e-3."""

    epochs: int = 5
    lr: float = 1e-3

    name: ClassVar[str] = "control: digits CNN (conv16-conv32 with batch norm, Adam)"

    def build(self) -> Setup:
        torch.manual_seed(self.seed)
        return _digits_setup(SmallCNN(), self.lr)


class ResidualBlock(nn.Module):
    """ResNet's basic block: two 3x3 Conv -> BatchNorm, ReLU between and after the skip."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(h)) + x)


class SmallResNet(nn.Module):
    """A stem (Conv -> BatchNorm -> ReLU) and two residual blocks, for 8x8 digits."""

    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )
        self.blocks = nn.Sequential(ResidualBlock(channels), ResidualBlock(channels))
        self.head = nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.stem(x.view(-1, 1, 8, 8)))
        return self.head(h.mean((2, 3)))


@dataclass
class DigitsResNet(Scenario):
    """Healthy control: digits, a small ResNet (Conv -> BatchNorm -> ReLU, skips), Adam."""

    epochs: int = 4
    lr: float = 1e-3

    name: ClassVar[str] = "control: digits ResNet (stem and two residual blocks, batch norm)"

    def build(self) -> Setup:
        torch.manual_seed(self.seed)
        return _digits_setup(SmallResNet(), self.lr)


class TinyTransformer(nn.Module):
    """Token and position embeddings, PyTorch's own encoder layers (post-norm, ReLU
    feed-forward blocks, as ``activation="relu"`` builds them), a head on the first token."""

    def __init__(self, vocab: int = 16, length: int = 12, d: int = 32, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.position = nn.Parameter(torch.randn(length, d) * 0.1)
        block = nn.TransformerEncoderLayer(
            d, 4, 4 * d, dropout=0.0, activation="relu", batch_first=True
        )
        self.encoder = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens) + self.position)[:, 0])


@dataclass
class TransformerHighLR(Scenario):
    """A small transformer encoder on a generated sequence task (the class is the first
    token mod 4), trained with Adam at learning rate 0.3: the feed-forward blocks' ReLU
    units die (three quarters of the second block's) and the outputs collapse. Users report
    up to ~73% dead units in later MLP blocks of transformers trained too fast."""

    samples: int = 2000
    lr: float = 0.3
    epochs: int = 3
    window: int = 20

    name: ClassVar[str] = "transformer encoder, ReLU feed-forward blocks, Adam lr 0.3"
    expected_causes: ClassVar[tuple[str, ...]] = ("high_learning_rate",)
    expected_symptoms: ClassVar[tuple[str, ...]] = ("dead_units",)

    def build(self) -> Setup:
        torch.manual_seed(self.seed)
        generator = torch.Generator().manual_seed(self.seed)
        x = torch.randint(0, 16, (self.samples, 12), generator=generator)
        y = x[:, 0] % 4
        model = TinyTransformer()
        optimizer = torch.optim.Adam(model.parameters(), lr=self.lr)
        train, val = _split(x, y, 0.8)
        return Setup(model, optimizer, F.cross_entropy, train, val)


@dataclass
class TransformerControl(TransformerHighLR):
    """Healthy control: the same transformer and task at Adam's learning rate 3e-3."""

    lr: float = 3e-3

    name: ClassVar[str] = "control: the same transformer at Adam lr 3e-3"
    expected_causes: ClassVar[tuple[str, ...]] = ()
    expected_symptoms: ClassVar[tuple[str, ...]] = ()


# -- deep narrow networks that collapse (the repair benchmarks) --------------------------------

#: The 2-D toy tasks of :class:`DeepNarrow`: classification (scikit-learn's generators, no
#: download) and a regression, y = |x1| + |x2| on the square [-1, 1]^2.
TOY_TASKS = ("circles", "blobs", "moons", "abs")


def toy_task(task: str, seed: int, samples: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (``samples`` x 2, centred and scaled) and targets of a toy task: class indices,
    or a column of regression targets for ``"abs"``.

    Example:
        >>> x, y = toy_task("blobs", seed=0)
        >>> tuple(x.shape), sorted(set(y.tolist()))
        ((1000, 2), [0, 1, 2])
    """
    from sklearn.datasets import make_blobs, make_circles, make_moons

    if task == "circles":
        x, y = make_circles(samples, noise=0.05, factor=0.5, random_state=seed)
    elif task == "blobs":
        x, y = make_blobs(samples, centers=3, n_features=2, random_state=seed)
    elif task == "moons":
        x, y = make_moons(samples, noise=0.1, random_state=seed)
    elif task == "abs":
        x = torch.rand(samples, 2, generator=torch.Generator().manual_seed(seed)) * 2 - 1
        return x, x.abs().sum(1, keepdim=True)
    else:
        raise ValueError(f"unknown toy task {task!r}; choose from {', '.join(TOY_TASKS)}")
    inputs = torch.tensor(x, dtype=torch.float32)
    inputs = (inputs - inputs.mean(0)) / inputs.std(0)
    return inputs, torch.tensor(y, dtype=torch.long)


def evaluated(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's outputs for ``x`` in eval mode, without gradients (its mode kept)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(x)
    model.train(was_training)
    return out


def collapsed(model: nn.Module, x: torch.Tensor) -> bool:
    """Whether the network gives every input of ``x`` the same output: the spread of each
    output across the inputs is at most ``COLLAPSED_SPREAD`` of 1 + the outputs' size.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> x = torch.randn(64, 2)
        >>> collapsed(nn.Linear(2, 1), x)
        False
        >>> _ = nn.init.constant_(net[0].bias, -100.0)  # every unit dead
        >>> collapsed(net, x)
        True
    """
    out = evaluated(model, x).float()
    return float(out.std(0).max()) <= COLLAPSED_SPREAD * (1 + float(out.abs().max()))


#: Output spread at or below this (relative to 1 + the outputs' size) is a collapsed network.
COLLAPSED_SPREAD = 1e-6


@dataclass
class DeepNarrow(Scenario):
    """A deep, narrow plain ReLU MLP on a 2-D toy task: the family of published dying-ReLU
    benchmark programs (Lu et al. 2019, "Dying ReLU and Initialization"). With PyTorch's
    default initialisation most seeds collapse: a layer's units all die, every input gets the
    same output, and the metric stays at chance. ``width=32, depth=3`` is the healthy control.
    """

    task: str = "circles"
    width: int = 2
    depth: int = 10
    optimizer: str = "adam"
    lr: float = 1e-3
    epochs: int = 40  # 25 batches of 32 an epoch: 1000 steps
    window: int = 50

    name: ClassVar[str] = "deep narrow ReLU MLP on a 2-D toy task"
    expected_symptoms: ClassVar[tuple[str, ...]] = ("identical_outputs",)

    def build(self) -> Setup:
        x, y = toy_task(self.task, self.seed)
        train, val = _split(x, y, 0.8)
        torch.manual_seed(self.seed)
        outputs = 1 if self.task == "abs" else int(y.max()) + 1
        model = mlp([2] + [self.width] * self.depth + [outputs])
        kinds = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}
        optimizer = kinds[self.optimizer](model.parameters(), lr=self.lr)
        loss_fn = F.mse_loss if self.task == "abs" else F.cross_entropy
        return Setup(model, optimizer, loss_fn, train, val)

    @property
    def chance(self) -> float:
        """The metric of a network that ignores its input: 1 / classes, or R^2 = 0."""
        return 0.0 if self.task == "abs" else 1.0 / (2 if self.task != "blobs" else 3)

    def metric(self, model: nn.Module, setup: Setup) -> float:
        """Validation accuracy, or R^2 for the regression."""
        x, y = setup.val
        out = evaluated(model, x)
        if self.task == "abs":
            return float(1 - F.mse_loss(out, y) / y.var(unbiased=False))
        return float((out.argmax(1) == y).float().mean())


#: The repair benchmarks: deep narrow networks that collapse on most seeds, and healthy
#: controls on the same tasks (``benchmarks/repair.py``).
REPAIR_SCENARIOS: dict[str, DeepNarrow] = {
    "narrow-circles": DeepNarrow(task="circles"),
    "narrow-blobs": DeepNarrow(task="blobs"),
    "narrow-abs": DeepNarrow(task="abs"),
    "narrow-moons-sgd": DeepNarrow(task="moons", width=3, optimizer="sgd", lr=0.05),
    "control-circles": DeepNarrow(task="circles", width=32, depth=3),
    "control-blobs": DeepNarrow(task="blobs", width=32, depth=3),
    "control-abs": DeepNarrow(task="abs", width=32, depth=3),
}


#: Every scenario by short name, the seed experiments first.
SCENARIOS: dict[str, type[Scenario]] = {
    "e1": IsReluDead,
    "e2": KerasMLP,
    "e3": ZeroInit,
    "e4": HighLearningRate,
    "e5": DeepPlain,
    "transformer-high-lr": TransformerHighLR,
    "digits-mlp": DigitsMLP,
    "digits-cnn": DigitsCNN,
    "digits-resnet": DigitsResNet,
    "transformer": TransformerControl,
}

__all__ = [
    "REPAIR_SCENARIOS",
    "SCENARIOS",
    "DeepNarrow",
    "DeepPlain",
    "DigitsCNN",
    "DigitsMLP",
    "DigitsResNet",
    "HighLearningRate",
    "IsReluDead",
    "KerasMLP",
    "RunResult",
    "Scenario",
    "Setup",
    "TransformerControl",
    "TransformerHighLR",
    "ZeroInit",
    "he_init",
    "mlp",
]
